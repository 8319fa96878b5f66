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
