"""SR-Sinkhorn through scale vectors and SWAN's row standardisation, against plain references."""

from __future__ import annotations

import math

import pytest
import torch

from slimopt.ops.normalize import (
    row_standardize,
    sinkhorn_scales,
    sr_sinkhorn,
    sr_sinkhorn_reference,
)

SHAPES = [(48, 80), (80, 48), (1, 7), (7, 1), (33, 33)]  # wide, tall, a single row/column, square


def heavy_tailed(m: int, n: int, seed: int = 0) -> torch.Tensor:
    """Student-t entries with log-normal row and column scales: far from already normalised."""
    g = torch.Generator().manual_seed(seed)
    z = torch.randn(m, n, generator=g, dtype=torch.float64)
    chi = torch.randn(3, m, n, generator=g, dtype=torch.float64).square().mean(0)  # chi^2_3 / 3
    rows = torch.randn(m, 1, generator=g, dtype=torch.float64).exp()
    cols = torch.randn(1, n, generator=g, dtype=torch.float64).exp()
    return z / chi.sqrt() * rows * cols


def sinkhorn_knopp(a: torch.Tensor, row_sum: float, col_sum: float, iters: int) -> torch.Tensor:
    """Textbook Sinkhorn-Knopp on a nonnegative matrix (float64), rows first."""
    for _ in range(iters):
        a = a * (row_sum / a.sum(dim=1, keepdim=True))
        a = a * (col_sum / a.sum(dim=0, keepdim=True))
    return a


@pytest.mark.parametrize("shape", SHAPES)
def test_last_column_step_gives_exact_column_norms_and_rows_converge(shape):
    m, n = shape
    g = heavy_tailed(m, n).float()
    errors = []
    for iters in (1, 3, 10, 30):
        x = sr_sinkhorn(g, iters)
        col = x.double().norm(dim=0)
        # The last step normalises columns: exact up to fp32 rounding of the scale vectors.
        torch.testing.assert_close(col, torch.full_like(col, math.sqrt(m)), rtol=2e-6, atol=0)
        errors.append((x.double().norm(dim=1) / math.sqrt(n) - 1).abs().max().item())
    # Rows approach their fixed point sqrt(n) as L grows (monotone here, tiny at L = 30).
    assert all(b <= a + 1e-6 for a, b in zip(errors, errors[1:])), errors
    assert errors[-1] < 1e-4, errors


@pytest.mark.parametrize("shape", SHAPES)
def test_squared_entries_are_sinkhorn_knopp_on_g_squared(shape):
    m, n = shape
    g = heavy_tailed(m, n, seed=1)
    for iters in (1, 5):
        x = sr_sinkhorn(g.float(), iters).double()
        expected = sinkhorn_knopp(g * g, row_sum=n, col_sum=m, iters=iters)
        # fp32 scale vectors against a float64 reference: relative error a few ulps per round.
        torch.testing.assert_close(x * x, expected, rtol=2e-5, atol=1e-12)
        assert torch.equal(torch.sign(x), torch.sign(g))


@pytest.mark.parametrize("shape", SHAPES)
@pytest.mark.parametrize("iters", [1, 2, 5])
def test_scale_vectors_equal_the_naive_l_copies_implementation(shape, iters):
    g = heavy_tailed(*shape, seed=2).float()
    r, c = sinkhorn_scales(g, iters)
    assert r.shape == (shape[0],) and c.shape == (shape[1],) and r.dtype == c.dtype == torch.float32
    # Two fp32 computations of the same quantity in a different order: a few ulps.
    torch.testing.assert_close(r[:, None] * g * c[None, :], sr_sinkhorn_reference(g, iters), rtol=2e-5, atol=1e-6)


def test_bf16_gradients_are_normalised_in_fp32():
    g = heavy_tailed(40, 24, seed=3).to(torch.bfloat16)
    x = sr_sinkhorn(g, 5)
    assert x.dtype == torch.float32
    torch.testing.assert_close(x, sr_sinkhorn_reference(g.float(), 5), rtol=2e-5, atol=1e-6)
    torch.testing.assert_close(x.norm(dim=0), torch.full((24,), math.sqrt(40.0)), rtol=2e-6, atol=0)


def test_zero_rows_and_columns_stay_zero_without_nan():
    g = heavy_tailed(12, 9, seed=4).float()
    g[3] = 0
    g[:, 5] = 0
    for iters in (1, 5, 50):
        x = sr_sinkhorn(g, iters)
        assert torch.isfinite(x).all()
        assert torch.equal(x[3], torch.zeros(9)) and torch.equal(x[:, 5], torch.zeros(12))
        live = [j for j in range(9) if j != 5]
        # The other columns still get norm sqrt(m) (the zero row adds nothing to them).
        torch.testing.assert_close(x[:, live].norm(dim=0), torch.full((8,), math.sqrt(12.0)), rtol=2e-6, atol=0)
        torch.testing.assert_close(x, sr_sinkhorn_reference(g, iters), rtol=2e-5, atol=1e-6)
    assert torch.equal(sr_sinkhorn(torch.zeros(5, 4), 5), torch.zeros(5, 4))


