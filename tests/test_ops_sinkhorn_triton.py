"""The Triton kernels of SR-Sinkhorn scaled updates (ops.sinkhorn_triton) against the torch references.

They run on CPU tensors under TRITON_INTERPRET=1 (tests/conftest.py), and on a GPU with the same tests.

Tolerances: the kernels compute the same fp32 quantities as ``sinkhorn_scales`` in another order (tiles of
partial sums, not ``mv``) and add the floors where it clamps with them; the scale vectors differ by a few ulps
per round, the update (unit RMS) by ~1e-6 relative. The kernels never contract a multiply-add into an FMA
(``enable_fp_fusion=False``), so on a GPU they differ from the interpreter only in the order of the tiles'
reductions (a few ulps more of the same kind); the torch reference's ``addcmul`` may contract (CPU and CUDA).
atol: 2e-6 of the step size (the update's RMS is the step size); rtol: 4 fp32 ulps of W (W rounded once,
the decay factor rounded from another expression, an FMA in the reference).
"""

from __future__ import annotations

import pytest
import torch

from slimopt.ops.normalize import sinkhorn_scales, sr_sinkhorn_reference
from slimopt.ops.sinkhorn_triton import SinkhornScaledAdd, storage_order
from slimopt.ops.triton_support import triton_available

pytestmark = pytest.mark.skipif(not triton_available(), reason="needs triton")

FP32_ULP = 2.0**-23
SHAPES = [(37, 53), (53, 37), (1, 9), (33, 33), (64, 130)]  # wide, tall, one row, square, > a tile's columns


def device() -> str:
    return "cuda" if torch.cuda.is_available() else "cpu"


def matrices(shapes, *, transposed=False, dtype=torch.float32, seed=0, scale_rows=True):
    """(params, grads): (m, n) views; transposed: of (n, m) storage, as GPT-2's Conv1D weights are seen."""
    g = torch.Generator().manual_seed(seed)
    params, grads = [], []
    for m, n in shapes:
        w = torch.randn(m, n, generator=g)
        x = torch.randn(m, n, generator=g) * (torch.rand(m, 1, generator=g) * 10 if scale_rows else 1)
        if transposed:
            w, x = w.t().contiguous().t(), x.t().contiguous().t()
        params.append(w.to(device=device(), dtype=dtype))
        grads.append(x.to(device=device(), dtype=dtype))
    return params, grads


def build(params, grads):
    layouts = [storage_order(p, g) for p, g in zip(params, grads)]
    assert len({t for t, _ in layouts}) == 1
    return SinkhornScaledAdd([(p.shape[0], p.shape[1], s) for p, (_, s) in zip(params, layouts)],
                             transposed=layouts[0][0], device=params[0].device, param_dtype=params[0].dtype,
                             grad_dtype=grads[0].dtype)


def reference_step(w, g, iters, lr, scale, weight_decay):
    """The per-matrix reference in float64 arithmetic from its fp32 scale vectors (``sinkhorn_scales``)."""
    r, c = sinkhorn_scales(g.cpu(), iters)
    update = r.double()[:, None] * g.cpu().double() * c.double()[None, :]
    return w.cpu().double() * (1 - lr * scale * weight_decay) - lr * scale * update


@pytest.mark.parametrize("transposed", [False, True], ids=["rows", "transposed"])
@pytest.mark.parametrize("iters", [1, 2, 5])
def test_several_shapes_in_one_launch_equal_the_per_matrix_reference(transposed, iters):
    # (150, 37) and (64, 130) span several programs of each tiling (blocks of rows, blocks of columns)
    shapes = [(37, 53), (150, 37), (33, 33), (64, 130), (1, 9) if not transposed else (9, 2)]
    params, grads = matrices(shapes, transposed=transposed)
    before = [p.clone() for p in params]
    left_alone = build(params, grads).step(params, grads, iters, 0.1, 0.5, 0.1, 1e-8)
    assert left_alone.dtype == torch.bool and not left_alone.any()
    for p, w, g in zip(params, before, grads):
        expected = reference_step(w, g, iters, 0.1, 0.5, 0.1)
        torch.testing.assert_close(p.cpu().double(), expected, rtol=4 * FP32_ULP, atol=2e-6 * 0.05)


