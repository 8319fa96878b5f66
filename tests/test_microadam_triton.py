"""MicroAdam's Triton kernels against the torch reference path.

On CPU the kernels run under Triton's interpreter, at small sizes: tests/conftest.py sets
TRITON_INTERPRET=1 before anything imports triton (Triton reads it when a kernel is decorated). On a GPU
the same tests run the compiled kernels; the tests marked ``gpu`` run only there.

How exact: every kernel is launched with ``enable_fp_fusion=False`` (no a * b + c -> FMA contraction) and
divides and takes square roots with ``div_rn`` / ``sqrt_rn``, so each fp32 operation rounds once, as IEEE
says, in the order the torch reference performs them: the kernels are held to **bit equality** with the
reference, on the interpreter and on the GPU alike. The reference always runs on CPU, because torch on CUDA
is not the same arithmetic: it divides by a Python scalar as a multiplication by the scalar's reciprocal
(``(hi - lo) / 15`` in ops.quant) and computes ``addcdiv`` as ``p + alpha * (m / d)``, possibly as one FMA,
where the CPU computes ``p + (alpha * m) / d``. And on CPU, torch's vectorised ``sqrt`` is not correctly
rounded (torch 2.13, AVX-512 build: 1 ulp off for ~17% of random fp32 inputs); the kernels' ``sqrt_rn`` is,
so the window-update reference runs with an IEEE square root (``ieee_sqrt``).

The one-tensor kernels are tested beside their torch references; the group launches (``SparseWindowStep``, all
tensors of a group in three launches) through MicroAdam, against its torch path, tensor by tensor.
"""

from __future__ import annotations

import ast
import copy
import inspect

import numpy as np
import pytest
import torch

import slimopt

triton = pytest.importorskip("triton")

import slimopt.ops.sparse_window_triton as kernels  # noqa: E402
from slimopt import MicroAdam  # noqa: E402
from slimopt.ops import quant, topk  # noqa: E402
from slimopt.ops.sparse_window import apply_window_update_, window_weights  # noqa: E402

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"
STATE_KEYS = ("window_indices", "window_values", "ef_codes", "ef_min", "ef_max")


@pytest.fixture
def ieee_sqrt(monkeypatch):
    """Within the test, Tensor.sqrt_ of CPU fp32 tensors (the torch window update's only square root) rounds
    correctly (numpy's sqrt is IEEE), as the kernels' sqrt_rn does."""
    mkl_sqrt_ = torch.Tensor.sqrt_

    def sqrt_(self):
        if self.device.type != "cpu" or self.dtype != torch.float32:
            return mkl_sqrt_(self)
        return self.copy_(torch.from_numpy(np.sqrt(self.numpy())))

    monkeypatch.setattr(torch.Tensor, "sqrt_", sqrt_)


def test_kernels_take_no_optimizer_module():
    """The kernel module imports from slimopt nothing but other kernel modules (ops/), and none of its functions
    takes an optimizer's state dict or param group: numbers and tensors only."""
    tree = ast.parse(inspect.getsource(kernels))
    package = kernels.__name__.rpartition(".")[0]  # slimopt.ops
    imported = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.ImportFrom):
            base = package.split(".")[: len(package.split(".")) - (node.level - 1)] if node.level else []
            imported.add(".".join([*base, *([node.module] if node.module else [])]))
        elif isinstance(node, ast.Import):
            imported.update(alias.name for alias in node.names)
    ours = {m for m in imported if m == "slimopt" or m.startswith("slimopt.")}
    assert ours and all(m.startswith(package + ".") for m in ours), ours
    arguments = {a.arg for node in ast.walk(tree) if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef))
                 for a in (*node.args.posonlyargs, *node.args.args, *node.args.kwonlyargs)}
    assert len(arguments) > 20 and not arguments & {"state", "group", "param_group", "param_groups", "optimizer"}


# -- compression kernels ------------------------------------------------------------------------------------
@pytest.mark.parametrize("n,bucket", [(1001, 64), (256, 7), (130, 1000)])
def test_dequant_add_and_quantize_pack_match_torch(n, bucket):
    """Bit-equal: step = div_rn(hi - lo, 15) and code * step + lo + grad as three roundings, as the CPU
    reference (on the GPU the H200 run found the contracted FMA and the approximate division 1 ulp off)."""
    torch.manual_seed(n)
    x = torch.randn(n) * 3
    lo_ref, hi_ref = quant.bucket_ranges(x, bucket)
    lo, hi = kernels.bucket_ranges(x.to(DEVICE), bucket)
    assert torch.equal(lo.cpu(), lo_ref) and torch.equal(hi.cpu(), hi_ref)
    codes_ref = quant.quantize_4bit(x, lo_ref, hi_ref, bucket)
    assert torch.equal(kernels.quantize_pack(x.to(DEVICE), lo, hi, bucket).cpu(), codes_ref)
    grad = torch.randn(n).to(torch.bfloat16)
    a_ref = quant.dequantize_4bit(codes_ref, lo_ref, hi_ref, n, bucket).add_(grad)
    a = kernels.dequant_add(codes_ref.to(DEVICE), lo, hi, grad.to(DEVICE), bucket)
    assert torch.equal(a.cpu(), a_ref)


