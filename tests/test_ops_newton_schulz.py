"""Quintic Newton-Schulz whitening (polar factor) against float64 SVD / eigendecomposition references.

Ill-conditioned families are generated in float64 with controlled spectra (seeded) and whitened after
a cast to fp32, the way SWAN sees them; accuracy is the cosine <X, P> / (|X| |P|) against the float64
pseudo-inverse whitening P (``whiten_pinv_reference``).
"""

from __future__ import annotations

import math

import pytest
import torch

from slimopt.ops.newton_schulz import (
    DEFAULT_ITERS,
    _polar_iteration,
    inverse_sqrt_newton_schulz,
    polar_schedule,
    whiten,
    whiten_pinv_reference,
    whiten_reference,
)

# The issue asks for >= 0.95 at the defaults; the families below measure >= 0.999, so 0.99 still
# leaves room for other hardware's fp32 rounding and catches a schedule that stops resolving.
ACCURACY = 0.99


def cosine(x: torch.Tensor, y: torch.Tensor) -> float:
    x, y = x.double(), y.double()
    return ((x * y).sum() / (x.norm() * y.norm())).item()


def with_spectrum(m: int, n: int, s: torch.Tensor, seed: int) -> torch.Tensor:
    """U diag(s) V^T in float64 with random orthonormal U (m x k) and V (n x k), k = len(s)."""
    g = torch.Generator().manual_seed(seed)
    u, _ = torch.linalg.qr(torch.randn(m, len(s), generator=g, dtype=torch.float64))
    v, _ = torch.linalg.qr(torch.randn(n, len(s), generator=g, dtype=torch.float64))
    return (u * s) @ v.t()


