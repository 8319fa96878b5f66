"""The cutoff whitening (``slimopt.ops.newton_schulz``) against float64 references.

Families are generated in float64 with controlled spectra (seeded) and whitened after a cast to fp32,
the way SWAN sees them. Three references:

* ``whiten_cutoff_reference``: the same definition, U F(S / s) V^T from a float64 SVD; what the fp32
  iteration must reproduce up to rounding;
* ``whiten_reference`` (U V^T) and ``whiten_pinv_reference`` (U V^T over the nonzero singular values):
  the exact whitening, for the accuracy target (>= 0.95 cosine on full-rank spectra down to 1e-3).

TF32 and bf16 matmuls are emulated by rounding every matmul operand to a 10- or 7-bit mantissa before an
fp32 matmul (``_polar_iteration``'s ``operand`` hook); TF32 both to nearest and truncated, since which
one a GPU's tensor cores do is not documented for cuBLAS.
"""

from __future__ import annotations

import math
from collections.abc import Callable

import pytest
import torch

from slimopt.ops import newton_schulz as ns
from slimopt.ops.newton_schulz import (
    CUTOFF,
    DEFAULT_ITERS,
    WIDEN,
    _polar_iteration,
    derive_schedule,
    minimax_quintic,
    polar_schedule,
    singular_value_map,
    spectral_bound,
    whiten,
    whiten_cutoff_reference,
    whiten_pinv_reference,
    whiten_reference,
)

TARGET_COSINE = 0.95  # the accuracy target (to the exact whitening, spectra down to 1e-3)
TARGET_MOVE = 1e-2  # the stability target (a 1e-6 relative perturbation of G)
F_SLOPE = math.prod(a for a, _, _ in polar_schedule())  # F'(0), F's largest slope: 683
TOP_ERROR = 0.0295  # F in [1 - TOP_ERROR, 1 + TOP_ERROR] on [CUTOFF, 1 + WIDEN]


def cosine(x: torch.Tensor, y: torch.Tensor) -> float:
    x, y = x.double(), y.double()
    return ((x * y).sum() / (x.norm() * y.norm())).item()


def spectral(x: torch.Tensor) -> float:
    return torch.linalg.matrix_norm(x.double(), 2).item()


def with_spectrum(m: int, n: int, s: torch.Tensor, seed: int) -> torch.Tensor:
    """U diag(s) V^T in float64 with random orthonormal U (m x k) and V (n x k), k = len(s)."""
    g = torch.Generator().manual_seed(seed)
    u, _ = torch.linalg.qr(torch.randn(m, len(s), generator=g, dtype=torch.float64))
    v, _ = torch.linalg.qr(torch.randn(n, len(s), generator=g, dtype=torch.float64))
    return (u * s) @ v.t()