def test_tiny_and_huge_gradients_give_the_same_direction():
    g = heavy_tailed(16, 20, seed=5).float()
    x = sr_sinkhorn(g, 5)
    for factor in (1e-12, 1e12):
        torch.testing.assert_close(sr_sinkhorn(g * factor, 5), x, rtol=1e-5, atol=1e-6)


def test_sinkhorn_scales_rejects_non_matrices():
    with pytest.raises(ValueError, match="matrix"):
        sinkhorn_scales(torch.ones(3), 5)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("shape", [(6, 50), (50, 6), (1, 9)])
def test_row_standardize_matches_float64_formula(shape, dtype):
    g = (heavy_tailed(*shape, seed=6) + 3.0).to(dtype)  # nonzero row means: centring matters
    x = row_standardize(g)
    assert x.dtype == torch.float32
    ref = g.double()
    ref = (ref - ref.mean(dim=1, keepdim=True)) / ref.std(dim=1, unbiased=False, keepdim=True)
    torch.testing.assert_close(x.double(), ref, rtol=1e-5, atol=1e-5)  # fp32 arithmetic on O(1) values
    torch.testing.assert_close(x.mean(dim=1), torch.zeros(shape[0]), rtol=0, atol=1e-5)


def test_row_standardize_constant_rows_become_zero():
    g = torch.tensor([[2.0, 2.0, 2.0], [1.0, 2.0, 3.0], [0.0, 0.0, 0.0]])
    x = row_standardize(g)
    assert torch.isfinite(x).all()
    assert torch.equal(x[0], torch.zeros(3)) and torch.equal(x[2], torch.zeros(3))
    torch.testing.assert_close(x[1], torch.tensor([-1.0, 0.0, 1.0]) * math.sqrt(1.5))


def test_row_standardize_is_scale_free():
    g = heavy_tailed(8, 30, seed=7).float()
    for factor in (1e-15, 1e15):
        torch.testing.assert_close(row_standardize(g * factor), row_standardize(g), rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("shape", [(0, 4), (4, 0)])
def test_empty_matrices(shape):
    r, c = sinkhorn_scales(torch.ones(shape), 5)
    assert r.shape == (shape[0],) and c.shape == (shape[1],)
    assert sr_sinkhorn(torch.ones(shape), 5).shape == shape


# -- the stacked kernels against the per-matrix ones ----------------------------------------------------

from slimopt.ops.normalize import (  # noqa: E402
    add_stacked_,
    row_standardize_stacked_,
    sinkhorn_scaled_add_stacked_,
    sinkhorn_scales_stacked,
)


def stack_of(m, n, k=3, seed=10, dtype=torch.float32):
    return torch.stack([heavy_tailed(m, n, seed=seed + i) for i in range(k)]).to(dtype)


@pytest.mark.parametrize("shape", SHAPES)
@pytest.mark.parametrize("iters", [1, 5])
def test_stacked_scales_equal_the_per_matrix_scales(shape, iters):
    g = stack_of(*shape)
    g[1] *= 1e12  # each matrix is scaled on its own
    g[2] *= 1e-12
    # eps = 1e-12 here: the stacked kernel adds the floor eps^2 mean(G^2) where sinkhorn_scales clamps
    # with it, which moves a row of norm rho by a relative (eps rms / rho)^2: with heavy tails a single
    # entry can sit at 1e-6 of the RMS (a 5e-5 change at eps = 1e-8). The floors' effect on zero rows and
    # columns is tested below. The matrices scaled by 1e12 and 1e-12 check scale-freedom.
    r, c = sinkhorn_scales_stacked(g.square(), iters, eps=1e-12)
    assert r.shape == (3, 1, shape[0]) and c.shape == (3, 1, shape[1])
    for i in range(3):
        r_ref, c_ref = sinkhorn_scales(g[i], iters, eps=1e-12)
        # the same fp32 quantities summed in another order (and the targets folded into baddbmm's alpha):
        # a few ulps per round, as between sinkhorn_scales and the L-copies reference above
        x = r[i, 0][:, None] * g[i] * c[i, 0][None, :]
        torch.testing.assert_close(x, r_ref[:, None] * g[i] * c_ref[None, :], rtol=2e-5, atol=1e-6)


def test_stacked_scales_keep_zero_rows_and_columns_zero():
    g = stack_of(12, 9, k=2, seed=4)
    g[0, 3] = 0
    g[1, :, 5] = 0
    for iters in (1, 5, 50):
        r, c = sinkhorn_scales_stacked(g.square(), iters)
        x = r.mT * g * c
        assert torch.isfinite(x).all()
        assert torch.equal(x[0, 3], torch.zeros(9)) and torch.equal(x[1, :, 5], torch.zeros(12))
        for i in range(2):
            torch.testing.assert_close(x[i], sr_sinkhorn_reference(g[i], iters), rtol=2e-5, atol=1e-6)
    r, c = sinkhorn_scales_stacked(torch.zeros(2, 5, 4), 5)  # an all-zero gradient: zero update, no NaN
    assert torch.isfinite(r).all() and torch.isfinite(c).all()


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["fp32", "bf16"])
@pytest.mark.parametrize("decay", [None, 0.99, "tensor"])
def test_stacked_sinkgd_update_is_algorithm_4(dtype, decay):
    k, m, n = 4, 20, 31
    grads = list(stack_of(m, n, k=k, seed=20, dtype=dtype).unbind(0))
    g = torch.Generator().manual_seed(3)
    params = [torch.randn(m, n, generator=g).to(dtype) for _ in range(k)]
    before = [p.double() for p in params]
    lr = torch.tensor(0.1) if decay == "tensor" else 0.1
    factor = (1 - lr * 0.5 * 0.2) if decay == "tensor" else decay
    sinkhorn_scaled_add_stacked_(params, grads, 5, lr, 0.5, factor, stack=torch.empty(k, m, n),
                           gram=torch.empty(k, m, n))
    f = 1.0 if decay is None else 0.99 if decay == 0.99 else 1 - 0.1 * 0.5 * 0.2
    for p, w, grad in zip(params, before, grads):
        expected = w * f - 0.05 * sr_sinkhorn_reference(grad.float(), 5).double()
        tol = {"rtol": 2.4e-7, "atol": 0.05 * 2e-5} if dtype == torch.float32 else {"rtol": 2.0**-7, "atol": 1e-6}
        torch.testing.assert_close(p.double(), expected.to(dtype).double(), **tol)


