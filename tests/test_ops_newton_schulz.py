"""Coupled Newton-Schulz whitening against a float64 SVD / eigendecomposition."""

from __future__ import annotations

import pytest
import torch

from slimopt.ops.newton_schulz import inverse_sqrt_newton_schulz, whiten, whiten_reference


def well_conditioned(m: int, n: int, seed: int = 0, cond: float = 4.0) -> torch.Tensor:
    """U diag(s) V^T with singular values spread over [1, cond] and a random scale."""
    g = torch.Generator().manual_seed(seed)
    k = min(m, n)
    u, _ = torch.linalg.qr(torch.randn(m, k, generator=g, dtype=torch.float64))
    v, _ = torch.linalg.qr(torch.randn(n, k, generator=g, dtype=torch.float64))
    s = torch.logspace(0, torch.log10(torch.tensor(cond)).item(), k, dtype=torch.float64)
    return (u * s) @ v.t() * 3.7


@pytest.mark.parametrize("shape", [(16, 64), (64, 16), (32, 32), (1, 10)])
def test_whiten_matches_polar_factor_and_has_unit_singular_values(shape):
    g = well_conditioned(*shape)
    w = whiten(g.float(), iters=10)
    assert w.dtype == torch.float32 and w.shape == shape
    # fp32 matmuls over O(1) entries: agreement to ~1e-5 with the float64 U V^T.
    torch.testing.assert_close(w.double(), whiten_reference(g), rtol=0, atol=2e-5)
    s = torch.linalg.svdvals(w.double())
    torch.testing.assert_close(s, torch.ones_like(s), rtol=0, atol=5e-5)


def test_whiten_matches_svd_on_a_gaussian_wide_matrix():
    g = torch.randn(64, 256, generator=torch.Generator().manual_seed(1))  # singular values within ~3x
    torch.testing.assert_close(whiten(g, iters=10).double(), whiten_reference(g), rtol=0, atol=2e-5)


def test_more_iterations_converge_further_on_ill_conditioned_input():
    g = well_conditioned(24, 48, seed=2, cond=300.0)
    ref = whiten_reference(g)
    errors = [(whiten(g.float(), k).double() - ref).norm().item() for k in (2, 6, 12, 20)]
    assert errors == sorted(errors, reverse=True)
    assert errors[-1] < 1e-3


def test_inverse_sqrt_matches_eigendecomposition():
    x = well_conditioned(20, 40, seed=3).float()
    a = x @ x.t()
    a = a / torch.linalg.matrix_norm(a)
    evals, evecs = torch.linalg.eigh(a.double())
    ref = (evecs * evals.rsqrt()) @ evecs.t()
    z = inverse_sqrt_newton_schulz(a, iters=12)
    torch.testing.assert_close(z.double(), ref, rtol=1e-4, atol=1e-4)  # fp32, condition ~16


def test_whiten_bf16_input_runs_in_fp32():
    g = well_conditioned(16, 40, seed=4).to(torch.bfloat16)
    w = whiten(g, iters=10)
    assert w.dtype == torch.float32
    torch.testing.assert_close(w.double(), whiten_reference(g.float()), rtol=0, atol=2e-5)


def test_zero_and_rank_deficient_inputs_stay_finite():
    assert torch.equal(whiten(torch.zeros(4, 9), 10), torch.zeros(4, 9))
    g = torch.zeros(6, 12)
    g[:2] = well_conditioned(2, 12, seed=5).float()  # rank 2 of 6
    w = whiten(g, 10)
    assert torch.isfinite(w).all()
    torch.testing.assert_close(w[:2].double(), whiten_reference(g[:2]), rtol=0, atol=2e-5)
    assert w[2:].abs().max() < 1e-4


def test_whiten_rejects_non_matrices():
    with pytest.raises(ValueError, match="matrix"):
        whiten(torch.ones(2, 3, 4), 5)
