"""Gradient normalisations used by SinkGD and SWAN (pure functions over tensors).

SinkGD (Scetbon et al., "Gradient Multi-Normalization", Alg. 3 "SR-Sinkhorn") alternates, L times,

    row step     X <- sqrt(n) * Q(X)^-1 X      (every row gets l2 norm sqrt(n))
    column step  X <- sqrt(m) * X R(X)^-1      (every column gets l2 norm sqrt(m))

on a gradient G of shape (m, n). Every iterate is D_r G D_c for two positive diagonals, so the L steps
need only two scale vectors, never L copies of the matrix. Working with squared scales makes this the
textbook Sinkhorn-Knopp iteration on A = G*G with marginals (n 1_m, m 1_n):

    R <- n / (A C)        C <- m / (A^T R)        X = diag(sqrt R) G diag(sqrt C).

SWAN's GradNorm (Ma et al., Alg. 3) standardises each row across the n columns: (G - mean) / std.

All reductions run in fp32 whatever the gradient dtype. A zero row or column stays zero (norms are
clamped at ``eps`` times G's RMS scale before dividing, so nothing becomes NaN and the result does not
depend on the gradient's overall scale).
"""

from __future__ import annotations

import math
from collections.abc import Callable

import torch
from torch import Tensor

__all__ = [
    "add_scaled_",
    "apply_scales",
    "row_standardize",
    "sinkhorn_scales",
    "sr_sinkhorn",
    "sr_sinkhorn_reference",
    "square_fp32",
]


def _own_sums(partial: Tensor, dims: tuple[int, ...]) -> Tensor:
    return partial  # the whole matrix is here: every sum is already complete


def sinkhorn_scales(grad: Tensor, iters: int, eps: float = 1e-8, *,
                    complete: Callable[[Tensor, tuple[int, ...]], Tensor] | None = None,
                    shape: tuple[int, int] | None = None, out: Tensor | None = None) -> tuple[Tensor, Tensor]:
    """Row and column scale vectors ``(r, c)`` such that ``diag(r) G diag(c)`` is SR-Sinkhorn(G, iters).

    ``grad`` is a 2-D tensor (m, n) of any float dtype; ``r`` (m,) and ``c`` (n,) are fp32. ``out``, an
    fp32 tensor of G's shape, holds G*G if given (a reused scratch spares a fresh allocation per matrix,
    whose page faults cost more than the arithmetic on CPU); it is overwritten.

    For a G split across devices, ``grad`` is the local block, ``shape`` G's global shape and
    ``complete(partial, dims)`` turns a sum over G's ``dims`` taken on the local block into the sum over
    all of G (``slimopt.core.distributed.partial_sums``: one small all-reduce when ``dims`` is split).
    """
    if grad.ndim != 2:
        raise ValueError(f"sinkhorn_scales expects a matrix, got shape {tuple(grad.shape)}")
    if math.prod(shape or grad.shape) == 0:  # an empty matrix (globally: an empty shard still all-reduces)
        return (torch.ones(grad.shape[0], dtype=torch.float32, device=grad.device),
                torch.ones(grad.shape[1], dtype=torch.float32, device=grad.device))
    a = square_fp32(grad, out)  # A = G*G, the Sinkhorn-Knopp matrix (fp32 even for bf16 gradients)
    return _sinkhorn_knopp_sqrt(a, iters, eps, complete or _own_sums, tuple(shape or a.shape))


def square_fp32(x: Tensor, out: Tensor | None = None) -> Tensor:
    """x*x computed in fp32 (a bf16 x is widened first: squaring in bf16 would round to 8 bits)."""
    if out is None:
        return x.float().square()
    if x.dtype == torch.float32:
        return torch.mul(x, x, out=out)
    return out.copy_(x).square_()