@pytest.mark.parametrize("grads_finite", [True, False])
def test_stacked_sinkgd_update_leaves_a_nonfinite_matrix_unchanged(grads_finite):
    k, m, n = 3, 8, 6
    grads = list(stack_of(m, n, k=k, seed=30).unbind(0))
    grads[1] = grads[1].clone()
    if grads_finite:
        grads[1][2, 2] = 1e30  # finite, but its square overflows: the scales come out NaN
    else:
        grads[1][2, 2] = float("nan")
    params = [torch.ones(m, n) for _ in range(k)]
    sinkhorn_scaled_add_stacked_(params, grads, 5, 0.1, 1.0, 0.9, stack=torch.empty(k, m, n), gram=torch.empty(k, m, n),
                           grads_finite=grads_finite)
    assert torch.equal(params[1], torch.ones(m, n))  # neither stepped nor decayed
    assert all(torch.isfinite(p).all() for p in params)
    assert not torch.equal(params[0], torch.ones(m, n)) and not torch.equal(params[2], torch.ones(m, n))


@pytest.mark.parametrize("shape", [(6, 50), (50, 6), (1, 9), (9, 9)])
def test_stacked_row_standardize_equals_row_standardize(shape):
    x = (stack_of(*shape, k=3, seed=40) + 3.0)
    x[1] *= 1e15
    x[2, 0] = 2.0  # a constant row
    expected = [row_standardize(m) for m in x]
    got = row_standardize_stacked_(x.clone(), scale=0.25)
    for a, b in zip(got, expected):
        torch.testing.assert_close(a, 0.25 * b, rtol=1e-5, atol=1e-6)  # fp32 on O(1) values, another order
    assert torch.equal(got[2, 0], torch.zeros(shape[1]))
    assert torch.equal(row_standardize_stacked_(torch.zeros(2, *shape)), torch.zeros(2, *shape))


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["fp32", "bf16"])
def test_add_stacked_rounds_each_parameter_once(dtype):
    g = torch.Generator().manual_seed(5)
    update = torch.randn(3, 4, 5, generator=g) * 1e-2
    decay = torch.tensor([0.9, 1.0, 0.5]).view(3, 1, 1)
    for d in (None, decay):
        params = [torch.randn(4, 5, generator=g).to(dtype) for _ in range(3)]
        expected = [(p.double() * (1.0 if d is None else d[i].double()) + update[i].double())
                    for i, p in enumerate(params)]
        add_stacked_(params, update, d)
        for p, e in zip(params, expected):
            assert p.dtype == dtype
            if d is None:  # W + U in fp32, rounded once to W's dtype
                assert torch.equal(p, (e.to(dtype) if dtype == torch.float32 else e.float().to(dtype)))
            else:  # W * decay + U: one fp32 rounding (an FMA, as torch's CPU addcmul computes it) or two
                ulp = 2.0**-23 if dtype == torch.float32 else 2.0**-8
                torch.testing.assert_close(p.double(), e, rtol=2 * ulp, atol=0)
