"""Adam-mini's Triton path (``ops.block_moments_triton``, three launches per group on CUDA) against its references.

On CPU the kernels run under Triton's interpreter (tests/conftest.py sets TRITON_INTERPRET=1), forced with
``backend="triton"``; on a GPU the same tests run the compiled kernels (``backend="auto"`` picks them for CUDA
tensors), and the tests marked ``gpu`` run only there.

References: the torch multi-tensor step (``blockstats.block_adam_foreach``, itself held to the per-tensor step in
tests/test_adam_mini.py) on the same tensors, and the float64 per-tensor reference.

How exact, and why these tolerances:

* ``m`` and the step counters are bit-equal to the torch step on every device. The kernels launch with
  ``enable_fp_fusion=False`` and write the one multiply-add torch fuses in the lerp as ``tl.fma``, as torch's
  vectorised CPU lerp and nvcc's contraction of its CUDA lerp compute it.
* ``v``: the block sums of g² are formed in another order (row sums over lanes and a tree, against torch's
  vector norm, whose sqrt-then-square also rounds), so v agrees to float32 rounding of positive sums: a
  relative 1e-5 covers sums of up to ~10^4 terms here (a few ulps in practice, ~1e-7). The order of the sums
  is the interpreter's on CPU and the compiled kernel's on a GPU: the same bound holds for both.
* ``p``: the update uses the same operations in the same order as the torch step (p * fp32(1 - lr wd), then
  fma(-m, r, p)), so p differs only through r: r ~ 1/sqrt(v) differs by at most half of v's relative difference
  (and torch's vectorised CPU sqrt is itself 1 ulp off on some inputs, while the kernels' sqrt_rn is IEEE). Two
  roundings of values that differ by that little land on the same or on neighbouring numbers, so after one step
  from the same state p agrees to one ulp of p (2^-23 relative in fp32, 2^-7 in bf16: the spacing of neighbours
  is at most that times the smaller one) plus lr x 2^-18 (a few float32 ulps of an update of up to ~16 lr, for
  results that cancel to near zero). The tests therefore step in lockstep: before each step the torch side
  gets the kernels' state (p, m, v, step), so every step is checked from the same state and errors do not
  compound (over several steps a rounding difference at a large |p| stays when p later moves near zero, so a
  bound relative to the final value would not hold). A GPU that runs torch's step with FMAs computes the same
  FMAs.
* bf16 parameters of 0 dimensions: torch's step multiplies p by a 0-d float32 rate there, and a 0-d tensor does
  not take part in type promotion, so torch rounds the rate to bf16 first (and, in the multi-tensor step, does so
  for every whole tensor of a group that holds a 0-d parameter). The kernels keep it float32, as the float64
  reference does: bf16 comparisons with the torch step leave 0-d parameters out, the float64 reference covers
  them.
"""

from __future__ import annotations

import copy

import pytest
import torch

from slimopt import AdamMini

triton = pytest.importorskip("triton")

from slimopt.ops.block_moments_triton import BlockMomentsStep, contiguous_blocks  # noqa: E402
from slimopt.ops.blockstats import (  # noqa: E402
    block_adam_foreach,
    block_adam_step_reference,
    block_state_shape,
)
from test_adam_mini import MIXED, MIXED_KW, mixed_overrides  # noqa: E402

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"
BACKEND = "auto" if DEVICE == "cuda" else "triton"