def spectrum(kind: str, k: int, cond: float) -> torch.Tensor:
    """k singular values, the largest 1, whose nonzero ones give a Gram condition number ``cond``."""
    low = -0.5 * math.log10(cond)
    if kind == "log_uniform":
        return torch.logspace(0, low, k, dtype=torch.float64)
    if kind == "power_law":  # sigma_i = i^-alpha: most singular values near the small end
        return torch.arange(1, k + 1, dtype=torch.float64) ** (low / math.log10(k))
    if kind == "two_clusters":  # half at 1, half at the bottom: the hardest split for a cosine
        return torch.where(torch.arange(k) < k // 2, 1.0, 10.0**low).double()
    if kind == "rank_deficient":  # a quarter exactly zero: singular Gram
        s = torch.zeros(k, dtype=torch.float64)
        s[: k - k // 4] = torch.logspace(0, low, k - k // 4, dtype=torch.float64)
        return s
    raise ValueError(kind)


def heavy_tailed_rows(m: int, n: int, spike: float, seed: int) -> torch.Tensor:
    """Cauchy-like entries plus a rank-4 spike, row scales 1e-3..1e3, then SWAN's row standardisation."""
    g = torch.Generator().manual_seed(seed)
    noise = torch.randn(m, n, generator=g, dtype=torch.float64)
    noise = noise / torch.randn(m, n, generator=g, dtype=torch.float64).abs().clamp_min(0.05)
    low = torch.randn(m, 4, generator=g, dtype=torch.float64) @ torch.randn(4, n, generator=g, dtype=torch.float64)
    scales = torch.logspace(-3, 3, m, dtype=torch.float64)[torch.randperm(m, generator=g)]
    z = (spike * low + noise) * scales[:, None]
    z = z - z.mean(dim=1, keepdim=True)
    return z / z.std(dim=1, unbiased=False, keepdim=True)


def family(kind: str, m: int, n: int, cond: float, seed: int = 0) -> torch.Tensor:
    """A float64 matrix of the family; ``centred_square`` is m x m with each row's mean removed."""
    if kind == "centred_square":  # rows sum to zero: the all-ones vector is a null direction
        x = with_spectrum(m, m, spectrum("log_uniform", m, cond), seed)
        return x - x.mean(dim=1, keepdim=True)
    tall = m > n
    x = with_spectrum(min(m, n), max(m, n), spectrum(kind, min(m, n), cond), seed)
    return x.t() if tall else x


def gram_condition(x: torch.Tensor) -> float:
    """Condition number of G G^T over its nonzero eigenvalues (float64; 1e-10 relative counts as 0)."""
    s = torch.linalg.svdvals(x.double())
    s = s[s > 1e-10 * s[0]]
    return (s[0] / s[-1]).item() ** 2


KINDS = ["log_uniform", "power_law", "two_clusters", "rank_deficient", "centred_square"]
SHAPES = [(32, 128), (64, 64), (96, 48)]  # wide, square, tall
# (m, n, spike): Gram condition numbers 1e9, 2e9-3e9 and 1e9-5e9 (square: plus the centring's null).
HEAVY = [(32, 128, 1e4), (48, 96, 1e4), (64, 64, 5e2)]


@pytest.mark.parametrize("cond", [1e5, 1e10])
@pytest.mark.parametrize("kind", KINDS)
def test_families_have_the_stated_condition_numbers(kind, cond):
    for m, n in SHAPES:
        c = gram_condition(family(kind, m, n, cond))
        assert cond / 2 < c < cond * 2, (kind, m, n, c)


@pytest.mark.parametrize("cond", [1e5, 1e7, 1e10])
@pytest.mark.parametrize("kind", KINDS)
def test_whiten_at_its_defaults_matches_the_pseudo_inverse_whitening(kind, cond):
    for m, n in SHAPES:
        g = family(kind, m, n, cond)
        w = whiten(g.float())
        assert w.shape == g.shape and w.dtype == torch.float32
        assert cosine(w, whiten_pinv_reference(g)) >= ACCURACY, (m, n)


@pytest.mark.parametrize("m, n, spike", HEAVY)
def test_whiten_row_standardised_heavy_tailed_rows(m, n, spike):
    for seed in range(2):
        g = heavy_tailed_rows(m, n, spike, seed)
        assert 1e5 <= gram_condition(g) <= 1e10
        ref = whiten_pinv_reference(g)
        assert cosine(whiten(g.float()), ref) >= ACCURACY
        assert cosine(whiten(g.float(), 6), ref) < 0.95  # too few steps: the test can tell


@pytest.mark.parametrize("kind", KINDS)
def test_too_few_steps_miss_the_small_singular_values(kind):
    # The accuracy threshold discriminates: 6 steps resolve only sigma / s >~ 5e-3.
    g = family(kind, 64, 64, 1e10)
    assert cosine(whiten(g.float(), 6), whiten_pinv_reference(g)) < 0.95


def test_default_schedule_and_its_length():
    assert len(polar_schedule()) == DEFAULT_ITERS == len(polar_schedule(DEFAULT_ITERS))
    assert polar_schedule(3) == polar_schedule()[-3:]  # fewer steps: drop growth steps first
    assert polar_schedule(DEFAULT_ITERS + 5)[:DEFAULT_ITERS] == polar_schedule()
    g = family("log_uniform", 16, 40, 1e6).float()
    assert torch.equal(whiten(g), whiten(g, DEFAULT_ITERS))
    with pytest.raises(ValueError, match="iters"):
        polar_schedule(0)


def compose(iters: int, x: torch.Tensor) -> list[torch.Tensor]:
    """The singular values after each step of the schedule, in float64."""
    out = []
    for a, b, c in polar_schedule(iters):
        x = x * (a + x * x * (b + c * x * x))
        out.append(x)
    return out


GRID = torch.cat([torch.logspace(-12, 0, 6001, dtype=torch.float64), torch.linspace(0, 1, 2001, dtype=torch.float64)])


@pytest.mark.parametrize("iters", range(1, 61))
def test_every_schedule_keeps_singular_values_in_range(iters):
    # Inputs are scaled to sigma <= 1: every step keeps them in [0, 1.46] and the result in [0, 1].
    steps = compose(iters, GRID)
    assert all(y.min() >= 0 and y.max() <= 1.46 for y in steps)
    assert steps[-1].max() <= 1 + 1e-6
    assert steps[-1][-1] >= 1 - 1e-6  # sigma_max itself converges for any number of steps


def test_default_resolution_as_documented():
    x = torch.tensor([1e-8, 1e-7, 1.6e-6, 4.3e-6, 1e-4, 1.0], dtype=torch.float64)
    y = compose(DEFAULT_ITERS, x)[-1]
    assert y[0] < 0.01 and y[1] < 0.1  # rounding-level singular values stay small
    assert y[2] >= 0.9
    torch.testing.assert_close(y[3:], torch.ones(3, dtype=torch.float64), rtol=0, atol=1e-6)
    # Extra steps polish: below the cut shrinks, above it stays at 1.
    z = compose(60, x)[-1]
    assert z[1] < y[1] / 5 and z[0] < y[0] / 5
    torch.testing.assert_close(z[2:], torch.ones(4, dtype=torch.float64), rtol=0, atol=1e-6)


def test_growth_polynomial_keeps_its_band():
    a, b, c = polar_schedule(DEFAULT_ITERS)[0]
    x = torch.linspace(0, 1.01, 100001, dtype=torch.float64)
    p = x * (a + x * x * (b + c * x * x))
    assert a > 4.1
    assert p.max() <= 1
    assert p[x >= 0.05].min() >= 0.1 - 1e-6


def singular_inputs() -> dict[str, torch.Tensor]:
    ones_null = torch.randn(32, 32, generator=torch.Generator().manual_seed(7))
    ones_null = ones_null - ones_null.mean(dim=1, keepdim=True)  # centred in fp32: null at ~1e-8
    rank_one = torch.outer(torch.arange(1.0, 33.0), torch.linspace(-1, 2, 48))
    return {
        "centred_square_1e10": family("centred_square", 32, 32, 1e10).float(),
        "rank_deficient_1e10": family("rank_deficient", 32, 48, 1e10).float(),
        "rank_deficient_1e5_tall": family("rank_deficient", 48, 32, 1e5).float(),
        "fp32_centred": ones_null,
        "rank_one": rank_one,
        "zero": torch.zeros(32, 48),
    }


def test_singular_grams_stay_finite_and_bounded_at_every_iteration_count():
    for name, g in singular_inputs().items():
        for iters in range(1, 61):
            w = whiten(g, iters)
            assert torch.isfinite(w).all(), (name, iters)
            assert torch.linalg.svdvals(w.double())[0] <= 1 + 1e-4, (name, iters)


def test_zero_matrix_gives_zero():
    assert torch.equal(whiten(torch.zeros(4, 9)), torch.zeros(4, 9))
    assert torch.equal(whiten(torch.zeros(9, 4), 30), torch.zeros(9, 4))
    assert torch.equal(whiten_pinv_reference(torch.zeros(3, 5)), torch.zeros(3, 5, dtype=torch.float64))


def test_extreme_scales_stay_finite_and_whiten():
    g = family("log_uniform", 8, 20, 1e6)
    for scale in (1e-40, 1e-30, 1e30, 3e37):  # fp32 subnormal to near overflow
        x = (g * scale).float()
        assert torch.isfinite(x).all() and x.abs().max() > 0
        w = whiten(x)
        assert torch.isfinite(w).all()
        assert cosine(w, whiten_pinv_reference(x)) >= ACCURACY, scale
        # Scale-free: a power-of-two rescaling is exact and changes nothing.
        assert torch.equal(w, whiten(x * 2.0**-100 if scale > 1 else x * 2.0**100))


def test_batched_equals_each_matrix_alone():
    # Scales 1e-30..1e30 in one stack: each matrix must be normalised on its own.
    mats = [family(kind, 24, 40, 1e8, seed=i).float() * 10.0 ** (20 * i - 30) for i, kind in enumerate(KINDS[:4])]
    mats.append(heavy_tailed_rows(24, 40, 1e3, seed=0).float())
    mats.append(torch.zeros(24, 40))
    stack = torch.stack(mats).view(2, 3, 24, 40)
    w = whiten(stack)
    assert w.shape == (2, 3, 24, 40) and w.dtype == torch.float32
    # Bitwise equal on this CPU; a kernel that sums in another order may differ by rounding.
    for x, wx in zip(mats, w.view(6, 24, 40)):
        assert_same_whitening(x, wx, whiten(x))
    assert torch.equal(w[1, 2], torch.zeros(24, 40))
    # Tall stacks are whitened as the transposes of their transposes.
    for x, wx in zip(mats, whiten(stack.mT).view(6, 40, 24)):
        assert_same_whitening(x, wx.t(), whiten(x))


def assert_same_whitening(x: torch.Tensor, a: torch.Tensor, b: torch.Tensor) -> None:
    """a and b whiten x alike up to fp32 rounding, as the polar factor's conditioning amplifies it.

    A rounding change of ~1e-6 sigma_max (33 fp32 matmuls over entries <= 1) moves the output along a
    left singular direction with singular value sigma by ~1e-6 sigma_max / sigma, so each direction
    gets 1e-5 + 1e-6 sigma_max / sigma, capped at 0.1: null directions hold whitened rounding noise
    (spectral norm < 0.1), which a different summation order reshuffles entirely.
    """
    u, s, _ = torch.linalg.svd(x.double(), full_matrices=True)
    s = torch.cat([s, s.new_zeros(u.shape[0] - s.numel())])
    tol = (1e-5 + 1e-6 * s[0] / s).nan_to_num(posinf=0.1).clamp(max=0.1)
    diff = (u.t() @ (a.double() - b.double())).abs().amax(dim=1)
    assert (diff <= tol).all(), (diff / tol).max()
    for w in (a, b):
        assert torch.linalg.matrix_norm(u[:, s <= 1e-6 * s[0]].t() @ w.double(), 2) < 0.1


@pytest.mark.parametrize("kind", ["log_uniform", "rank_deficient"])
def test_tall_matrices(kind):
    g = family(kind, 120, 40, 1e10)
    w = whiten(g.float())
    assert w.shape == (120, 40)
    assert torch.equal(w, whiten(g.float().t().contiguous()).t())
    assert cosine(w, whiten_pinv_reference(g)) >= ACCURACY


def tf32(x: torch.Tensor) -> torch.Tensor:
    """Round an fp32 tensor to TF32's 10-bit mantissa (round to nearest)."""
    i = x.contiguous().view(torch.int32)
    return ((i + 0x1000) & ~0x1FFF).view(torch.float32)


@pytest.mark.parametrize("kind", ["log_uniform", "two_clusters", "rank_deficient", "centred_square"])
def test_tf32_operands_with_fp32_accumulation_hold(kind):
    # Emulates TF32 matmuls: every operand rounded to 10 mantissa bits, products summed in fp32.
    g = family(kind, 64, 64, 1e10)
    x = g.float()[None]
    x = x / x.abs().amax()
    x = x / torch.linalg.matrix_norm(x, keepdim=True)
    w = _polar_iteration(x, polar_schedule(), operand=tf32)[0]
    assert cosine(w, whiten_pinv_reference(g)) >= ACCURACY
    assert not torch.equal(w, whiten(g.float()))  # the rounding did act


def test_pinv_reference_is_the_gram_eigendecomposition_with_a_cutoff():
    g = family("rank_deficient", 12, 30, 1e6)
    evals, evecs = torch.linalg.eigh(g @ g.t())
    keep = evals > 1e-12 * evals[-1]  # rcond 1e-6 on singular values
    inv_sqrt = torch.where(keep, evals.clamp_min(1e-300).rsqrt(), torch.zeros_like(evals))
    torch.testing.assert_close(whiten_pinv_reference(g), (evecs * inv_sqrt) @ evecs.t() @ g, rtol=0, atol=1e-8)
    # Without the cutoff the null directions count: the plain polar factor has norm sqrt(12), not 3.
    assert whiten_pinv_reference(g).norm().item() == pytest.approx(3.0)
    assert whiten_reference(g).norm().item() == pytest.approx(math.sqrt(12))


def well_conditioned(m: int, n: int, seed: int = 0, cond: float = 4.0) -> torch.Tensor:
    """U diag(s) V^T with singular values spread over [1, cond] and a random scale."""
    k = min(m, n)
    s = torch.logspace(0, math.log10(cond), k, dtype=torch.float64)
    return with_spectrum(m, n, s, seed) * 3.7 if m <= n else with_spectrum(n, m, s, seed).t() * 3.7


@pytest.mark.parametrize("iters", [10, None])  # SWAN's current ns_iters, and the default
@pytest.mark.parametrize("shape", [(16, 64), (64, 16), (32, 32), (1, 10)])
def test_whiten_matches_polar_factor_and_has_unit_singular_values(shape, iters):
    g = well_conditioned(*shape)
    w = whiten(g.float(), iters)
    assert w.dtype == torch.float32 and w.shape == shape
    # fp32 matmuls over O(1) entries: agreement to ~1e-5 with the float64 U V^T.
    torch.testing.assert_close(w.double(), whiten_reference(g), rtol=0, atol=2e-5)
    s = torch.linalg.svdvals(w.double())
    torch.testing.assert_close(s, torch.ones_like(s), rtol=0, atol=5e-5)


def test_whiten_bf16_input_runs_in_fp32_also_under_autocast():
    g = well_conditioned(16, 40, seed=4).to(torch.bfloat16)
    w = whiten(g)
    assert w.dtype == torch.float32
    torch.testing.assert_close(w.double(), whiten_reference(g.float()), rtol=0, atol=2e-5)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        assert torch.equal(whiten(g), w)


def test_rank_deficient_rows_stay_zero():
    g = torch.zeros(6, 12)
    g[:2] = well_conditioned(2, 12, seed=5).float()  # rank 2 of 6
    w = whiten(g)
    assert torch.isfinite(w).all()
    torch.testing.assert_close(w[:2].double(), whiten_reference(g[:2]), rtol=0, atol=2e-5)
    assert w[2:].abs().max() < 1e-4


def test_whiten_rejects_vectors():
    with pytest.raises(ValueError, match="matri"):
        whiten(torch.ones(5), 5)


def test_inverse_sqrt_matches_eigendecomposition_also_batched():
    x = well_conditioned(20, 40, seed=3).float()
    a = x @ x.t()
    a = a / torch.linalg.matrix_norm(a)
    evals, evecs = torch.linalg.eigh(a.double())
    ref = (evecs * evals.rsqrt()) @ evecs.t()
    z = inverse_sqrt_newton_schulz(a, iters=12)
    torch.testing.assert_close(z.double(), ref, rtol=1e-4, atol=1e-4)  # fp32, condition ~16
    zz = inverse_sqrt_newton_schulz(torch.stack([a, 0.5 * a]), iters=12)
    torch.testing.assert_close(zz[0], z, rtol=0, atol=1e-6)
    torch.testing.assert_close(zz[1].double(), ref * math.sqrt(2), rtol=1e-4, atol=1e-4)