def test_zero_range_and_bf16_boundary_buckets():
    tiny_range = torch.zeros(64).index_fill_(0, torch.tensor([3, 9]), 3e-38)  # normal, but 1/step = inf
    x = torch.cat([torch.zeros(64), torch.full((64,), 1.0 + 2**-12), torch.full((64,), -1.0 - 2**-12),
                   tiny_range])
    lo, hi = kernels.bucket_ranges(x.to(DEVICE), 64)
    lo_ref, hi_ref = quant.bucket_ranges(x, 64)
    assert torch.equal(lo.cpu(), lo_ref) and torch.equal(hi.cpu(), hi_ref)
    codes = kernels.quantize_pack(x.to(DEVICE), lo, hi, 64)
    assert torch.equal(codes.cpu(), quant.quantize_4bit(x, lo_ref, hi_ref, 64))


def _ties(n: int, seed: int) -> torch.Tensor:
    """Few distinct magnitudes (0, 1, 2, 3 with both signs, and -0.0): ties at the threshold span tiles."""
    g = torch.Generator().manual_seed(seed)
    x = torch.randint(-3, 4, (n,), generator=g).float()
    return torch.where(x == 0, torch.where(torch.rand(n, generator=g) < 0.5, -0.0, 0.0), x)


@pytest.mark.parametrize("n,block,k_init,data", [
    (1000, 256, 0.05, "bf16"), (300, 512, 0.1, "bf16"), (512, 128, 1.0, "bf16"),  # one tile per block
    (3000, 3000, 0.01, "bf16"),  # non-power-of-two, one tile
    (5000, 5000, 0.02, "bf16"),  # two tiles, the second partial
    (3 * 4100 + 7, 4100, 0.3, "ties"),  # blocks of two tiles, a short last block; ties across tiles
    (2 * 32768 + 4500, 32768, 0.01, "bf16"),  # the largest block (8 tiles), a last block of 4500
    (32768, 32768, 0.05, "ties"),
])
def test_block_topk_matches_torch(n, block, k_init, data):
    """Same chosen set as ops.topk.block_topk (ties to the lower index), indices ascending per block."""
    torch.manual_seed(n)
    a = torch.randn(n).to(torch.bfloat16).float() if data == "bf16" else _ties(n, n)  # bf16: many ties too
    layout = topk.topk_blocks(n, block, k_init)
    idx = torch.zeros(layout.k_total, dtype=torch.int16, device=DEVICE)
    val = torch.zeros(layout.k_total, dtype=torch.bfloat16, device=DEVICE)
    rel = topk.block_topk(a, block, k_init)
    pos = rel + topk.block_starts(layout)
    expected_values, expected_rest = a[pos].to(torch.bfloat16), a.clone().index_fill_(0, pos, 0.0)
    work = a.to(DEVICE, copy=True)
    kernels.block_topk_into(work, idx, val, block, k_init)
    assert torch.equal(idx.long().cpu(), rel)
    assert torch.equal(val.cpu(), expected_values)
    assert torch.equal(work.cpu(), expected_rest)


# -- window update ------------------------------------------------------------------------------------------
def _random_window(n: int, block: int, k_init: float, m: int, seed: int) -> tuple[torch.Tensor, torch.Tensor]:
    """A valid window: per row and block, unique ascending block-relative indices; bf16 values."""
    g = torch.Generator().manual_seed(seed)
    layout = topk.topk_blocks(n, block, k_init)
    idx = torch.empty(m, layout.k_total, dtype=torch.int16)
    for r in range(m):
        cols = []
        for start in range(0, n, block):
            length = min(block, n - start)
            k = layout.k_block if length == block else layout.k_tail
            cols.append(torch.randperm(length, generator=g)[:k].sort().values.to(torch.int16))
        idx[r] = torch.cat(cols)
    return idx, torch.randn(m, layout.k_total, generator=g).to(torch.bfloat16)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("weight_decay", [0.0, 0.1])  # one launch, and entries + decay + scatter
@pytest.mark.parametrize("step", [2, 7])  # rows 2, 3 of m = 4 not written yet; the ring wrapped
def test_window_update_matches_torch(dtype, weight_decay, step, ieee_sqrt):
    """Bit-equal to apply_window_update_ (with an IEEE sqrt). k_init = 0.3 of blocks of 256 puts most
    positions in several rows; rows not yet written (all index 0) must not count."""
    n, block, k_init, m, betas, eps, lr = 1000, 256, 0.3, 4, (0.9, 0.999), 1e-8, 1e-2
    idx, val = _random_window(n, block, k_init, m, seed=step)
    if step < m:
        idx[step:], val[step:] = 0, 0.0  # as MicroAdam's fresh state
    p0 = torch.randn(n, generator=torch.Generator().manual_seed(1)).to(dtype)
    p = p0.to(DEVICE, copy=True)
    kernels.window_update(p, idx.to(DEVICE), val.to(DEVICE), block, k_init, step, betas, eps, lr, weight_decay)
    expected = p0.clone()
    positions = idx.long() + topk.block_starts(topk.topk_blocks(n, block, k_init))
    apply_window_update_(expected, positions, val, window_weights(step, m, betas), eps, lr, weight_decay,
                         torch.zeros(2, n))
    assert torch.equal(p.cpu(), expected)