# Every layout the kernels take, with sizes that reach each loop and tile edge: rows wider than a column tile
# (300 > 256), more rows than one program of blocks holds (1100 > 1024), heads of more rows than a unit tile
# (40 > 32), fused qkv cut into segments, whole tensors of one element, of one row and of several rows (5000 >
# 4096: a ragged last row), a 4-D convolution's rows.
SPANS = {
    "rows": ((12, 5), {"rule": "rows", "out_dim": 0, "n_blocks": 12, "unit": 1}),
    "rows_wide": ((3, 300), {"rule": "rows", "out_dim": 0, "n_blocks": 3, "unit": 1}),
    "rows_many": ((1100, 2), {"rule": "rows", "out_dim": 0, "n_blocks": 1100, "unit": 1}),
    "heads": ((12, 5), {"rule": "heads", "out_dim": 0, "n_blocks": 3, "unit": 4}),
    "heads_long": ((80, 3), {"rule": "heads", "out_dim": 0, "n_blocks": 2, "unit": 40}),
    "qkv_grouped": ((16, 3), {"rule": "qkv", "out_dim": 0, "n_blocks": 2 * (3 + 2),
                              "segments": [[0, 6, 2], [6, 2, 1], [8, 6, 2], [14, 2, 1]]}),
    "whole": ((6, 7), {"rule": "whole", "out_dim": 0, "n_blocks": 1}),
    "whole_ragged": ((5000,), {"rule": "whole", "out_dim": 0, "n_blocks": 1}),
    "whole_scalar": ((), {"rule": "whole", "out_dim": 0, "n_blocks": 1}),
    "conv4d_rows": ((6, 2, 3, 3), {"rule": "rows", "out_dim": 0, "n_blocks": 6, "unit": 1}),
}
HP = {"lr": 1e-2, "beta1": 0.9, "beta2": 0.95, "eps": 1e-8}


def _tensors(cases, dtype, gen, moment_dtype=None):
    shapes = [SPANS[c][0] for c in cases]
    params = [torch.randn(s, generator=gen).to(dtype).to(DEVICE) for s in shapes]
    moments = [torch.zeros_like(p, dtype=moment_dtype or dtype) for p in params]
    seconds = [torch.zeros(block_state_shape(SPANS[c][1], SPANS[c][0]), device=DEVICE) for c in cases]
    steps = [torch.zeros((), device=DEVICE) for _ in cases]
    return params, moments, seconds, steps


def _clone(tensors):
    return [[t.clone() for t in group] for group in tensors]


def assert_states_agree(name, got, want, *, lr):
    """(p, m, v, step) after one step from the same state, the kernels' against the torch step's (module
    docstring)."""
    (p, m, v, t), (p_ref, m_ref, v_ref, t_ref) = got, want
    assert int(t) == int(t_ref), name
    assert torch.equal(m, m_ref), name
    torch.testing.assert_close(v, v_ref, rtol=1e-5, atol=0, msg=name)
    ulp = 2.0**-7 if p.dtype == torch.bfloat16 else 2.0**-23
    torch.testing.assert_close(p, p_ref, rtol=ulp, atol=lr * 2.0**-18, msg=name)


def sync(source, target):
    """Give ``target``'s tensors ``source``'s values (lockstep: the next step starts from the same state)."""
    for group_a, group_b in zip(source, target):
        for a, b in zip(group_a, group_b):
            b.copy_(a)


# --------------------------------------------------------------------------------------------------
# layouts


def test_contiguous_blocks_cut_rows_into_spans_and_refuse_the_rest():
    assert contiguous_blocks((12, 5), SPANS["rows"][1]) == [(0, 60, 12, 5, 1)]
    assert contiguous_blocks((12, 5), SPANS["heads"][1]) == [(0, 60, 12, 5, 4)]
    assert contiguous_blocks((16, 3), SPANS["qkv_grouped"][1]) == [(0, 18, 6, 3, 2), (18, 6, 2, 3, 1),
                                                                   (24, 18, 6, 3, 2), (42, 6, 2, 3, 1)]
    assert contiguous_blocks((5000,), SPANS["whole"][1]) == [(0, 5000, 2, 4096, 2)]  # one block of 2 rows
    assert contiguous_blocks((), SPANS["whole"][1]) == [(0, 1, 1, 1, 1)]
    # blocks along dim 1 (GPT-2 Conv1D), elementwise blocks, tensors without elements: the torch ops take them
    assert contiguous_blocks((5, 12), {"rule": "rows", "out_dim": 1, "n_blocks": 12, "unit": 1}) is None
    assert contiguous_blocks((10,), {"rule": "elementwise", "out_dim": 0, "n_blocks": 10}) is None
    assert contiguous_blocks((0, 4), SPANS["rows"][1]) is None
    with pytest.raises(ValueError, match="segments"):
        contiguous_blocks((16, 3), {"rule": "qkv", "out_dim": 0, "segments": [[0, 6, 4], [6, 10, 1]]})