def spectrum(kind: str, k: int, spread: float) -> torch.Tensor:
    """k singular values, the largest 1, the smallest nonzero one ``spread``."""
    low = math.log10(spread)
    if kind == "log_uniform":
        return torch.logspace(0, low, k, dtype=torch.float64)
    if kind == "power_law":  # sigma_i = i^-alpha: most singular values near the small end
        return torch.arange(1, k + 1, dtype=torch.float64) ** (low / math.log10(k))
    if kind == "two_clusters":  # half at 1, half at the bottom: the hardest split for a cosine
        return torch.where(torch.arange(k) < k // 2, 1.0, spread).double()
    if kind == "rank_deficient":  # three quarters exactly zero: rank a quarter of the smaller side
        s = torch.zeros(k, dtype=torch.float64)
        s[: k // 4] = torch.logspace(0, low, k // 4, dtype=torch.float64)
        return s
    raise ValueError(kind)


def family(kind: str, m: int, n: int, spread: float, seed: int = 0) -> torch.Tensor:
    """A float64 matrix of the family; ``centred_square`` is m x m with each row's mean removed."""
    if kind == "centred_square":  # rows sum to zero: the all-ones vector is a null direction
        x = with_spectrum(m, m, spectrum("log_uniform", m, spread), seed)
        return x - x.mean(dim=1, keepdim=True)
    tall = m > n
    x = with_spectrum(min(m, n), max(m, n), spectrum(kind, min(m, n), spread), seed)
    return x.t() if tall else x


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


def rounded(bits: int, truncate: bool = False) -> Callable[[torch.Tensor], torch.Tensor]:
    """Round an fp32 tensor to a ``bits``-bit mantissa: to nearest, or towards zero."""
    drop = 23 - bits

    def rounding(x: torch.Tensor) -> torch.Tensor:
        i = x.contiguous().view(torch.int32)
        if not truncate:
            i = i + (1 << (drop - 1))
        return (i & ~((1 << drop) - 1)).view(torch.float32)
    return rounding


TF32 = rounded(10)
TF32_TRUNCATED = rounded(10, truncate=True)
BF16 = rounded(7)
PRECISIONS = {"fp32": None, "tf32": TF32, "tf32_truncated": TF32_TRUNCATED}


def emulated(g: torch.Tensor, operand: Callable[[torch.Tensor], torch.Tensor] | None,
             iters: int | None = None, steps: list | None = None) -> torch.Tensor:
    """``whiten`` of one fp32 matrix with every matmul operand passed through ``operand``."""
    x = g.float()
    tall = x.shape[0] > x.shape[1]
    x = (x.t() if tall else x).contiguous()[None]
    x = x / x.abs().amax()
    x = x / torch.linalg.matrix_norm(x, keepdim=True)
    w = _polar_iteration(x, polar_schedule(iters) if steps is None else steps, operand=operand)[0]
    return w.t() if tall else w


def moved(whitening: Callable[[torch.Tensor], torch.Tensor], g: torch.Tensor, rel: float, seed: int) -> float:
    """|W(G + E) - W(G)| / |W(G)| for a random E with |E|_F = rel |G|_F (Frobenius norms; G fp32)."""
    gen = torch.Generator().manual_seed(1000 + seed)
    e = torch.randn(g.shape, generator=gen, dtype=torch.float64)
    perturbed = (g.double() + e * (rel * g.double().norm() / e.norm())).float()
    w = whitening(g)
    return ((whitening(perturbed) - w).norm() / w.norm()).item()


KINDS = ["log_uniform", "power_law", "two_clusters", "rank_deficient", "centred_square"]
SHAPES = [(32, 128), (64, 64), (96, 48)]  # wide, square, tall
FULL_RANK = ["log_uniform", "power_law", "two_clusters"]
# (m, n, spike): Gram condition numbers 1e9, 2e9-3e9 and 1e9-5e9 (square: plus the centring's null).
HEAVY = [(32, 128, 1e4), (48, 96, 1e4), (64, 64, 5e2)]


@pytest.mark.parametrize("kind", KINDS)
def test_families_have_the_stated_spread(kind):
    for m, n in SHAPES:
        s = torch.linalg.svdvals(family(kind, m, n, 1e-3))
        s = s[s > 1e-10 * s[0]]
        assert 0.5e-3 < (s[-1] / s[0]).item() < 2e-3, (kind, m, n)
        rank = {"rank_deficient": min(m, n) // 4, "centred_square": m - 1}.get(kind, min(m, n))  # centred: m x m
        assert len(s) == rank, (kind, m, n)


# -- the fp32 iteration computes its definition ------------------------------------------------------


@pytest.mark.parametrize("spread", [1e-3, 1e-5, 1e-8])
@pytest.mark.parametrize("kind", KINDS)
def test_whiten_is_its_float64_definition(kind, spread):
    # fp32 rounding (~1e-6 of the iterate) moves W by at most F's largest slope (683 per unit of
    # sigma / s) times it: ~7e-4 in the spectral norm; measured <= 1e-4 (two clusters, where half the
    # singular values sit at the steep part of F).
    for m, n in SHAPES:
        g = family(kind, m, n, spread)
        w = whiten(g.float())
        assert w.shape == g.shape and w.dtype == torch.float32
        ref = whiten_cutoff_reference(g.float())
        assert spectral(w - ref) <= 1e-3, (m, n)
        assert cosine(w, ref) >= 0.99999, (m, n)


@pytest.mark.parametrize("m, n, spike", HEAVY)
def test_heavy_tailed_rows_are_their_float64_definition(m, n, spike):
    for seed in range(2):
        g = heavy_tailed_rows(m, n, spike, seed).float()
        assert spectral(whiten(g) - whiten_cutoff_reference(g)) <= 1e-3


@pytest.mark.parametrize("precision", ["tf32", "tf32_truncated"])
@pytest.mark.parametrize("kind", KINDS)
def test_tf32_operands_hold_the_definition(kind, precision):
    # TF32 rounds each operand by up to 2^-11 relative: measured cosine >= 0.99993 to the float64
    # definition (the singular values right at the cut move most), on every family and spread.
    for spread in (1e-3, 1e-8):
        for m, n in SHAPES:
            g = family(kind, m, n, spread).float()
            w = emulated(g, PRECISIONS[precision])
            assert cosine(w, whiten_cutoff_reference(g)) >= 0.9995, (spread, m, n)
            assert not torch.equal(w, emulated(g, None))  # the rounding did act


# -- the targets ------------------------------------------------------------------------------


@pytest.mark.parametrize("precision", list(PRECISIONS))
@pytest.mark.parametrize("kind", FULL_RANK)
def test_accuracy_target_full_rank_spectra_down_to_1e_3(kind, precision):
    # Measured >= 0.971 (two clusters at 1 and 1e-3; the cut's F(1e-3) = 0.62), >= 0.99 otherwise.
    for m, n in [*SHAPES, (128, 512)]:
        for seed in range(2):
            g = family(kind, m, n, 1e-3, seed)
            w = emulated(g.float(), PRECISIONS[precision])
            assert cosine(w, whiten_reference(g)) >= TARGET_COSINE, (m, n, seed)


@pytest.mark.parametrize("kind", FULL_RANK)
def test_accuracy_target_can_fail(kind):
    # Three steps cut at ~3e-2 (F(x) = 0.5): spectra down to 1e-3 lose most of their small end.
    g = family(kind, 64, 64, 1e-3)
    assert cosine(whiten(g.float(), 3), whiten_reference(g)) < TARGET_COSINE


@pytest.mark.parametrize("precision", list(PRECISIONS))
def test_stability_target_rank_deficient_gradients(precision):
    # Rank a quarter of the smaller side, nonzero singular values spread 1e-1; a 1e-6 relative
    # perturbation of G. Measured <= 3e-4 in fp32, 4.5e-3 (TF32, to nearest) and 4.9e-3 (truncated).
    operand = PRECISIONS[precision]
    for m, n in [*SHAPES, (128, 512), (256, 256)]:
        for seed in range(2):
            g = family("rank_deficient", m, n, 1e-1, seed).float()
            assert moved(lambda x: emulated(x, operand), g, 1e-6, seed) <= TARGET_MOVE, (m, n, seed)
            assert cosine(emulated(g, operand), whiten_pinv_reference(g)) >= 0.999


def test_stability_target_can_fail():
    # A cut at 1e-6 (as the 11-step iteration this replaces had, ~4e-7) lets fp32 rounding in the null
    # directions steer the update, and so does a TF32 iteration with bf16 operands (7-bit mantissa):
    # the reasons for the cut's place and for TF32.
    deep = derive_schedule(1e-6, 9)
    moves_deep, moves_bf16 = [], []
    for m, n in [(64, 64), (32, 128)]:
        g = family("rank_deficient", m, n, 1e-1, 0).float()
        moves_deep.append(moved(lambda x: emulated(x, None, steps=deep), g, 1e-6, 0))
        moves_bf16.append(moved(lambda x: emulated(x, BF16), g, 1e-6, 0))
    assert min(moves_deep) > 10 * TARGET_MOVE and min(moves_bf16) > TARGET_MOVE


def test_null_directions_of_rank_deficient_inputs_stay_small():
    # fp32 puts a rank-deficient G's zero singular values at ~1e-7 sigma_max; F maps them to <= 683 x
    # that (relative to s >= sigma_max): ~1e-4.
    for m, n in SHAPES:
        g = family("rank_deficient", m, n, 1e-3).float()
        u, s, _ = torch.linalg.svd(g.double(), full_matrices=True)
        null = u[:, min(m, n) // 4:]
        assert spectral(null.t() @ whiten(g).double()) <= 1e-3


# -- the schedule -------------------------------------------------------------------------------------


def test_schedule_is_the_derived_greedy_minimax_schedule():
    derived = derive_schedule()
    assert len(derived) == DEFAULT_ITERS == len(polar_schedule())
    for got, want in zip(polar_schedule(), derived):
        assert got == pytest.approx(want, rel=1e-12, abs=1e-12)
    assert polar_schedule(3) == polar_schedule()[-3:]  # fewer steps: drop the first (growth) steps
    assert polar_schedule(DEFAULT_ITERS + 4)[:DEFAULT_ITERS] == polar_schedule()
    assert len(set(polar_schedule(DEFAULT_ITERS + 4)[DEFAULT_ITERS:])) == 1  # the polishing step
    g = family("log_uniform", 16, 40, 1e-3).float()
    assert torch.equal(whiten(g), whiten(g, DEFAULT_ITERS))
    with pytest.raises(ValueError, match="iters"):
        polar_schedule(0)


@pytest.mark.parametrize("lo, hi", [(CUTOFF, 1 + WIDEN), (0.1, 1.2), (0.9, 1.1), (1e-6, 1.0)])
def test_minimax_quintic_equioscillates(lo, hi):
    (a, b, c), err = minimax_quintic(lo, hi)
    x = torch.linspace(lo, hi, 400001, dtype=torch.float64)
    dev = x * (a + x * x * (b + c * x * x)) - 1
    assert dev.abs().max().item() == pytest.approx(err, rel=1e-6)
    assert dev[0].item() == pytest.approx(-err, rel=1e-9) and dev[-1].item() == pytest.approx(err, rel=1e-9)
    # four alternating extremes of size err (Chebyshev's criterion for the best approximation)
    turns = (torch.diff(torch.sign(torch.diff(dev))) != 0).sum().item()
    assert turns == 2 and (dev.max() + dev.min()).abs().item() <= 1e-6 * err
    with pytest.raises(ValueError, match="lo"):
        minimax_quintic(1.0, 0.5)


def test_each_step_maps_its_widened_interval_onto_the_next_ones():
    lo, hi = CUTOFF, 1.0
    for a, b, c in polar_schedule():
        x = torch.linspace(lo, hi * (1 + WIDEN), 200001, dtype=torch.float64)
        y = x * (a + x * x * (b + c * x * x))
        new_lo, new_hi = y.min().item(), y.max().item()
        assert new_lo == pytest.approx(2 - new_hi, abs=1e-9)  # [1 - E, 1 + E]
        lo, hi = new_lo, new_hi
    assert 1 - lo == pytest.approx(TOP_ERROR, abs=1e-4)


def test_default_map_is_a_soft_cutoff_as_documented():
    x = torch.linspace(0, 1 + WIDEN, 2000001, dtype=torch.float64)
    f = singular_value_map(x)
    top = f[x >= CUTOFF]
    assert top.min().item() >= 1 - TOP_ERROR and top.max().item() <= 1 + TOP_ERROR
    below = f[x <= CUTOFF]
    assert (torch.diff(below) > 0).all()  # increasing up to the cut
    assert 682.5 < F_SLOPE < 682.7
    assert (f <= F_SLOPE * x * (1 + 1e-12)).all()  # F(x) <= F'(0) x: bounded slope at 0
    assert (torch.diff(f) / torch.diff(x)).max().item() <= F_SLOPE * (1 + 1e-6)  # F'(0) is F's largest slope
    points = torch.tensor([1e-5, 1e-4, 3e-4, 7.7e-4, 1e-3], dtype=torch.float64)
    torch.testing.assert_close(singular_value_map(points), torch.tensor([0.0068, 0.068, 0.20, 0.50, 0.62],
                               dtype=torch.float64), rtol=0.02, atol=0)


def test_extra_steps_polish_the_top_and_never_grow_small_values():
    x = torch.linspace(0, 1 + WIDEN, 200001, dtype=torch.float64)
    f5 = singular_value_map(x)
    for iters, error in [(6, 4e-3), (7, 5e-5), (8, 1e-8)]:
        f = singular_value_map(x, iters)
        assert (f[x >= CUTOFF] - 1).abs().max().item() <= error, iters
        assert (f[x < 3e-4] <= f5[x < 3e-4]).all(), iters


GRID = torch.cat([torch.logspace(-12, 0, 6001, dtype=torch.float64),
                  torch.linspace(0, 1 + WIDEN, 2001, dtype=torch.float64)])


@pytest.mark.parametrize("iters", range(1, 31))
def test_every_schedule_keeps_singular_values_in_range(iters):
    # Inputs are scaled to sigma <= 1 (1.02 with rounding): every step stays in its interval.
    x = GRID
    for a, b, c in polar_schedule(iters):
        x = x * (a + x * x * (b + c * x * x))
        assert x.min() >= 0 and x.max() <= 2.1
    assert x.max() <= 1 + TOP_ERROR + 1e-9


# -- the scale ----------------------------------------------------------------------------------------


def moments(lam: torch.Tensor) -> tuple[torch.Tensor, ...]:
    return tuple(lam.pow(j).sum(dim=-1) for j in (2, 3, 4))


def test_spectral_bound_is_an_upper_bound_and_tight_on_two_levels():
    gen = torch.Generator().manual_seed(3)
    for trial in range(300):
        k = int(torch.randint(1, 300, (1,), generator=gen))
        kind = trial % 4
        if kind == 0:
            lam = torch.rand(k, generator=gen, dtype=torch.float64)
        elif kind == 1:
            lam = 10 ** (-8 * torch.rand(k, generator=gen, dtype=torch.float64))
        elif kind == 2:  # a few near the top
            lam = torch.where(torch.rand(k, generator=gen) < 0.1, 1 - 0.1 * torch.rand(k, generator=gen), 1e-3).double()
        else:  # power law with zeros
            lam = torch.arange(1, k + 1, dtype=torch.float64) ** -torch.rand(1, generator=gen, dtype=torch.float64)
            lam[torch.rand(k, generator=gen) < 0.5] = 0
        bound = spectral_bound(*moments(lam))
        assert bound >= lam.max() * (1 - 1e-12), trial
        assert bound <= moments(lam)[2] ** 0.25 * (1 + 1e-12)
    two_levels = torch.tensor([0.7] * 5 + [0.0] * 9, dtype=torch.float64)
    for lam in (two_levels, torch.full((2048,), 0.3, dtype=torch.float64)):
        assert spectral_bound(*moments(lam)).item() == pytest.approx(lam.max().item(), rel=1e-6)
    assert spectral_bound(*moments(torch.zeros(4, dtype=torch.float64))).item() == 0


@pytest.mark.parametrize("kind", FULL_RANK)
def test_scale_is_within_1_5_of_sigma_max(kind):
    # What sets the cut relative to sigma_max: s / sigma_max (the Schatten-8 norm alone: up to m^(1/8)).
    for m in (64, 256, 2048):
        lam = spectrum(kind, m, 1e-3).square()
        assert 1 <= spectral_bound(*moments(lam)).sqrt().item() <= 1.5


# -- edge cases ---------------------------------------------------------------------------------------


def singular_inputs() -> dict[str, torch.Tensor]:
    ones_null = torch.randn(32, 32, generator=torch.Generator().manual_seed(7))
    ones_null = ones_null - ones_null.mean(dim=1, keepdim=True)  # centred in fp32: null at ~1e-8
    rank_one = torch.outer(torch.arange(1.0, 33.0), torch.linspace(-1, 2, 48))
    return {
        "centred_square": family("centred_square", 32, 32, 1e-5).float(),
        "rank_deficient": family("rank_deficient", 32, 48, 1e-5).float(),
        "rank_deficient_tall": family("rank_deficient", 48, 32, 1e-1).float(),
        "fp32_centred": ones_null,
        "rank_one": rank_one,
        "zero": torch.zeros(32, 48),
    }


def test_singular_inputs_stay_finite_and_bounded_at_every_iteration_count():
    for name, g in singular_inputs().items():
        for iters in range(1, 31):
            w = whiten(g, iters)
            assert torch.isfinite(w).all(), (name, iters)
            assert torch.linalg.svdvals(w.double())[0] <= 1 + TOP_ERROR + 1e-4, (name, iters)


def test_zero_matrix_gives_zero():
    assert torch.equal(whiten(torch.zeros(4, 9)), torch.zeros(4, 9))
    assert torch.equal(whiten(torch.zeros(9, 4), 30), torch.zeros(9, 4))
    assert torch.equal(whiten_cutoff_reference(torch.zeros(3, 5)), torch.zeros(3, 5, dtype=torch.float64))


def test_extreme_scales_stay_finite_and_whiten():
    g = family("log_uniform", 8, 20, 1e-3)
    for scale in (1e-40, 1e-30, 1e30, 3e37):  # fp32 subnormal to near overflow
        x = (g * scale).float()
        assert torch.isfinite(x).all() and x.abs().max() > 0
        w = whiten(x)
        assert torch.isfinite(w).all()
        assert spectral(w - whiten_cutoff_reference(x)) <= 1e-3, scale
        # Scale-free: a power-of-two rescaling is exact and changes nothing.
        assert torch.equal(w, whiten(x * 2.0**-100 if scale > 1 else x * 2.0**100))


def test_batched_equals_each_matrix_alone():
    # Scales 1e-30..1e30 in one stack: each matrix must be normalised on its own. Bitwise equal on this
    # CPU; a kernel that sums in another order may differ by fp32 rounding times F's slope (<= 683):
    # ~1e-3 at most in the spectral norm.
    mats = [family(kind, 24, 40, 1e-4, seed=i).float() * 10.0 ** (20 * i - 30) for i, kind in enumerate(KINDS[:4])]
    mats.append(heavy_tailed_rows(24, 40, 1e3, seed=0).float())
    mats.append(torch.zeros(24, 40))
    stack = torch.stack(mats).view(2, 3, 24, 40)
    w = whiten(stack)
    assert w.shape == (2, 3, 24, 40) and w.dtype == torch.float32
    for x, wx in zip(mats, w.view(6, 24, 40)):
        assert spectral(wx - whiten(x)) <= 1e-3
    assert torch.equal(w[1, 2], torch.zeros(24, 40))
    # Tall stacks are whitened as the transposes of their transposes.
    for x, wx in zip(mats, whiten(stack.mT).view(6, 40, 24)):
        assert spectral(wx.t() - whiten(x)) <= 1e-3


@pytest.mark.parametrize("kind", ["log_uniform", "rank_deficient"])
def test_tall_matrices(kind):
    g = family(kind, 120, 40, 1e-4)
    w = whiten(g.float())
    assert w.shape == (120, 40)
    assert torch.equal(w, whiten(g.float().t().contiguous()).t())
    assert spectral(w - whiten_cutoff_reference(g.float())) <= 1e-3


def well_conditioned(m: int, n: int, seed: int = 0, cond: float = 4.0) -> torch.Tensor:
    """U diag(s) V^T with singular values spread over [1, cond] and a random scale."""
    k = min(m, n)
    s = torch.logspace(0, math.log10(cond), k, dtype=torch.float64)
    return with_spectrum(m, n, s, seed) * 3.7 if m <= n else with_spectrum(n, m, s, seed).t() * 3.7


@pytest.mark.parametrize("shape", [(16, 64), (64, 16), (32, 32), (1, 10)])
def test_well_conditioned_matrices_are_whitened_and_polished_to_the_polar_factor(shape):
    g = well_conditioned(*shape)
    w = whiten(g.float())
    assert w.dtype == torch.float32 and w.shape == shape
    s = torch.linalg.svdvals(w.double())
    assert ((s - 1).abs() <= TOP_ERROR + 1e-5).all()  # the default: within 3% of 1
    # Three polishing steps: the polar factor U V^T to fp32 accuracy (~1e-5 over O(1) entries).
    w = whiten(g.float(), DEFAULT_ITERS + 3)
    torch.testing.assert_close(w.double(), whiten_reference(g), rtol=0, atol=2e-5)


def test_whiten_bf16_input_runs_in_fp32_also_under_autocast():
    g = well_conditioned(16, 40, seed=4).to(torch.bfloat16)
    w = whiten(g)
    assert w.dtype == torch.float32
    torch.testing.assert_close(w.double(), whiten_cutoff_reference(g.float()), rtol=0, atol=2e-5)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        assert torch.equal(whiten(g), w)


def test_rank_deficient_rows_stay_zero():
    g = torch.zeros(6, 12)
    g[:2] = well_conditioned(2, 12, seed=5).float()  # rank 2 of 6
    w = whiten(g, DEFAULT_ITERS + 3)
    assert torch.isfinite(w).all()
    torch.testing.assert_close(w[:2].double(), whiten_reference(g[:2]), rtol=0, atol=2e-5)
    assert w[2:].abs().max() == 0


def test_whiten_rejects_vectors():
    with pytest.raises(ValueError, match="matri"):
        whiten(torch.ones(5), 5)


def test_pinv_reference_is_the_gram_eigendecomposition_with_a_cutoff():
    g = family("rank_deficient", 12, 30, 1e-3)
    evals, evecs = torch.linalg.eigh(g @ g.t())
    keep = evals > 1e-12 * evals[-1]  # rcond 1e-6 on singular values
    inv_sqrt = torch.where(keep, evals.clamp_min(1e-300).rsqrt(), torch.zeros_like(evals))
    torch.testing.assert_close(whiten_pinv_reference(g), (evecs * inv_sqrt) @ evecs.t() @ g, rtol=0, atol=1e-8)
    # Without the cutoff the null directions count: the plain polar factor has norm sqrt(12), not sqrt(3).
    assert whiten_pinv_reference(g).norm().item() == pytest.approx(math.sqrt(3))
    assert whiten_reference(g).norm().item() == pytest.approx(math.sqrt(12))


# -- precision on CUDA -------------------------------------------------------------------------------


def test_tf32_flag_is_set_only_around_the_matmuls_and_restored():
    flags = torch.backends.cuda.matmul
    before = flags.fp32_precision
    cuda = torch.device("cuda")
    with ns._matmul_precision(cuda, tf32=True):
        assert flags.fp32_precision == "tf32"
    assert flags.fp32_precision == before
    with ns._matmul_precision(cuda, tf32=False):
        assert flags.fp32_precision == before
    with pytest.raises(RuntimeError, match="boom"), ns._matmul_precision(cuda, tf32=True):
        raise RuntimeError("boom")
    assert flags.fp32_precision == before
    with ns._matmul_precision(torch.device("cpu"), tf32=True):  # CPU computes in fp32: nothing set
        assert flags.fp32_precision == before


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_on_gpu_tf32_meets_the_targets_and_fp32_matches_the_cpu():
    before = torch.backends.cuda.matmul.fp32_precision
    for kind in FULL_RANK:
        g = family(kind, 128, 512, 1e-3)
        w = whiten(g.float().cuda()).cpu()
        assert cosine(w, whiten_reference(g)) >= TARGET_COSINE
        assert cosine(w, whiten_cutoff_reference(g.float())) >= 0.9995
        assert spectral(whiten(g.float().cuda(), tf32=False).cpu() - whiten_cutoff_reference(g.float())) <= 1e-3
    for m, n in [(64, 64), (128, 512), (256, 256)]:
        g = family("rank_deficient", m, n, 1e-1, 0).float()
        assert moved(lambda x: whiten(x.cuda()).cpu(), g, 1e-6, 0) <= TARGET_MOVE
    assert torch.backends.cuda.matmul.fp32_precision == before