def _sinkhorn_knopp_sqrt(a: Tensor, iters: int, eps: float, complete: Callable[[Tensor, tuple[int, ...]], Tensor],
                         shape: tuple[int, int]) -> tuple[Tensor, Tensor]:
    m, n = shape
    col_sq = torch.ones(a.shape[1], dtype=torch.float32, device=a.device)  # C: squared column scales
    row_sq = torch.ones(a.shape[0], dtype=torch.float32, device=a.device)  # R: squared row scales
    floor = None
    for _ in range(iters):
        # row step: the squared row norms of diag(sqrt R) G diag(sqrt C) are R * (A C); make them n
        row_norm_sq = complete(torch.mv(a, col_sq), (1,))
        if floor is None:
            # Clamp relative to G's mean square (the first A C holds G's squared row norms), so that
            # the result does not depend on G's scale. After this step the scales are unit-free.
            floor = complete(row_norm_sq.sum(), (0,)).mul_(eps * eps / (m * n)).clamp_min_(1e-30)
        row_sq = row_norm_sq.clamp_min_(floor).reciprocal_().mul_(n)
        # column step: the squared column norms are C * (A^T R); make them m
        col_sq = complete(torch.mv(a.t(), row_sq), (0,)).clamp_min_(eps * eps).reciprocal_().mul_(m)
    return row_sq.sqrt_(), col_sq.sqrt_()


def apply_scales(grad: Tensor, r: Tensor, c: Tensor) -> Tensor:
    """``diag(r) G diag(c)`` in fp32."""
    return grad.float().mul(r[:, None]).mul_(c[None, :])


def add_scaled_(param: Tensor, grad: Tensor, r: Tensor, c: Tensor, alpha: float | Tensor,
                out: Tensor | None = None) -> Tensor:
    """``param += alpha * diag(r) G diag(c)`` in place, in two passes (``out``: optional fp32 scratch).

    ``alpha`` may be a 0-d tensor (a scheduled tensor lr): it is folded into the n-vector ``c``, so no
    Python float is read from it (no sync, no recompilation under ``torch.compile``).
    """
    rows = torch.mul(grad, r[:, None], out=out) if out is not None else grad * r[:, None]  # fp32: r is
    return param.addcmul_(rows, c * alpha)


def sr_sinkhorn(grad: Tensor, iters: int, eps: float = 1e-8) -> Tensor:
    """SR-Sinkhorn(G, L) through the two scale vectors (fp32 result)."""
    r, c = sinkhorn_scales(grad, iters, eps)
    return apply_scales(grad, r, c)


def sr_sinkhorn_reference(grad: Tensor, iters: int, eps: float = 1e-8) -> Tensor:
    """The paper's Algorithm 3 as written: L explicit row and column normalisations of the matrix.

    Kept as the plain reference the scale-vector kernel is tested against. G is first divided by its
    RMS (SR-Sinkhorn is scale-free), so that ``eps`` clamps norms relative to G's own scale.
    """
    x = grad.float()
    m, n = x.shape
    x = x / x.square().mean().sqrt().clamp_min(1e-30)
    for _ in range(iters):
        x = math.sqrt(n) * x / x.norm(dim=1, keepdim=True).clamp_min(eps)
        x = math.sqrt(m) * x / x.norm(dim=0, keepdim=True).clamp_min(eps)
    return x


def row_standardize(grad: Tensor, eps: float = 1e-8) -> Tensor:
    """SWAN's GradNorm: every row minus its mean, divided by its (population) standard deviation.

    Returns fp32. Standard deviations are clamped at ``eps`` times their RMS over the rows, so a
    constant row becomes zero rather than NaN and the result does not depend on G's scale.
    """
    x = grad.float()
    centered = x - x.mean(dim=1, keepdim=True)
    var = centered.square().mean(dim=1, keepdim=True)
    floor = var.mean().sqrt_().mul_(eps).clamp_min_(1e-30)
    return centered.div_(var.sqrt_().clamp_min_(floor))