# --------------------------------------------------------------------------------------------------
# the kernels against the torch multi-tensor step and the float64 reference


@pytest.mark.parametrize("lr_kind", ["float", "tensor"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["fp32", "bf16"])
def test_kernels_match_the_torch_step(dtype, lr_kind):
    cases = sorted(c for c in SPANS if dtype == torch.float32 or SPANS[c][0])  # bf16: no 0-d (module docstring)
    layouts = [SPANS[c][1] for c in cases]
    gen = torch.Generator().manual_seed(8)
    mine = _tensors(cases, dtype, gen)
    ref = _clone(mine)
    lr = torch.tensor(HP["lr"], device=DEVICE) if lr_kind == "tensor" else HP["lr"]
    hp = {**HP, "lr": lr}
    decays = [0.1 if i % 2 else 0.0 for i in range(len(cases))]
    step = BlockMomentsStep([SPANS[c][0] for c in cases], layouts, DEVICE, param_dtype=dtype, grad_dtype=dtype,
                            moment_dtype=dtype)
    for _ in range(4):
        grads = [torch.randn(SPANS[c][0], generator=gen).to(dtype).to(DEVICE) for c in cases]
        bad = step.check(grads)
        assert bad.dtype == torch.bool and not bad.any()
        sync(mine, ref)
        step.step(mine[0], grads, mine[1], mine[2], mine[3], weight_decays=decays, **hp)
        block_adam_foreach(ref[0], grads, ref[1], ref[2], ref[3], layouts, weight_decays=decays, **hp)
        for i, case in enumerate(cases):
            assert_states_agree(case, [x[i] for x in mine], [x[i] for x in ref], lr=HP["lr"])


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["fp32", "bf16"])
def test_kernels_against_the_float64_reference(dtype):
    cases = sorted(SPANS)
    gen = torch.Generator().manual_seed(4)
    mine = _tensors(cases, dtype, gen)
    ref = [[t.cpu() for t in group] for group in _clone(mine)]
    decays = [0.1] * len(cases)
    step = BlockMomentsStep([SPANS[c][0] for c in cases], [SPANS[c][1] for c in cases], DEVICE, param_dtype=dtype,
                            grad_dtype=dtype, moment_dtype=dtype)
    for t in range(1, 5):
        grads = [torch.randn(SPANS[c][0], generator=gen).to(dtype).to(DEVICE) for c in cases]
        step.step(mine[0], grads, mine[1], mine[2], mine[3], weight_decays=decays, **HP)
        for i, case in enumerate(cases):
            block_adam_step_reference(ref[0][i], grads[i].cpu(), ref[1][i], ref[2][i], float(t), SPANS[case][1],
                                     weight_decay=0.1, **HP)
    # as tests/test_adam_mini.py's fast-vs-reference test: v to float32 accumulation (the reference sums in
    # float64), p to that times lr plus one rounding of p in its own dtype; m is the same lerp
    tol = {"rtol": 1e-5, "atol": 1e-7} if dtype == torch.float32 else {"rtol": 1e-2, "atol": 1e-2}
    for i, case in enumerate(cases):
        assert int(mine[3][i]) == 4, case
        torch.testing.assert_close(mine[2][i].cpu(), ref[2][i], rtol=1e-5, atol=0, msg=case)
        assert torch.equal(mine[1][i].cpu(), ref[1][i]), case
        torch.testing.assert_close(mine[0][i].cpu(), ref[0][i], **tol, msg=case)


