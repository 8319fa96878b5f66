"""Gradient whitening with a cutoff, for SWAN: W = U F(S / s) V^T for G = U S V^T (m <= n).

SWAN's GradWhitening is (G G^T)^(-1/2) G = U V^T, which sends every singular value to 1. That is not a
stable function of G: a direction whose singular value is set by rounding (a null direction of a
rank-deficient gradient holds fp32 noise of ~1e-7 sigma_max) comes out with the same weight as the
largest one, so the rounding steers the update. This module computes instead

    W = U F(S / s) V^T,   F = p_5 o ... o p_1,   p_i(x) = a_i x + b_i x^3 + c_i x^5,

a fixed odd polynomial F of the singular values, applied by an iteration on G itself (below) with s a
cheap upper bound on sigma_max (below). F is a soft relative cutoff of the shape of the damped
whitening (G G^T + delta^2 I)^(-1/2) G, x / sqrt(x^2 + delta^2), with delta = 1/F'(0) = 1.5e-3 s (the
two differ by at most 0.17, near the cut):

    sigma / s    1e-5   1e-4   3e-4   7.7e-4  1e-3   2e-3 ... 1
    F            0.007  0.068  0.20   0.50    0.62   in [1 - 0.03, 1 + 0.03]

* at and above ``CUTOFF`` (2e-3 of s) every singular value comes out within 3% of 1 (whitened);
* below, F(x) <= F'(0) x with F'(0) = 683 (F is increasing on [0, CUTOFF]): directions far below the
  largest go towards 0, as a pseudo-inverse with a relative cutoff does. F'(0) is F's largest slope,
  so rounding or any other perturbation of G's singular values by e comes out at most 683 e / s.

Why 2e-3. The cut has to sit above what the gradient and the whitening's own arithmetic resolve, and
below what the whitening must keep.

* Resolution: fp32 rounding leaves ~1e-7 sigma_max in G's null directions; gradients accumulated from
  bf16 or TF32 matmuls (autocast, tensor cores) carry entry errors of 2^-9..2^-11, and the whitening's
  own TF32 operands (below) round every entry by up to 2^-11: noise of ~5e-4 sigma_max in every
  direction of the iterate. A direction below ~1e-3 sigma_max is therefore not resolved on a GPU at
  all, and whitening it to length 1 whitens noise. With the cut at 2e-3 such noise comes out at
  <= 683 x its size.
* Stability (the measured requirement): on gradients of rank a quarter of the smaller side (spectra
  spread 1e-1) a 1e-6 relative perturbation of G moves W by <= 3e-4 relative in fp32 and <= 5e-3 with
  TF32 operands (target 1e-2; the TF32 figure grows as the cut falls: 9e-3 at a cut of 1e-3). The
  previous iteration (11 steps, cut at ~4e-7 s) moved it by up to 0.35.
* Accuracy: on full-rank gradients whose singular values spread down to 1e-3 sigma_max the update keeps
  >= 0.97 cosine to the exact float64 whitening U V^T (target 0.95; a cut of 3e-3 would give 0.952 on
  two clusters at 1 and 1e-3, the hardest of the test families).

The scale s. The iteration needs every singular value of X_0 = G / s in [0, 1] (the polynomials blow
up past their interval), so s must bound sigma_max from above; the cutoff is relative to s, so the
tighter the better. With lambda = sigma^2 the eigenvalues of A = X X^T and mu_j = sum lambda^j (mu_2 =
||A||_F^2, mu_3 = <A, A^2>, mu_4 = ||A^2||_F^2, all from the first step's A and A^2, no extra matmul):
sum lambda^2 (lambda - c)^2 >= lambda_max^2 (lambda_max - c)^2 for any c; at c = mu_3 / mu_2 the left
side is D = mu_4 - mu_3^2 / mu_2, so lambda_max <= (c + sqrt(c^2 + 4 sqrt(D))) / 2; also lambda_max <=
mu_4^(1/4) (the Schatten-8 norm, the previous scale). s^2 is the smaller of the two
(``spectral_bound``). s / sigma_max: 1.00 for a flat spectrum and for two clusters at 1 and 1e-3 (the
Schatten-8 norm alone: up to m^(1/8), 2.6 at m = 2048), 1.00-1.04 for power laws, 1.06-1.50 for log-
uniform spectra and Gaussian matrices up to m = 2048. Rounding (fp32, TF32) moves the computed bound by
~1e-3 relative, which the schedule's 2% margin (``WIDEN``) absorbs.

The polynomials (``derive_schedule``, which reproduces ``_SCHEDULE``). Each p_i is the odd quintic
closest to 1 in the max norm on its input interval [l_i, 1.02 u_i] (Remez exchange,
``minimax_quintic``): the greedy schedule of "The Polar Express" (Amsel et al., 2025), fitted on
intervals widened by 2% at the top against rounding and against the scale's error. Step 1 starts
from [CUTOFF, 1.02]; p_i maps its interval onto [1 - E_i, 1 + E_i], which is step i+1's [l, u]:

    step  input interval     output interval      p'(0)
    1     [0.002, 1.02]      [0.0165, 1.983]      8.26
    2     [0.0165, 2.023]    [0.0667, 1.933]      4.04
    3     [0.0667, 1.972]    [0.244, 1.756]       3.67
    4     [0.244, 1.791]     [0.653, 1.347]       2.79
    5     [0.653, 1.374]     [0.9705, 1.0295]     2.00

F'(0) is the product of the p_i'(0): 683. Five steps is what the cost target allows (below); a sixth
would take [0.97, 1.03] to 1 +- 4e-5 and nearly double F'(0). ``iters`` < 5 applies the last ``iters``
steps (the cut moves up by the dropped steps' p'(0)); steps past 5 apply p(x) = x + g x (x^2 - 0.09)
(1 - x^2), g = 1 / 1.82 (fixed points 0 with p'(0) = 0.95, 0.3 unstable, 1 with p'(1) = 0), which
polishes the top to 1 and pushes values below 0.3 towards 0 without growing any.

The iteration. With X_0 = G / s, each step is

    A = X X^T,   X <- a X + (b A + c A^2) X,

so X_k = U p_k(...p_1(S / s)) V^T: three matmuls a step (X X^T and the product with X, m^2 n
multiply-adds each, and A A, m^3), 2 m^2 n + m^3 a step, 10 m^2 n + 5 m^3 at the default (the previous
11 steps: 22 m^2 n + 11 m^3). On G, not on the Gram matrix G G^T: the cut's eigenvalue of the Gram is
4e-6 of the largest, and a Gram formed with TF32 operands carries errors of ~1e-3 of it (fp32: 1e-7);
on G the cut is at 2e-3, above TF32's rounding. A stack (..., m, n) goes through ``torch.bmm`` /
``torch.baddbmm`` as one batch. A rank-deficient G is no special case: a null direction has singular
value 0 and F(0) = 0. The result is finite for every finite input.

Precision. On CPU everything is fp32 (fp32 products, fp32 accumulation). On CUDA the matmuls run with
TF32 operands and fp32 accumulation (``torch.backends.cuda.matmul.fp32_precision = "tf32"`` around
them, restored after; ``tf32=False`` keeps full fp32). Measured by emulation (every matmul operand
rounded to a 10-bit mantissa, round-to-nearest or truncated, before an fp32 matmul: the ``operand=``
hook of ``_polar_iteration``), on the families above: cosine to the exact whitening within 4e-3 of
fp32's (>= 0.971), >= 0.9999 to the float64 reference of F, a 1e-6 perturbation moving W by <= 4.5e-3
(to nearest) and 4.9e-3 (truncated). bf16 operands (7-bit mantissa) were measured too and fail: a 1e-6
perturbation moves W by 0.02-0.025, past the 1e-2 target, because F grows the rounding noise (2^-9
relative) they put into the null directions. Neither was measured on GPU hardware
(``tests/test_ops_newton_schulz.py`` has a GPU test).

Cost at the ``1b`` preset (``gpu_step_estimate.py``, fp32 parameters): the whitening was 140.6 TFLOP a
step (11 fp32 steps, predicted 249x fused AdamW's step); now 63.9 TFLOP at TF32 speed, 23.5x. A sixth
TF32 step would be ~27x, past the 25x target; fp32 matmuls at 5 steps are 116x.
"""