@pytest.mark.parametrize("iters", [1, 5])
def test_the_update_is_algorithm_4_in_float64(iters):
    params, grads = matrices(SHAPES)
    before = [p.clone() for p in params]
    build(params, grads).step(params, grads, iters, 0.02, 0.05, 0.0, 1e-8)
    for p, w, g in zip(params, before, grads):
        expected = w.cpu().double() - 1e-3 * sr_sinkhorn_reference(g.cpu().double(), iters)
        # fp32 scale vectors against the L explicit normalisations in float64: a few ulps of a unit update
        torch.testing.assert_close(p.cpu().double(), expected, rtol=4 * FP32_ULP, atol=1e-3 * 2e-5)


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16], ids=["bf16", "fp16"])
def test_low_precision_gradients_are_squared_in_fp32(dtype):
    params, grads = matrices(SHAPES, seed=1)
    grads = [g.to(dtype) for g in grads]
    before = [p.clone() for p in params]
    build(params, grads).step(params, grads, 5, 0.1, 0.5, 0.0, 1e-8)
    for p, w, g in zip(params, before, grads):
        expected = reference_step(w, g.float(), 5, 0.1, 0.5, 0.0)  # the same (rounded) gradient, widened
        torch.testing.assert_close(p.cpu().double(), expected, rtol=4 * FP32_ULP, atol=2e-6 * 0.05)


@pytest.mark.parametrize("weight_decay", [0.0, 0.1], ids=["no_wd", "wd"])
def test_bf16_parameters_are_rounded_once_to_nearest(weight_decay):
    params, grads = matrices(SHAPES, dtype=torch.bfloat16, seed=2)
    before = [p.clone() for p in params]
    build(params, grads).step(params, grads, 5, 0.1, 0.5, weight_decay, 1e-8)
    for p, w, g in zip(params, before, grads):
        assert p.dtype == torch.bfloat16
        exact = reference_step(w.float(), g.float(), 5, 0.1, 0.5, weight_decay)
        # W * decay + U in fp32, one rounding to nearest: within half a bf16 ulp of the exact value, plus the
        # fp32 differences above (which can move a value that sits on a rounding boundary by one ulp)
        ulp = 2.0 ** (torch.floor(torch.log2(exact.abs().clamp_min(1e-30))) - 7)
        assert ((p.cpu().double() - exact).abs() <= ulp * 0.5 + 2e-6 * 0.05).float().mean() > 0.99
        assert ((p.cpu().double() - exact).abs() <= ulp).all()


def test_a_tensor_lr_is_read_on_the_device():
    params, grads = matrices(SHAPES, seed=3)
    twins = [p.clone() for p in params]
    op = build(params, grads)
    op.step(params, grads, 5, 0.1, 0.5, 0.1, 1e-8)
    op.step(twins, grads, 5, torch.tensor(0.1, device=device()), 0.5, 0.1, 1e-8)
    # alpha and the decay factor: fp32 products on the device, doubles rounded once on the host (1 ulp each)
    for x, y in zip(params, twins):
        torch.testing.assert_close(x, y, rtol=2 * FP32_ULP, atol=1e-7 * 0.05)


def test_zero_rows_and_columns_stay_and_an_all_zero_gradient_changes_nothing():
    params, grads = matrices([(12, 9), (5, 4)], seed=4)
    grads[0][3] = 0
    grads[0][:, 5] = 0
    grads[1].zero_()
    before = [p.clone() for p in params]
    for iters in (1, 5, 20):
        left_alone = build(params, grads).step(params, grads, iters, 0.1, 1.0, 0.0, 1e-8)
        assert not left_alone.any() and all(torch.isfinite(p).all() for p in params)
        assert torch.equal(params[0][3], before[0][3]) and torch.equal(params[0][:, 5], before[0][:, 5])
        assert torch.equal(params[1], before[1])
        params[0].copy_(before[0])