@pytest.mark.parametrize("beta1", [0.9, 0.4], ids=["lerp_small_weight", "lerp_large_weight"])
def test_kernels_with_a_bf16_moment_for_fp32_parameters(beta1):
    # m in another dtype than g (g rounded to bf16 first, as torch's g.to(m.dtype)); beta1 = 0.4 takes the other
    # branch of torch's lerp (weight 0.6 >= 0.5: g - (g - m)(1 - w))
    cases = ["rows", "heads", "whole_ragged"]
    layouts = [SPANS[c][1] for c in cases]
    gen = torch.Generator().manual_seed(5)
    mine = _tensors(cases, torch.float32, gen, moment_dtype=torch.bfloat16)
    ref = _clone(mine)
    hp = {**HP, "beta1": beta1}
    step = BlockMomentsStep([SPANS[c][0] for c in cases], layouts, DEVICE, param_dtype=torch.float32,
                            grad_dtype=torch.float32, moment_dtype=torch.bfloat16)
    for _ in range(3):
        grads = [torch.randn(SPANS[c][0], generator=gen).to(DEVICE) for c in cases]
        sync(mine, ref)
        step.step(mine[0], grads, mine[1], mine[2], mine[3], weight_decays=[0.1] * 3, **hp)
        block_adam_foreach(ref[0], grads, ref[1], ref[2], ref[3], layouts, weight_decays=[0.1] * 3, **hp)
        for i, case in enumerate(cases):
            assert mine[1][i].dtype == torch.bfloat16
            assert_states_agree(case, [x[i] for x in mine], [x[i] for x in ref], lr=HP["lr"])


@pytest.mark.filterwarnings("ignore:overflow encountered:RuntimeWarning")  # 1e20 squared, in numpy
def test_kernels_leave_a_flagged_tensor_and_its_state_alone():
    cases = ["rows", "heads", "qkv_grouped", "whole"]
    layouts = [SPANS[c][1] for c in cases]
    gen = torch.Generator().manual_seed(6)
    mine = _tensors(cases, torch.float32, gen)
    step = BlockMomentsStep([SPANS[c][0] for c in cases], layouts, DEVICE, param_dtype=torch.float32,
                            grad_dtype=torch.float32, moment_dtype=torch.float32)
    grads = [torch.randn(SPANS[c][0], generator=gen).to(DEVICE) for c in cases]
    step.step(mine[0], grads, mine[1], mine[2], mine[3], weight_decays=[0.1] * 4, **HP)
    ref = _clone(mine)
    before = _clone(mine)
    for poison in (float("nan"), float("inf")):
        grads = [torch.randn(SPANS[c][0], generator=gen).to(DEVICE) for c in cases]
        sync(mine, ref)
        grads[2].view(-1)[-1] = poison
        grads[3].view(-1)[0] = 1e20  # finite: its square overflows, the tensor still steps (as the torch step)
        flags = step.check(grads)
        assert flags.tolist() == [False, False, True, False]
        step.step(mine[0], grads, mine[1], mine[2], mine[3], weight_decays=[0.1] * 4, **HP)
        keep = [0, 1, 3]
        p_ref, m_ref, v_ref, t_ref = ([x[i] for i in keep] for x in ref)
        block_adam_foreach(p_ref, [grads[i] for i in keep], m_ref, v_ref, t_ref, [layouts[i] for i in keep],
                          weight_decays=[0.1] * 3, **HP)
        for group, old in zip(mine, before):  # the flagged tensor: p, m, v and its counter untouched
            assert torch.equal(group[2], old[2])
        assert torch.isinf(mine[2][3]).all() and int(mine[3][3]) == int(mine[3][0]) == int(ref[3][0])
        for i in keep:
            assert_states_agree(cases[i], [x[i] for x in mine], [x[i] for x in ref], lr=HP["lr"])
    # the flags of the next step start clean (each step's row is cleared by the step before)
    grads = [torch.randn(SPANS[c][0], generator=gen).to(DEVICE) for c in cases]
    assert not step.check(grads).any()


def test_kernels_refuse_what_does_not_fit_their_tables():
    step = BlockMomentsStep([(12, 5)], [SPANS["rows"][1]], DEVICE, param_dtype=torch.float32,
                            grad_dtype=torch.float32, moment_dtype=torch.float32)
    with pytest.raises(ValueError, match="gradient 0"):
        step.check([torch.zeros(5, 12, device=DEVICE).t()])  # not contiguous
    with pytest.raises(ValueError, match="exp_avg_sq 0"):
        zeros = [[torch.zeros(12, 5, device=DEVICE)] for _ in range(3)]
        step.step(*zeros, [torch.zeros(3, device=DEVICE)], [torch.zeros((), device=DEVICE)], weight_decays=[0.0],
                  **HP)
    with pytest.raises(ValueError, match="not cut into blocks"):
        BlockMomentsStep([(10,)], [{"rule": "elementwise", "out_dim": 0, "n_blocks": 10}], DEVICE,
                         param_dtype=torch.float32, grad_dtype=torch.float32, moment_dtype=torch.float32)
    with pytest.raises(ValueError, match="param_dtype"):
        BlockMomentsStep([(12, 5)], [SPANS["rows"][1]], DEVICE, param_dtype=torch.float64, grad_dtype=torch.float64,
                         moment_dtype=torch.float64)