from __future__ import annotations

import contextlib
import math
from collections.abc import Callable, Iterator

import torch
from torch import Tensor

__all__ = [
    "CUTOFF",
    "DEFAULT_ITERS",
    "WIDEN",
    "derive_schedule",
    "minimax_quintic",
    "polar_schedule",
    "singular_value_map",
    "spectral_bound",
    "whiten",
    "whiten_cutoff_reference",
    "whiten_pinv_reference",
    "whiten_reference",
    "whiten_stacked_",
]

Coefficients = tuple[float, float, float]  # p(x) = a x + b x^3 + c x^5

CUTOFF = 2e-3  # singular values at and above CUTOFF * s come out within 3% of 1 (s: ``spectral_bound``)
WIDEN = 0.02  # each step's interval is widened by 2% at the top, against rounding and the scale's error
DEFAULT_ITERS = 5

# derive_schedule(CUTOFF, DEFAULT_ITERS, WIDEN) as printed on the CPU it was derived on (the test derives
# it again and compares to 1e-12): the greedy minimax quintics, step 1 first.
_SCHEDULE: tuple[Coefficients, ...] = (
    (8.263222760512566, -23.504199369861926, 16.754055389848887),  # [0.002, 1.02] -> [0.0165, 1.983]
    (4.036999872760442, -2.887657066279116, 0.5215665376942005),  # [0.0165, 2.023] -> [0.0667, 1.933]
    (3.6701282810834766, -2.6409937093278533, 0.49533509848619456),  # [0.0667, 1.972] -> [0.244, 1.756]
    (2.7931812267751153, -2.0149776228860223, 0.4297896848757999),  # [0.244, 1.791] -> [0.653, 1.347]
    (1.9960629159760659, -1.3507602920876856, 0.3656177997566295),  # [0.653, 1.374] -> [0.9705, 1.0295]
)
# Past the default: p(x) = x + g x (x^2 - t^2)(1 - x^2), t = 0.3, g = 1 / (2 (1 - t^2)). Fixed points
# 0 (p'(0) = 0.95: shrinks), t (unstable) and 1 (p'(1) = 0): sharpens the cutoff and polishes the top
# instead of growing rounding noise; maps [0, 1.1] into [0, 1].
_POLISH: Coefficients = (0.9505494505494505, 0.5989010989010989, -0.5494505494505494)