# -- whole steps --------------------------------------------------------------------------------------------
def _fresh_state(n: int, hp: dict, device) -> dict[str, torch.Tensor]:
    """MicroAdam's state of a fresh tensor of n entries (shapes as MicroAdam._init_state)."""
    k_total = topk.topk_blocks(n, hp["topk_block_size"], hp["k_init"]).k_total
    buckets = quant.num_buckets(n, hp["quant_block_size"])
    return {"window_indices": torch.zeros(hp["m"], k_total, dtype=torch.int16, device=device),
            "window_values": torch.zeros(hp["m"], k_total, dtype=torch.bfloat16, device=device),
            "ef_codes": torch.zeros((n + 1) // 2, dtype=torch.uint8, device=device),
            "ef_min": torch.zeros(buckets, dtype=torch.bfloat16, device=device),
            "ef_max": torch.zeros(buckets, dtype=torch.bfloat16, device=device)}


def _triton_step(p: torch.Tensor, grad: torch.Tensor, state: dict, hp: dict, step: int) -> None:
    """How MicroAdam calls the Triton step: tensors and plain numbers."""
    kernels.sparse_window_step_triton(p, grad, *(state[key] for key in STATE_KEYS), step=step, lr=hp["lr"],
                                  betas=hp["betas"], eps=hp["eps"], weight_decay=hp["weight_decay"], m=hp["m"],
                                  k_init=hp["k_init"], topk_block_size=hp["topk_block_size"],
                                  quant_block_size=hp["quant_block_size"])


def _compare_steps(w: torch.Tensor, hp: dict, steps: int, seed: int, lr_tensor: bool = False) -> None:
    """``steps`` steps of the torch path (MicroAdam, backend "torch", on CPU) and of the Triton step on DEVICE
    from the same tensor and gradients: state and parameters bit-equal after every step."""
    ref = w.clone().requires_grad_()
    opt = MicroAdam([ref], backend="torch", **hp)
    p = w.to(DEVICE, copy=True)
    state = _fresh_state(w.numel(), opt.defaults, DEVICE)
    triton_hp = dict(opt.defaults, lr=torch.tensor(hp["lr"]) if lr_tensor else hp["lr"])
    g = torch.Generator().manual_seed(seed)
    for step in range(1, steps + 1):
        grad = torch.randn(w.shape, generator=g).to(w.dtype)
        ref.grad = grad.clone()
        opt.step()
        _triton_step(p, grad.to(DEVICE), state, triton_hp, step)
        for key in STATE_KEYS:
            assert torch.equal(state[key].cpu(), opt.state[ref][key]), (step, key)
        assert torch.equal(p.cpu(), ref.detach()), step


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("weight_decay", [0.0, 0.1])
def test_steps_match_torch_path(dtype, weight_decay, ieee_sqrt):
    torch.manual_seed(7)
    w = torch.randn(233, 3).to(dtype)  # 699 entries: 2 blocks of 256 + a tail; buckets of 64 + a tail
    hp = dict(lr=1e-2, weight_decay=weight_decay, m=2, k_init=0.03, topk_block_size=256)
    _compare_steps(w, hp, steps=4, seed=1, lr_tensor=weight_decay > 0)  # past m: the ring wraps


def _repeat_step(n: int, hp: dict, step: int, runs: int) -> None:
    """``runs`` Triton steps from one and the same (random, valid) state with bf16 parameters: p and the
    state must come out bit-equal each time."""
    idx, val = _random_window(n, hp["topk_block_size"], hp["k_init"], hp["m"], seed=3)
    base = _fresh_state(n, hp, "cpu")
    base["window_indices"], base["window_values"] = idx, val
    base["ef_codes"] = torch.randint(0, 256, base["ef_codes"].shape, generator=torch.Generator().manual_seed(6),
                                     dtype=torch.uint8)
    base["ef_min"].fill_(-1e-3)
    base["ef_max"].fill_(1e-3)
    p0 = torch.randn(n, generator=torch.Generator().manual_seed(4)).to(torch.bfloat16)
    grad = (torch.randn(n, generator=torch.Generator().manual_seed(5)) * 1e-2).to(torch.bfloat16)
    outputs = []
    for _ in range(runs):
        p, state = p0.to(DEVICE, copy=True), {key: value.to(DEVICE, copy=True) for key, value in base.items()}
        _triton_step(p, grad.to(DEVICE), state, hp, step)
        outputs.append([p.cpu()] + [state[key].cpu() for key in STATE_KEYS])
    for other in outputs[1:]:
        assert all(torch.equal(x, y) for x, y in zip(outputs[0], other))


@pytest.mark.parametrize("weight_decay", [0.0, 0.01])
def test_step_is_deterministic_bf16(weight_decay):
    """The H200 run found bf16 steps differing between identical runs (a read-after-write race in the old
    window kernel). Positions shared by many rows (k_init 0.3, m 4) make that likeliest."""
    hp = dict(lr=1e-3, betas=(0.9, 0.999), eps=1e-8, weight_decay=weight_decay, m=4, k_init=0.3,
              topk_block_size=4096, quant_block_size=64)
    _repeat_step(2 * 4096 + 100, hp, step=7, runs=2)


# -- GPU only -----------------------------------------------------------------------------------------------
@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
@pytest.mark.parametrize("weight_decay", [0.0, 0.01])
def test_gpu_step_is_deterministic_at_scale(weight_decay):
    """As race_probe.py (h200-2026-11-30): 1,000,003 bf16 entries, MicroAdam's defaults, three runs."""
    hp = dict(lr=1e-3, betas=(0.9, 0.999), eps=1e-8, weight_decay=weight_decay, m=10, k_init=0.01,
              topk_block_size=4096, quant_block_size=64)
    _repeat_step(1_000_003, hp, step=25, runs=3)


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
@pytest.mark.parametrize("block,weight_decay", [(4096, 0.0), (32768, 0.01)])
def test_gpu_kernels_follow_torch_path_at_scale(block, weight_decay, ieee_sqrt):
    """The compiled kernels at 1M entries (block 32768: the tiled Top-K, whose one-tile predecessor did not
    compile in 90 s) against the CPU torch path: bit-equal, as under the interpreter."""
    torch.manual_seed(8)
    w = torch.randn(1_000_003)
    hp = dict(lr=1e-3, weight_decay=weight_decay, topk_block_size=block)
    _compare_steps(w, hp, steps=3, seed=9)


# -- the group launches -------------------------------------------------------------------------------------
# MicroAdam steps the plain tensors of a group on the Triton path together (ops.sparse_window_triton.SparseWindowStep:
# a check, a fused compression and a window update, each one launch for all of them). Held bit for bit to the
# torch path on CPU, tensor by tensor. Sizes for Top-K blocks of 256 and buckets of 64: smaller than a block
# (50; 1; 130, which ends in a partial bucket), odd with a partial last block (33 x 17 = 561 = 2 blocks + 49),
# whole blocks (512), a partial last block and bucket (700).
GROUP_SHAPES = [(33, 17), (50,), (512,), (1,), (700,), (130,)]
GROUP_HP = dict(lr=1e-2, m=3, k_init=0.05, topk_block_size=256)


def _twins(shapes, dtypes, hp, seed=0, **options):
    """The same tensors for the torch path (CPU) and the group launches (DEVICE), and their optimizers."""
    g = torch.Generator().manual_seed(seed)
    ws = [torch.randn(s, generator=g).to(dt) for s, dt in zip(shapes, dtypes)]
    ref = [w.clone().requires_grad_() for w in ws]
    tri = [w.to(DEVICE, copy=True).requires_grad_() for w in ws]
    return (ref, MicroAdam(ref, backend="torch", **hp, **options),
            tri, MicroAdam(tri, backend="triton", **hp, **options))


def _set_grads(ref, tri, g, skip=(), bad=()):
    """Fresh random gradients (None for indices in ``skip``, a NaN/inf in those of ``bad``) on both sides."""
    for i, (a, b) in enumerate(zip(ref, tri)):
        if i in skip:
            a.grad = b.grad = None
            continue
        grad = torch.randn(a.shape, generator=g).to(a.dtype)
        if i in bad:
            grad.view(-1)[grad.numel() // 2] = float("nan") if i % 2 else float("inf")
        a.grad, b.grad = grad.clone(), grad.to(DEVICE, copy=True)


def _assert_twins(ref, ref_opt, tri, tri_opt, where):
    for i, (a, b) in enumerate(zip(ref, tri)):
        assert torch.equal(b.detach().cpu(), a.detach()), (where, i)
        sa, sb = ref_opt.state.get(a), tri_opt.state.get(b)
        assert bool(sa) == bool(sb), (where, i)
        if sa:
            for key in STATE_KEYS:
                assert torch.equal(sb[key].cpu(), sa[key]), (where, i, key)
            assert float(sb["step"]) == float(sa["step"]), (where, i)


def _uses_group_launches(opt) -> int:
    """Tensors stepped by the group launches (0: the one-tensor path)."""
    return sum(len(b.params) for e in opt.__dict__.get("_triton_groups", {}).values() if e.batches
               for b in e.batches.batches)


@pytest.mark.parametrize("dtype,weight_decay,lr_tensor", [
    (torch.float32, 0.0, False), (torch.float32, 0.1, True), (torch.bfloat16, 0.0, True),
    (torch.bfloat16, 0.1, False)])
def test_group_steps_match_torch_path(dtype, weight_decay, lr_tensor, ieee_sqrt):
    """Six tensors of one group, 5 steps with m = 3 (the ring wraps): parameters, every state tensor and the
    step counters bit-equal to the torch path after every step. A tensor lr changes in place between steps,
    as a scheduler's would (read on the device, no host sync)."""
    hp = dict(GROUP_HP, weight_decay=weight_decay)
    ref, ref_opt, tri, tri_opt = _twins(GROUP_SHAPES, [dtype] * len(GROUP_SHAPES), hp)
    if lr_tensor:
        ref_opt.param_groups[0]["lr"] = torch.tensor(1e-2)
        tri_opt.param_groups[0]["lr"] = torch.tensor(1e-2, device=DEVICE)
    g = torch.Generator().manual_seed(1)
    for step in range(5):
        if lr_tensor:
            for opt in (ref_opt, tri_opt):
                opt.param_groups[0]["lr"].fill_(1e-2 * (0.9 ** step))
        _set_grads(ref, tri, g)
        ref_opt.step()
        tri_opt.step()
        _assert_twins(ref, ref_opt, tri, tri_opt, step)
    assert _uses_group_launches(tri_opt) == len(GROUP_SHAPES)


def test_group_blocks_longer_than_a_tile(ieee_sqrt):
    """Blocks of 8192 > TILE_MAX: the fused pass walks them in tiles (a recomputed per pass); a tensor of one
    full and one partial multi-tile block, one of a single partial block > 4096, and a small one."""
    hp = dict(lr=1e-3, m=2, k_init=0.01, topk_block_size=8192, weight_decay=0.01)
    shapes = [(8192 + 5000,), (4100,), (300,)]
    ref, ref_opt, tri, tri_opt = _twins(shapes, [torch.float32] * 3, hp, seed=2)
    g = torch.Generator().manual_seed(3)
    for step in range(3):
        _set_grads(ref, tri, g)
        ref_opt.step()
        tri_opt.step()
        _assert_twins(ref, ref_opt, tri, tri_opt, step)


def test_group_mixed_dtypes_and_missing_gradients(ieee_sqrt):
    """fp32, bf16 and fp16 tensors in one group (one batch per dtype); tensors without a gradient at some
    steps keep their own step counters and ring rows, as on the torch path."""
    shapes = [(40, 7), (300,), (90,), (64,)]
    dtypes = [torch.float32, torch.bfloat16, torch.float16, torch.float32]
    ref, ref_opt, tri, tri_opt = _twins(shapes, dtypes, dict(GROUP_HP, weight_decay=0.05), seed=4)
    g = torch.Generator().manual_seed(5)
    for step in range(5):
        _set_grads(ref, tri, g, skip={0} if step in (1, 2) else {3} if step == 0 else ())
        ref_opt.step()
        tri_opt.step()
        _assert_twins(ref, ref_opt, tri, tri_opt, step)
    assert _uses_group_launches(tri_opt) == len(shapes)


@pytest.mark.parametrize("bucket", [64, 1, 2, 1024])
def test_group_sub_tiles_ties_and_bucket_sizes(bucket, ieee_sqrt):
    """Top-K blocks of 2048 (keys ranked in registers) whose selection and requantisation run over sub-tiles
    of kernels.SUB_MAX entries, with ties at the threshold across sub-tiles (integer gradients: at the first
    step a = g) and k_init 0.3 (many chosen entries per sub-tile); buckets of one entry, two (one code
    byte), 64, and 1024 (longer than a sub-tile: the sub-tile takes one whole bucket). Tensors of one partial
    block, two full blocks and a partial one, and of an odd size: bit-equal to the torch path."""
    assert 2 * kernels.SUB_MAX < 2048  # several sub-tiles per block
    hp = dict(lr=1e-2, m=2, k_init=0.3, topk_block_size=2048, quant_block_size=bucket, weight_decay=0.01)
    shapes = [(1500,), (2 * 2048 + 700,), (333,)]
    ref, ref_opt, tri, tri_opt = _twins(shapes, [torch.float32] * len(shapes), hp, seed=21)
    g = torch.Generator().manual_seed(22)
    for step in range(3):
        if step == 1:
            _set_grads(ref, tri, g)
        else:  # integers in [-3, 3]: most |a| tie
            for a, b in zip(ref, tri):
                grad = torch.randint(-3, 4, a.shape, generator=g).float()
                a.grad, b.grad = grad.clone(), grad.to(DEVICE, copy=True)
        ref_opt.step()
        tri_opt.step()
        _assert_twins(ref, ref_opt, tri, tri_opt, step)
    assert _uses_group_launches(tri_opt) == len(shapes)


def test_fifteenth_is_the_ieee_quotient():
    """The group launches compute (hi - lo) / 15 as fp32(fp64(d) * fp64(1 / 15)) (no division subroutine on
    the GPU): equal, bit for bit, to the correctly rounded fp32 quotient (numpy's, as torch's CPU division),
    for 2**22 random fp32 bit patterns, subnormals, the largest values, zeros and infinities. (All 2**32
    inputs were checked once.)"""
    rng = np.random.default_rng(0)
    bits = np.concatenate([rng.integers(0, 2**32, 2**22, dtype=np.uint64).astype(np.uint32),
                           np.arange(0, 2**16, dtype=np.uint32),  # subnormals near 0
                           np.uint32(0x7F7FFFFF) - np.arange(2**12, dtype=np.uint32),  # the largest
                           np.array([0x80000000, 0x7F800000, 0xFF800000, 0x00800000], dtype=np.uint32)])
    bits = np.concatenate([bits, bits ^ np.uint32(0x80000000)])  # both signs
    d = bits.view(np.float32)
    finite = np.isfinite(d)
    d = d[finite | np.isinf(d)]
    with np.errstate(all="ignore"):
        expected = d / np.float32(15.0)
        got = (d.astype(np.float64) * (1.0 / 15.0)).astype(np.float32)
    assert np.array_equal(expected.view(np.uint32), got.view(np.uint32))


class _HostSyncs:
    """Counts reads of tensor values into Python (item, tolist), while in use (a context of its own)."""

    def __init__(self):
        self.count = 0
        self.patch = pytest.MonkeyPatch()

    def __enter__(self):
        for name in ("item", "tolist"):
            original = getattr(torch.Tensor, name)

            def counted(tensor, *args, _original=original, **kwargs):
                self.count += 1
                return _original(tensor, *args, **kwargs)

            self.patch.setattr(torch.Tensor, name, counted)
        return self

    def __exit__(self, *exc):
        self.patch.undo()


def test_group_skip_masks_on_the_device(ieee_sqrt):
    """nonfinite="skip": a tensor with NaN/inf in its gradient is left alone, state and step counter included,
    by the group launches themselves, with no host sync; the others step as on the torch path."""
    ref, ref_opt, tri, tri_opt = _twins(GROUP_SHAPES, [torch.float32] * len(GROUP_SHAPES), GROUP_HP,
                                        nonfinite="skip")
    g = torch.Generator().manual_seed(6)
    for step in range(6):
        bad = {1, 4} if step in (2, 3) else {2} if step == 4 else ()
        _set_grads(ref, tri, g, bad=bad)
        frozen = {i: (tri[i].detach().clone(), {k: v.clone() for k, v in tri_opt.state[tri[i]].items()})
                  for i in bad}
        ref_opt.step()
        with _HostSyncs() as syncs:
            tri_opt.step()
        if step:  # (the first one reads the new counters, on CPU, before moving them to the device)
            assert syncs.count == 0, step
        _assert_twins(ref, ref_opt, tri, tri_opt, step)
        for i, (p, state) in frozen.items():
            assert torch.equal(tri[i], p)
            assert all(torch.equal(tri_opt.state[tri[i]][k], v) for k, v in state.items())


def test_group_first_step_makes_counters_on_the_device_without_reads():
    """A fresh optimizer's first step (nonfinite="skip", so the check needs no read either) creates every step
    counter on the tensors' device, a 0-d fp32 tensor of its own, and reads nothing back to the host: before,
    each new counter was read (``.item()``) and copied to the device one by one (219 blocking copies at 1b)."""
    shapes = GROUP_SHAPES
    _, _, tri, tri_opt = _twins(shapes, [torch.float32] * len(shapes), GROUP_HP, seed=23, nonfinite="skip")
    g = torch.Generator().manual_seed(24)
    for p in tri:
        p.grad = torch.randn(p.shape, generator=g).to(DEVICE)
    with _HostSyncs() as syncs:
        tri_opt.step()
    assert syncs.count == 0
    counters = [tri_opt.state[p]["step"] for p in tri]
    assert all(c.device == tri[0].device and c.dtype == torch.float32 and c.dim() == 0 for c in counters)
    assert len({c.data_ptr() for c in counters}) == len(counters)
    assert [float(c) for c in counters] == [1.0] * len(counters)
    assert _uses_group_launches(tri_opt) == len(shapes)


def _stepped_and_saved(shapes, hp, *, seed, steps, grad_steps, **kwargs):
    """Group-launch fp32 tensors of ``shapes`` after ``steps`` steps on seeded gradients (``grad_steps`` of them made,
    the rest for the caller), and a copy of the optimizer's state dict then."""
    _, _, tri, tri_opt = _twins(shapes, [torch.float32] * len(shapes), hp, seed=seed, **kwargs)
    g = torch.Generator().manual_seed(seed + 1)
    grads = [[torch.randn(s, generator=g) for s in shapes] for _ in range(grad_steps)]
    for step in range(steps):
        for p, grad in zip(tri, grads[step]):
            p.grad = grad.to(DEVICE)
        tri_opt.step()
    return tri, tri_opt, grads, copy.deepcopy(tri_opt.state_dict())


def test_group_loaded_counters_are_read_once(ieee_sqrt):
    """After load_state_dict the counters come from elsewhere: the first step reads them back once for all
    tensors (one ``.item()``, not one per tensor), and the run continues as the uninterrupted one."""
    hp = dict(GROUP_HP, m=2)
    shapes = GROUP_SHAPES
    tri, tri_opt, grads, saved = _stepped_and_saved(shapes, hp, seed=25, steps=2, grad_steps=4, nonfinite="skip")
    resumed = [p.detach().clone().requires_grad_() for p in tri]
    resumed_opt = MicroAdam(resumed, backend="triton", nonfinite="skip", **hp)
    resumed_opt.load_state_dict(saved)
    for step in range(2, 4):
        for params in (tri, resumed):
            for p, grad in zip(params, grads[step]):
                p.grad = grad.to(DEVICE)
        tri_opt.step()
        with _HostSyncs() as syncs:
            resumed_opt.step()
        assert syncs.count == (1 if step == 2 else 0), step
        for a, b in zip(tri, resumed):
            assert torch.equal(a, b), step
            assert all(torch.equal(tri_opt.state[a][k], resumed_opt.state[b][k]) for k in tri_opt.state[a])
    assert [float(resumed_opt.state[p]["step"]) for p in resumed] == [4.0] * len(shapes)


def test_group_raise_changes_nothing():
    """nonfinite="raise": the flags are read back once, the tensor named, nothing updated, no state made."""
    ws = [torch.randn(300), torch.randn(40, 5)]
    params = [w.to(DEVICE, copy=True).requires_grad_() for w in ws]
    opt = MicroAdam([("first", params[0]), ("second", params[1])], backend="triton", nonfinite="raise",
                    **GROUP_HP)
    params[0].grad = torch.randn(300, device=DEVICE)
    params[1].grad = torch.randn(40, 5, device=DEVICE)
    params[1].grad[3, 2] = float("nan")
    with pytest.raises(FloatingPointError, match="second"):
        opt.step()
    assert len(opt.state) == 0
    assert all(torch.equal(p.detach().cpu(), w) for p, w in zip(params, ws))
    params[1].grad[3, 2] = 0.0
    opt.step()
    before = [p.detach().clone() for p in params]
    state = {k: v.clone() for k, v in opt.state[params[0]].items()}
    params[0].grad[0] = float("inf")
    with pytest.raises(FloatingPointError, match="first"):
        opt.step()
    assert all(torch.equal(p, b) for p, b in zip(params, before))
    assert all(torch.equal(opt.state[params[0]][k], v) for k, v in state.items())
    params[0].grad[0] = 0.0
    opt.step()  # the flags of the failed check do not leak into the next step
    assert float(opt.state[params[0]]["step"]) == float(opt.state[params[1]]["step"]) == 2


def test_group_state_dict_round_trip(ieee_sqrt):
    """Save after 3 steps, load into a fresh group-launch optimizer and into a torch-path one (on CPU): both
    continue bit-identically to the run that was never interrupted."""
    hp = dict(GROUP_HP, weight_decay=0.1, m=2)
    shapes = GROUP_SHAPES[:4]
    tri, tri_opt, grads, saved = _stepped_and_saved(shapes, hp, seed=7, steps=3, grad_steps=6)
    resumed = [p.detach().clone().requires_grad_() for p in tri]
    resumed_opt = MicroAdam(resumed, backend="triton", **hp)
    resumed_opt.load_state_dict(saved)
    on_cpu = [p.detach().cpu().clone().requires_grad_() for p in tri]
    cpu_opt = MicroAdam(on_cpu, backend="torch", **hp)
    cpu_opt.load_state_dict(saved)
    for step in range(3, 6):
        for params in (tri, resumed, on_cpu):
            for p, grad in zip(params, grads[step]):
                p.grad = grad.to(p.device)
        for opt in (tri_opt, resumed_opt, cpu_opt):
            opt.step()
        _assert_twins(on_cpu, cpu_opt, tri, tri_opt, step)
        _assert_twins(on_cpu, cpu_opt, resumed, resumed_opt, step)


@pytest.mark.parametrize("weight_decay", [0.0, 0.01])
def test_group_step_is_deterministic_bf16(weight_decay):
    """Two runs from the same tensors and gradients: bit-equal parameters and state (bf16, positions shared
    by many rows: k_init 0.3, m 4)."""
    hp = dict(lr=1e-3, m=4, k_init=0.3, topk_block_size=512, weight_decay=weight_decay)
    shapes = [(2 * 512 + 100,), (70,)]
    runs = []
    for _ in range(2):
        _, _, tri, opt = _twins(shapes, [torch.bfloat16] * 2, hp, seed=9)
        g = torch.Generator().manual_seed(10)
        for _ in range(5):
            for p in tri:
                p.grad = (torch.randn(p.shape, generator=g) * 1e-2).to(torch.bfloat16).to(DEVICE)
            opt.step()
        runs.append([p.detach().cpu() for p in tri] + [v.cpu() for p in tri for v in opt.state[p].values()])
    assert all(torch.equal(x, y) for x, y in zip(*runs))


def test_group_layouts_the_fused_pass_does_not_take_use_the_one_tensor_path(ieee_sqrt):
    """Buckets that are not a power of two (or do not tile a Top-K block) go tensor by tensor, as before."""
    assert not kernels.group_sizes_supported(256, 48) and not kernels.group_sizes_supported(96, 64)
    assert kernels.group_sizes_supported(4096, 64) and kernels.group_sizes_supported(256, 1)
    hp = dict(GROUP_HP, quant_block_size=48)
    ref, ref_opt, tri, tri_opt = _twins(GROUP_SHAPES[:2], [torch.float32] * 2, hp, seed=11)
    g = torch.Generator().manual_seed(12)
    for step in range(2):
        _set_grads(ref, tri, g)
        ref_opt.step()
        tri_opt.step()
        _assert_twins(ref, ref_opt, tri, tri_opt, step)
    assert _uses_group_launches(tri_opt) == 0


def test_bias_correction_table_matches_window_weights():
    """The kernels' weights, fp32(beta**age) * fp32(c(step)) from SparseWindowStep's table, are window_weights."""
    runner = kernels.SparseWindowStep([10], "cpu", torch.float32, m=4, k_init=0.5, topk_block_size=8,
                                     quant_block_size=2)
    for betas in [(0.9, 0.999), (0.0, 0.5), (0.95, 0.99999)]:
        runner.bound = 3000
        table, c_last = runner._weights_table(betas)
        m = 4
        for step in (1, 2, 3, 4, 5, 17, 1000, 2999):
            ci = min(step, c_last)
            newest = (step - 1) % m
            for which in range(2):
                pw, c = table[which * m: (which + 1) * m], table[2 * m + which * (c_last + 1) + ci]
                mine = torch.tensor([float(pw[(newest - r) % m] * c) if r < step else 0.0 for r in range(m)])
                assert torch.equal(mine, window_weights(step, m, betas)[which]), (betas, step, which)
    assert kernels._saturation(0.999) == next(s for s in range(1, 10**6) if 1 - 0.999**s == 1.0)


# -- GPU only: the group launches at scale ------------------------------------------------------------------
@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
@pytest.mark.parametrize("dtype,block,weight_decay", [(torch.float32, 4096, 0.0), (torch.bfloat16, 4096, 0.01),
                                                     (torch.float32, 32768, 0.01)])
def test_gpu_group_follows_torch_path_at_scale(dtype, block, weight_decay, ieee_sqrt):
    """Compiled group kernels on ~1.1M entries in 4 tensors (one below a block, one with a partial last
    block), against the CPU torch path: bit-equal."""
    shapes = [(1000, 1003), (3 * block + 5,), (77,), (256, 300)]
    hp = dict(lr=1e-3, weight_decay=weight_decay, topk_block_size=block)
    ref, ref_opt, tri, tri_opt = _twins(shapes, [dtype] * 4, hp, seed=13)
    g = torch.Generator().manual_seed(14)
    for step in range(3):
        _set_grads(ref, tri, g)
        ref_opt.step()
        tri_opt.step()
        _assert_twins(ref, ref_opt, tri, tri_opt, step)
    assert _uses_group_launches(tri_opt) == 4


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_gpu_group_step_has_no_host_sync_and_is_deterministic():
    """nonfinite="skip", tensor lr: no CUDA sync at all, the first step (which makes the state and the step
    counters) included (torch's sync debug mode raises on one); bf16 with weight decay, two runs bit-equal."""
    runs = []
    for _ in range(2):
        torch.manual_seed(15)
        params = [torch.randn(s, device="cuda").to(torch.bfloat16).requires_grad_() for s in [(1_000_003,), (513, 77)]]
        opt = MicroAdam(params, lr=torch.tensor(1e-3, device="cuda"), weight_decay=0.01, nonfinite="skip")
        for _ in range(4):
            for p in params:
                p.grad = torch.randn_like(p) * 1e-2
            torch.cuda.set_sync_debug_mode("error")
            try:
                opt.step()
            finally:
                torch.cuda.set_sync_debug_mode("default")
        runs.append([p.detach().cpu() for p in params] + [v.cpu() for p in params for v in opt.state[p].values()])
    assert all(torch.equal(x, y) for x, y in zip(*runs))


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_gpu_counters_loaded_on_the_host_reach_the_device_without_a_sync():
    """A state dict saved to the host (torch.save's usual map_location="cpu") loaded into a CUDA optimizer:
    its step counters are read on the host and uploaded in one pinned non-blocking copy, so the first step
    after loading syncs nothing either; the run continues as the uninterrupted one."""
    torch.manual_seed(27)
    params = [torch.randn(s, device="cuda").requires_grad_() for s in [(300_001,), (257, 33)]]
    opt = MicroAdam(params, lr=1e-3, nonfinite="skip")
    grads = [[torch.randn_like(p) * 1e-2 for p in params] for _ in range(3)]
    for step in range(2):
        for p, grad in zip(params, grads[step]):
            p.grad = grad
        opt.step()
    on_host = {"state": {i: {k: v.cpu() for k, v in s.items()} for i, s in opt.state_dict()["state"].items()},
               "param_groups": copy.deepcopy(opt.state_dict()["param_groups"])}
    resumed = [p.detach().clone().requires_grad_() for p in params]
    resumed_opt = MicroAdam(resumed, lr=1e-3, nonfinite="skip")
    resumed_opt.load_state_dict(on_host)
    for ps in (params, resumed):
        for p, grad in zip(ps, grads[2]):
            p.grad = grad
    opt.step()
    torch.cuda.set_sync_debug_mode("error")
    try:
        resumed_opt.step()
    finally:
        torch.cuda.set_sync_debug_mode("default")
    assert all(torch.equal(a, b) for a, b in zip(params, resumed))
    assert all(resumed_opt.state[p]["step"].is_cuda for p in resumed)


@pytest.mark.parametrize("tensors", [1, 3], ids=["one-tensor", "group"])
def test_window_bias_correction_triton_equals_torch(tensors, ieee_sqrt):
    """The Triton paths (one tensor; the group launches) compute the window mode's corrections as the torch
    path does: bit-equal after the window has filled and wrapped (CPU tensors, Triton's interpreter)."""
    torch.manual_seed(0)
    sizes = [300, 97, 1000][:tensors]
    results = []
    for backend in ("torch", "triton"):
        params = [torch.nn.Parameter(torch.zeros(n)) for n in sizes]
        opt = slimopt.MicroAdam([(f"w{i}", p) for i, p in enumerate(params)], lr=1e-2, m=3, k_init=0.1,
                                topk_block_size=64, bias_correction="window", backend=backend)
        generator = torch.Generator().manual_seed(1)
        for _ in range(7):
            for p in params:
                p.grad = torch.randn(p.shape, generator=generator)
            opt.step()
        results.append([p.detach().clone() for p in params])
    for a, b in zip(*results):
        assert torch.equal(a, b)