# --------------------------------------------------------------------------------------------------
# through the optimizer: a mixed group (GPT-2 Conv1D columns, biases and empty tensors take the torch ops)


def build(backend, dtype=torch.float32, lr=3e-3, without=(), **kwargs):
    """AdamMini on MIXED (tests/test_adam_mini.py: every rule, odd and empty shapes) less ``without`` on DEVICE; in
    bf16 also without its 0-d parameter (module docstring)."""
    without = (*without, *(() if dtype == torch.float32 else ("odd.scalar.weight",)))
    gen = torch.Generator().manual_seed(0)
    pairs = [(n, torch.nn.Parameter(torch.randn(shape, generator=gen).to(dtype).to(DEVICE))) for n, (shape, _) in
             MIXED.items() if n not in without]
    opt = AdamMini(pairs, lr=lr, weight_decay=0.1, overrides=mixed_overrides(without), backend=backend, **MIXED_KW,
                   **kwargs)
    return pairs, opt


def sync_runs(source, target):
    """Lockstep: ``target``'s parameters and state take ``source``'s values."""
    with torch.no_grad():
        for (_, p), (_, q) in zip(source[0], target[0]):
            q.copy_(p)
            for key, value in source[1].state[p].items():
                if key in target[1].state[q]:
                    target[1].state[q][key].copy_(value)


def assert_runs_agree(mine, ref, *, lr=3e-3):
    for (name, p), (_, q) in zip(mine[0], ref[0]):
        a, b = mine[1].state[p], ref[1].state[q]
        assert a.keys() == b.keys(), name
        if a:
            assert_states_agree(name, (p.detach(), a["exp_avg"], a["exp_avg_sq"], a["step"]),
                                (q.detach(), b["exp_avg"], b["exp_avg_sq"], b["step"]), lr=lr)


def step_in_lockstep(mine, ref, steps, *, seed=1, poison=None, lr=3e-3):
    """``steps`` steps of both runs from the same state and gradients, compared after each; every third tensor
    has no gradient in step 1 (its counter lags); ``poison=(step, name, value)`` writes a value into a gradient."""
    gen = torch.Generator().manual_seed(seed)
    dtype = mine[0][0][1].dtype
    for step in range(steps):
        sync_runs(mine, ref)
        for i, ((name, p), (_, q)) in enumerate(zip(mine[0], ref[0])):
            grad = None if step == 1 and i % 3 == 0 else torch.randn(p.shape, generator=gen).to(dtype).to(DEVICE)
            if grad is not None and poison and poison[0] == step and poison[1] == name:
                grad.view(-1)[0] = poison[2]
            p.grad, q.grad = grad, None if grad is None else grad.clone()
        mine[1].step()
        ref[1].step()
        assert_runs_agree(mine, ref, lr=lr)


TORCH_ONLY = {"model.layers.0.self_attn.q_proj.bias", "h.0.attn.c_attn.weight", "h.0.mlp.c_fc.weight",
              "odd.no_columns.weight", "odd.no_rows.weight", "odd.empty.weight", "odd.matrix.weight"}