def minimax_quintic(lo: float, hi: float, rounds: int = 100) -> tuple[Coefficients, float]:
    """The odd quintic p(x) = a x + b x^3 + c x^5 closest to 1 on [lo, hi] in the max norm, and that
    distance E = max |p - 1| on [lo, hi] (0 < lo < hi).

    Remez exchange in float64: p - 1 equioscillates at four points, lo, the two interior extrema x1 < x2
    and hi (p(lo) = 1 - E, p(x1) = 1 + E, p(x2) = 1 - E, p(hi) = 1 + E). Each round solves those four
    equations, linear in (a, b, c, E), on the current points, then moves x1, x2 to the extrema of the new
    p: the roots of p'(x) = a + 3 b x^2 + 5 c x^4, a quadratic in x^2.
    """
    if not 0 < lo < hi:
        raise ValueError(f"minimax_quintic needs 0 < lo < hi, got lo={lo!r}, hi={hi!r}")
    points = [lo, lo + 0.25 * (hi - lo), lo + 0.75 * (hi - lo), hi]
    for _ in range(rounds):
        x = torch.tensor(points, dtype=torch.float64)
        system = torch.stack([x, x**3, x**5, torch.tensor([1.0, -1.0, 1.0, -1.0], dtype=torch.float64)], dim=1)
        a, b, c, err = torch.linalg.solve(system, torch.ones(4, dtype=torch.float64)).tolist()
        disc = 9 * b * b - 20 * a * c  # p'(x) = 0  <=>  5c y^2 + 3b y + a = 0, y = x^2
        if disc <= 0 or c == 0:
            break
        roots = sorted(((-3 * b + sign * math.sqrt(disc)) / (10 * c)) for sign in (-1.0, 1.0))
        extrema = [math.sqrt(y) for y in roots if y > 0 and lo < math.sqrt(y) < hi]
        if len(extrema) != 2:
            break
        new = [lo, *extrema, hi]
        if all(abs(u - v) <= 1e-15 * hi for u, v in zip(new, points)):
            break
        points = new
    return (a, b, c), abs(err)


