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
"""

from __future__ import annotations

import ast
import inspect

import numpy as np
import pytest
import torch

triton = pytest.importorskip("triton")

import slimopt.ops.microadam_triton as kernels  # noqa: E402
from slimopt import MicroAdam  # noqa: E402
from slimopt.ops import quant, topk  # noqa: E402
from slimopt.ops.microadam_window import apply_window_update_, window_weights  # noqa: E402

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
    """The kernel module imports nothing from slimopt.microadam (no import circle), and the step takes
    numbers and tensors only."""
    tree = ast.parse(inspect.getsource(kernels))
    imported = {node.module for node in ast.walk(tree) if isinstance(node, ast.ImportFrom)}
    assert "microadam" not in imported and "slimopt.microadam" not in imported
    params = inspect.signature(kernels.microadam_step_triton).parameters
    assert "state" not in params and "group" not in params


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
    layout = topk.block_layout(n, block, k_init)
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
    layout = topk.block_layout(n, block, k_init)
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
    positions = idx.long() + topk.block_starts(topk.block_layout(n, block, k_init))
    apply_window_update_(expected, positions, val, window_weights(step, m, betas), eps, lr, weight_decay,
                         torch.zeros(2, n))
    assert torch.equal(p.cpu(), expected)


# -- whole steps --------------------------------------------------------------------------------------------
def _fresh_state(n: int, hp: dict, device) -> dict[str, torch.Tensor]:
    """MicroAdam's state of a fresh tensor of n entries (shapes as MicroAdam._init_state)."""
    k_total = topk.block_layout(n, hp["topk_block_size"], hp["k_init"]).k_total
    buckets = quant.num_buckets(n, hp["quant_block_size"])
    return {"window_indices": torch.zeros(hp["m"], k_total, dtype=torch.int16, device=device),
            "window_values": torch.zeros(hp["m"], k_total, dtype=torch.bfloat16, device=device),
            "ef_codes": torch.zeros((n + 1) // 2, dtype=torch.uint8, device=device),
            "ef_min": torch.zeros(buckets, dtype=torch.bfloat16, device=device),
            "ef_max": torch.zeros(buckets, dtype=torch.bfloat16, device=device)}


def _triton_step(p: torch.Tensor, grad: torch.Tensor, state: dict, hp: dict, step: int) -> None:
    """How MicroAdam calls the Triton step: tensors and plain numbers."""
    kernels.microadam_step_triton(p, grad, *(state[key] for key in STATE_KEYS), step=step, lr=hp["lr"],
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