@pytest.mark.parametrize("lr_kind", ["float", "tensor"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["fp32", "bf16"])
def test_optimizer_on_the_triton_path_matches_the_torch_path(dtype, lr_kind):
    lr = torch.tensor(3e-3, device=DEVICE) if lr_kind == "tensor" else 3e-3
    mine, ref = build(BACKEND, dtype, lr=lr), build("torch", dtype, lr=lr)
    step_in_lockstep(mine, ref, steps=3)
    opt = mine[1]
    routed = {name: opt._triton_key(opt.param_groups[0], i, p, p) is not None for i, (name, p) in enumerate(mine[0])}
    assert {name for name, triton_path in routed.items() if not triton_path} == TORCH_ONLY
    assert len(opt._block_steps) == 1  # one launch set for the group's other tensors


@pytest.mark.parametrize("target", ["model.layers.0.mlp.up_proj.weight",
                                    "model.layers.1.attention.query_key_value.weight", "odd.scalar.weight"])
def test_optimizer_skips_a_nonfinite_gradient_on_the_device(target, monkeypatch):
    # only tensors the kernels take: the torch ops' tensors would have their flags read back by the policy
    mine, ref = build(BACKEND, without=TORCH_ONLY), build("torch", without=TORCH_ONLY)
    step_in_lockstep(mine, ref, steps=2)
    sync_runs(mine, ref)
    kept = dict(mine[0])[target].detach().clone()
    state = copy.deepcopy(mine[1].state[dict(mine[0])[target]])
    gen = torch.Generator().manual_seed(2)
    for (name, p), (_, q) in zip(mine[0], ref[0]):
        p.grad = torch.randn(p.shape, generator=gen).to(DEVICE)
        if name == target:
            p.grad.view(-1)[-1] = float("nan")
        q.grad = p.grad.clone()
    reads = []  # the Triton path decides on the device: nothing is read back in the step
    for method in ("tolist", "item", "__bool__", "__float__", "__int__", "cpu", "numpy"):
        original = getattr(torch.Tensor, method)
        monkeypatch.setattr(torch.Tensor, method,
                            lambda self, *a, _o=original, _m=method, **k: (reads.append(_m), _o(self, *a, **k))[1])
    mine[1].step()
    monkeypatch.undo()
    assert reads == []
    ref[1].step()
    for pairs, opt in (mine, ref):
        named = dict(pairs)
        assert torch.equal(named[target], kept)
        assert all(torch.equal(v, state[k]) for k, v in opt.state[named[target]].items())
        assert opt.nonfinite_skips == 1
    assert_runs_agree(mine, ref)


@pytest.mark.parametrize("value", [float("nan"), -float("inf")], ids=["nan", "-inf"])
def test_optimizer_raise_policy_names_the_tensor_and_changes_nothing(value):
    # steps as the torch path's while the gradients are finite; a NaN/inf raises before anything changes (the
    # policy reads the flags back: a host sync per step, which "raise" documents)
    mine, ref = build(BACKEND, nonfinite="raise"), build("torch", nonfinite="raise")
    step_in_lockstep(mine, ref, steps=2)
    pairs, opt = mine
    before = [p.detach().clone() for _, p in pairs]
    saved = copy.deepcopy(opt.state_dict())
    for _, p in pairs:
        p.grad = torch.randn(p.shape, device=DEVICE)
    dict(pairs)["model.layers.0.self_attn.k_proj.weight"].grad.view(-1)[3] = value
    with pytest.raises(FloatingPointError, match=r"model\.layers\.0\.self_attn\.k_proj\.weight"):
        opt.step()
    assert all(torch.equal(a, p) for a, (_, p) in zip(before, pairs))
    after = opt.state_dict()
    for pid, entry in saved["state"].items():
        for key, tensor in entry.items():
            assert torch.equal(after["state"][pid][key], tensor), (pid, key)


@pytest.mark.filterwarnings("ignore:overflow encountered:RuntimeWarning")  # 1e20 squared, in numpy
def test_optimizer_huge_finite_gradient_steps_as_the_torch_path():
    # 1e20 is finite, its square is not: the kernels check values, not sums, so the tensor steps (v = inf in that
    # block, its update 0), as on the torch path
    poison = (2, "model.layers.0.mlp.up_proj.weight", 1e20)
    mine, ref = build(BACKEND), build("torch")
    step_in_lockstep(mine, ref, steps=3, poison=poison)
    v = mine[1].state[dict(mine[0])[poison[1]]]["exp_avg_sq"]
    assert torch.isinf(v[0]) and torch.isfinite(v[1:]).all() and mine[1].nonfinite_skips == 0


def test_optimizer_state_moves_between_paths():
    # 2 steps on the Triton path, its state dict into a torch-path optimizer for 1 step, back to the Triton path for
    # 1: each step as the torch path's from the same state (the counters move between paths)
    mine, ref = build(BACKEND), build("torch")
    step_in_lockstep(mine, ref, steps=2)
    other = build("torch")
    other[1].load_state_dict(mine[1].state_dict())
    sync_runs(mine, other)
    step_in_lockstep(other, ref, steps=1, seed=4)
    other[1].backend = BACKEND
    step_in_lockstep(other, ref, steps=1, seed=5)
    assert len(other[1]._block_steps) == 1


def test_backend_argument_is_checked():
    with pytest.raises(ValueError, match="backend"):
        AdamMini([("w", torch.nn.Parameter(torch.zeros(2, 2)))], backend="cuda")
    with pytest.raises(ValueError, match="foreach=False"):
        AdamMini([("w", torch.nn.Parameter(torch.zeros(2, 2)))], backend="triton", foreach=False)


# --------------------------------------------------------------------------------------------------
# GPU only: the compiled kernels, and no host sync on a real device


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["fp32", "bf16"])
def test_gpu_step_never_syncs_with_the_host(dtype):
    # torch raises on any synchronising call (a device value read back, a blocking copy) in sync debug mode "error"
    # ("skip" is the default non-finite policy); warm-up steps too (tables upload pinned and non-blocking)
    gen = torch.Generator().manual_seed(0)
    pairs = [(n, torch.nn.Parameter(torch.randn(shape, generator=gen).to(dtype).cuda()))
             for n, (shape, _) in MIXED.items() if n not in TORCH_ONLY]
    opt = AdamMini(pairs, lr=1e-3, weight_decay=0.1, overrides=mixed_overrides(), **MIXED_KW)
    grads = [torch.randn(p.shape, generator=gen).to(dtype).cuda() for _, p in pairs]
    grads[3].view(-1)[0] = float("nan")
    torch.cuda.synchronize()
    torch.cuda.set_sync_debug_mode("error")
    try:
        for _ in range(3):
            for (_, p), g in zip(pairs, grads):
                p.grad = g
            opt.step()
    finally:
        torch.cuda.set_sync_debug_mode("default")
    assert opt.nonfinite_skips == 3
    assert len(opt._block_steps) == 1


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_gpu_kernels_at_a_real_width():
    # widths of the 1b preset (2048 rows, 5461-element rows: not a multiple of 4, so unaligned rows), 3 steps
    shapes = [(5461, 2048), (2048, 5461), (2048,)]
    layouts = [{"rule": "rows", "out_dim": 0, "n_blocks": 5461, "unit": 1},
               {"rule": "heads", "out_dim": 0, "n_blocks": 32, "unit": 64},
               {"rule": "whole", "out_dim": 0, "n_blocks": 1}]
    gen = torch.Generator(device="cuda").manual_seed(0)
    mine = ([torch.randn(s, device="cuda", generator=gen) for s in shapes],
            [torch.zeros(s, device="cuda") for s in shapes],
            [torch.zeros(block_state_shape(lay, s), device="cuda") for lay, s in zip(layouts, shapes)],
            [torch.zeros((), device="cuda") for _ in shapes])
    ref = _clone(mine)
    step = BlockMomentsStep(shapes, layouts, "cuda", param_dtype=torch.float32, grad_dtype=torch.float32,
                            moment_dtype=torch.float32)
    for _ in range(3):
        grads = [torch.randn(s, device="cuda", generator=gen) for s in shapes]
        sync(mine, ref)
        step.step(mine[0], grads, mine[1], mine[2], mine[3], weight_decays=[0.1, 0.1, 0.0], **HP)
        block_adam_foreach(ref[0], grads, ref[1], ref[2], ref[3], layouts, weight_decays=[0.1, 0.1, 0.0], **HP)
        for i in range(len(shapes)):
            assert_states_agree(str(shapes[i]), [x[i] for x in mine], [x[i] for x in ref], lr=HP["lr"])