def derive_schedule(cutoff: float = CUTOFF, steps: int = DEFAULT_ITERS, widen: float = WIDEN) -> list[Coefficients]:
    """The greedy minimax schedule: step 1 is the quintic closest to 1 on [cutoff, 1 + widen]; each next
    one the quintic closest to 1 on [1 - E, (1 + E)(1 + widen)], where 1 +- E is the previous one's
    image of its interval. ``derive_schedule()`` gives ``_SCHEDULE``."""
    out = []
    lo, hi = cutoff, 1.0
    for _ in range(steps):
        coefficients, err = minimax_quintic(lo, hi * (1 + widen))
        out.append(coefficients)
        lo, hi = 1 - err, 1 + err
    return out


def polar_schedule(iters: int | None = None) -> list[Coefficients]:
    """The odd quintics ``(a, b, c)`` that ``whiten`` applies, in order, for ``iters`` steps (None: the
    default 5). Up to 5: the last ``iters`` of ``_SCHEDULE`` (fewer steps resolve less of the small end
    of the spectrum); further steps append the polishing quintic."""
    k = DEFAULT_ITERS if iters is None else int(iters)
    if k < 1:
        raise ValueError(f"iters must be a positive integer, got {iters!r}")
    main = min(k, len(_SCHEDULE))
    return list(_SCHEDULE[len(_SCHEDULE) - main:]) + [_POLISH] * (k - main)


def singular_value_map(x: Tensor, iters: int | None = None) -> Tensor:
    """F(x): what ``iters`` steps do to a singular value x (of G / s), elementwise, in x's dtype."""
    for a, b, c in polar_schedule(iters):
        x = x * (a + x * x * (b + c * x * x))
    return x


def spectral_bound(mu2: Tensor, mu3: Tensor, mu4: Tensor) -> Tensor:
    """An upper bound on lambda_max from mu_j = sum_i lambda_i^j of non-negative lambda_i: the smaller of
    (c + sqrt(c^2 + 4 sqrt(D))) / 2, c = mu3 / mu2, D = mu4 - mu3^2 / mu2 (from sum lambda^2 (lambda -
    c)^2 >= lambda_max^2 (lambda_max - c)^2), and mu4^(1/4). Zero moments give 0."""
    c = mu3 / mu2.clamp_min(torch.finfo(mu2.dtype).tiny)
    d = torch.sub(mu4, mu3 * c).clamp_min_(0)
    return torch.minimum(c.square().add_(d.sqrt_(), alpha=4).sqrt_().add_(c).mul_(0.5), mu4.sqrt().sqrt_())