def test_tiny_and_huge_gradients_give_the_same_step():
    params, grads = matrices([(16, 20), (16, 20), (16, 20)], seed=5)
    grads[1], grads[2] = grads[0] * 1e-13, grads[0] * 1e13
    start = params[0].clone()
    params = [start.clone() for _ in range(3)]
    build(params, grads).step(params, grads, 5, 0.1, 1.0, 0.0, 1e-8)
    for p in params[1:]:
        torch.testing.assert_close(p, params[0], rtol=4 * FP32_ULP, atol=1e-5 * 0.1)


@pytest.mark.parametrize("bad", ["nan", "inf", "overflow"])
def test_a_matrix_with_a_nonfinite_gradient_or_overflowing_squares_is_left_alone(bad):
    params, grads = matrices([(8, 12), (8, 12), (20, 6)], seed=6)
    grads[1][2, 3] = {"nan": float("nan"), "inf": float("-inf"), "overflow": 3e30}[bad]  # 3e30^2 overflows fp32
    before = [p.clone() for p in params]
    op = build(params, grads)
    left_alone = op.step(params, grads, 5, 0.1, 1.0, 0.1, 1e-8)
    assert left_alone.tolist() == [False, True, False]
    assert torch.equal(params[1], before[1])  # neither stepped nor decayed
    for i in (0, 2):
        torch.testing.assert_close(params[i].cpu().double(), reference_step(before[i], grads[i], 5, 0.1, 1.0, 0.1),
                                   rtol=4 * FP32_ULP, atol=2e-6 * 0.1)
    grads[1][2, 3] = 1.0  # the next step's flags start afresh
    assert not op.step(params, grads, 5, 0.1, 1.0, 0.1, 1e-8).any()
    assert not torch.equal(params[1], before[1])


def test_new_gradient_tensors_are_followed():
    """The gradients' addresses are a table uploaded again when they change: a new tensor is read, not the
    old address."""
    params, grads = matrices([(6, 10), (10, 6)], seed=7)
    op = build(params, grads)
    twins = [p.clone() for p in params]
    op.step(params, grads, 2, 0.1, 1.0, 0.0, 1e-8)
    fresh = [torch.randn_like(g) for g in grads]
    op.step(params, fresh, 2, 0.1, 1.0, 0.0, 1e-8)
    op.step(twins, grads, 2, 0.1, 1.0, 0.0, 1e-8)
    build(twins, fresh).step(twins, fresh, 2, 0.1, 1.0, 0.0, 1e-8)
    for x, y in zip(params, twins):
        assert torch.equal(x, y)  # the same launches on the same values


def test_layouts():
    w = torch.zeros(6, 10)
    assert storage_order(w, torch.zeros(6, 10)) == (False, 10)
    assert storage_order(w.t(), torch.zeros(6, 10).t()) == (True, 10)
    assert storage_order(torch.zeros(6, 20)[:, :10], torch.zeros(6, 20)[:, :10]) == (False, 20)  # row stride
    assert storage_order(w, torch.zeros(10, 6).t()) is None  # gradient laid out otherwise
    assert storage_order(torch.zeros(6, 20)[:, ::2], torch.zeros(6, 20)[:, ::2]) is None
    assert storage_order(torch.zeros(0, 5), torch.zeros(0, 5)) is None


def test_construction_names_what_it_refuses():
    with pytest.raises(ValueError, match="param_dtype"):
        SinkhornScaledAdd([(2, 2, 2)], transposed=False, device="cpu", param_dtype=torch.float64,
                          grad_dtype=torch.float32)
    with pytest.raises(ValueError, match="non-empty"):
        SinkhornScaledAdd([(0, 2, 2)], transposed=False, device="cpu", param_dtype=torch.float32,
                          grad_dtype=torch.float32)