def _polar_iteration(x: Tensor, steps: list[Coefficients],
                     operand: Callable[[Tensor], Tensor] | None = None, *, overwrite: bool = False,
                     work: Tensor | None = None, transposes: tuple[Tensor, Tensor] | None = None) -> Tensor:
    """Scale a stack ``x`` (b, m, n) by ``spectral_bound`` and apply the quintics; 3 matmuls a step.

    ``operand`` (tests only) rounds every matmul operand, to emulate TF32 / bf16 inputs with fp32
    accumulation on hardware that computes in full fp32.

    The iterates alternate between two buffers whose transposes are made once, so a step is exactly
    its 3 launches (a transpose view per step would be a 4th). ``overwrite``: ``x`` (fp32, contiguous)
    is one of the two buffers and is overwritten; ``work`` (x's shape) may give the other, and
    ``transposes`` the views ``(x.mT, work.mT)``. The result is whichever buffer the last step wrote
    (``work`` after an odd number of steps).
    """
    r = operand if operand is not None else (lambda t: t)
    # First step: its A and A @ A also give the scale s^2 = spectral_bound(...) >= sigma_max^2.
    x_t = x.mT if transposes is None else transposes[0]
    a_ = torch.bmm(r(x), r(x_t))
    a2 = torch.bmm(r(a_), r(a_))
    mu2 = torch.linalg.matrix_norm(a_, keepdim=True).square_()
    mu4 = torch.linalg.matrix_norm(a2, keepdim=True).square_()
    mu3 = torch.mul(a_, a2).sum(dim=(-2, -1), keepdim=True)  # <A, A^2> = trace(A^3)
    s2 = spectral_bound(mu2, mu3, mu4).clamp_min_(1e-18)  # (a zero matrix: 0; s2^2 must not underflow)
    if overwrite:
        x.div_(s2.sqrt())
    else:
        x = x / s2.sqrt()
        x_t = x.mT
    a_.div_(s2)
    a2.div_(s2.square_())
    y = torch.empty_like(x, memory_format=torch.contiguous_format) if work is None else work
    y_t = y.mT if transposes is None or work is None else transposes[1]
    for i, (a, b, c) in enumerate(steps):
        if i == 0:
            poly = torch.add(a_.mul_(b), a2, alpha=c)  # b A + c A^2
        else:
            a_ = torch.bmm(r(x), r(x_t))
            poly = torch.baddbmm(a_, r(a_), r(a_), beta=b, alpha=c)
        torch.baddbmm(x, r(poly), r(x), beta=a, out=y)  # a X + (b A + c A^2) X
        if i == 0 and not x.is_contiguous():  # a strided input (a tall matrix's transpose): iterate contiguous
            x = torch.empty_like(y)
            x_t = x.mT
        x, y, x_t, y_t = y, x, y_t, x_t
    return x


@contextlib.contextmanager
def _matmul_precision(device: torch.device, tf32: bool) -> Iterator[None]:
    """fp32 matmuls for the iteration: autocast off (no bf16 / fp16), and on CUDA with ``tf32`` TF32
    operands with fp32 accumulation (the new-API flag, set here and restored after)."""
    with contextlib.ExitStack() as stack:
        with contextlib.suppress(RuntimeError):  # a device type without autocast (e.g. meta) raises
            stack.enter_context(torch.autocast(device_type=device.type, enabled=False))
        if device.type != "cuda" or not tf32:
            yield
            return
        flags = torch.backends.cuda.matmul
        before = flags.fp32_precision
        flags.fp32_precision = "tf32"
        try:
            yield
        finally:
            flags.fp32_precision = before


def whiten_stacked_(x: Tensor, iters: int | None = None, *, work: Tensor | None = None,
                    transposes: tuple[Tensor, Tensor] | None = None, tf32: bool = True) -> Tensor:
    """``whiten`` for an fp32 stack (b, m, n), m <= n, of matrices with Frobenius norm at most ~1 (e.g.
    rows standardised and divided by sqrt(m n)), overwriting ``x``.

    ``whiten`` first divides each matrix by its largest entry and then by its Frobenius norm, only so
    that X X^T and its square cannot overflow or underflow; an input already at unit scale skips those
    launches, and the iteration takes its scale from X X^T and its square as in ``whiten``, so the result
    is the same up to fp32 rounding. ``work`` (x's shape) is the second buffer of the iteration (allocated
    if None); the result is ``work`` after an odd number of steps (the default 5) and ``x`` after an even
    one. ``transposes`` may pass ``(x.mT, work.mT)`` (views a caller keeps). ``tf32``: on CUDA, TF32
    matmul operands (the default; see the module docstring), else full fp32.
    """
    if x.ndim != 3 or x.shape[-2] > x.shape[-1] or x.dtype != torch.float32:
        raise ValueError(f"whiten_stacked_ expects an fp32 stack (b, m, n) with m <= n, got {x.dtype} "
                         f"{tuple(x.shape)}")
    steps = polar_schedule(iters)
    if x.numel() == 0:
        return x
    with _matmul_precision(x.device, tf32):
        return _polar_iteration(x, steps, overwrite=True, work=work, transposes=transposes)


def _nonzero(t: Tensor) -> Tensor:
    return torch.where(t > 0, t, torch.ones_like(t))


def whiten(grad: Tensor, iters: int | None = None, *, tf32: bool = True) -> Tensor:
    """U F(S / s) V^T (the module docstring) for a matrix or a stack of matrices (..., m, n), in fp32.

    Each matrix is whitened on its own (its own scale); a tall one (m > n) as the transpose of its
    transpose's whitening. ``iters`` counts polynomial steps (3 matmuls each, see ``polar_schedule``);
    ``None`` means ``DEFAULT_ITERS``. Zero matrices give zeros, rank-deficient ones near-zero null
    directions, finite inputs finite outputs; a non-finite input gives a non-finite output. ``tf32``: on
    CUDA, TF32 matmul operands (the default), else full fp32.
    """
    if grad.ndim < 2:
        raise ValueError(f"whiten expects a matrix or a stack of matrices, got shape {tuple(grad.shape)}")
    steps = polar_schedule(iters)
    g = grad.float()
    tall = g.shape[-2] > g.shape[-1]
    if tall:
        g = g.mT
    *batch, m, n = g.shape
    if g.numel() == 0:
        out = torch.zeros(*batch, m, n, dtype=torch.float32, device=g.device)
        return out.mT if tall else out
    x = g.reshape(-1, m, n)
    # Max-abs first so the Frobenius norm cannot overflow, then ||X||_F = 1 >= sigma_max. (Zero
    # matrices divide by 1; no clamp, so that subnormal inputs are scaled exactly.)
    x = x / _nonzero(x.abs().amax(dim=(-2, -1), keepdim=True))
    x = x / _nonzero(torch.linalg.matrix_norm(x, keepdim=True))
    with _matmul_precision(x.device, tf32):
        out = _polar_iteration(x, steps).reshape(*batch, m, n)
    return out.mT if tall else out


def _unit_max(g: Tensor) -> Tensor:
    """Each matrix over its largest |entry| (LAPACK's SVD can fail to converge near the overflow range)."""
    if g.numel() == 0:
        return g
    return g / g.abs().amax(dim=(-2, -1), keepdim=True).clamp_min(torch.finfo(g.dtype).tiny)


def whiten_cutoff_reference(grad: Tensor, iters: int | None = None) -> Tensor:
    """What ``whiten`` computes, in float64 from an SVD: U F(S / s) V^T with s^2 = ``spectral_bound`` of
    the moments of S^2 and F = ``singular_value_map``. Zero matrix -> zero."""
    u, s, vh = torch.linalg.svd(_unit_max(grad.double()), full_matrices=False)
    lam = s.square()
    s2 = spectral_bound(*(lam.pow(j).sum(dim=-1, keepdim=True) for j in (2, 3, 4))).clamp_min(1e-300)
    return (u * singular_value_map(s / s2.sqrt(), iters).unsqueeze(-2)) @ vh


def whiten_reference(grad: Tensor) -> Tensor:
    """U V^T from a float64 SVD of each matrix: the exact polar factor (every singular value -> 1)."""
    u, _, vh = torch.linalg.svd(_unit_max(grad.double()), full_matrices=False)
    return u @ vh


def whiten_pinv_reference(grad: Tensor, rcond: float = 1e-6) -> Tensor:
    """(G G^T)^(+1/2) G in float64: U V^T over the singular values above ``rcond`` times the largest (the
    exact whitening of a rank-deficient G, whose zero singular values fp32 holds at ~1e-7). Zero -> zero."""
    u, s, vh = torch.linalg.svd(_unit_max(grad.double()), full_matrices=False)
    keep = s > rcond * s[..., :1]
    return (u * keep.unsqueeze(-2)) @ vh
