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

Two forms of each kernel. The per-matrix functions (``sinkhorn_scales``, ``add_scaled_``,
``row_standardize``) are the plain references, and the path for a matrix sharded across devices. The
stacked ones (``sinkhorn_scaled_add_stacked_``, ``row_standardize_stacked_``, ``add_stacked_``) update k
same-shaped matrices with one launch per operation: they are what SinkGD and SWAN run on a bucket of
same-shaped matrices, and are tested against the per-matrix ones (tests/test_ops_normalize.py). On CUDA,
SinkGD takes a third form, ``slimopt.ops.sinkhorn_triton`` (Triton kernels over tables of matrix addresses:
2L + 1 launches for all of a group's matrices, no stacks), tested against these
(tests/test_ops_sinkhorn_triton.py).
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence

import torch
from torch import Tensor

__all__ = [
    "add_scaled_",
    "add_stacked_",
    "apply_scales",
    "decay_factors",
    "row_standardize",
    "row_standardize_stacked_",
    "sinkhorn_scaled_add_stacked_",
    "sinkhorn_scales",
    "sinkhorn_scales_stacked",
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


# --------------------------------------------------------------------------------------------------
# stacked kernels: k same-shaped matrices, one launch per operation for all of them


def sinkhorn_scales_stacked(a: Tensor, iters: int, eps: float = 1e-8, *,
                            a_t: Tensor | None = None) -> tuple[Tensor, Tensor]:
    """``sinkhorn_scales`` of k matrices at once, from their squares ``a`` = G*G (fp32, (k, m, n), m, n > 0).

    Returns ``r`` (k, 1, m) and ``c`` (k, 1, n), fp32, such that ``r^T * G * c`` is SR-Sinkhorn(G, iters)
    for each matrix. ``a_t`` may pass ``a.mT`` (a view a caller keeps from step to step). Each half-step
    is two launches for the whole stack, a batched matrix-vector product and a reciprocal; the target
    norms and the floors ride in ``baddbmm``'s ``alpha`` and ``input``:

        R = 1 / ((A C + f) / n)        C = 1 / ((A^T R + eps^2) / m)

    with f = eps^2 * mean(G^2), so the floors are *added* where ``sinkhorn_scales`` clamps with them: a
    row of norm rho moves by a relative (eps * rms(G) / rho)^2, nothing for all but rows within ~1e-4 of
    zero (whose entries are negligible in the update either way), and a zero row stays zero. f / n is
    kept >= 1e-37 (an all-zero G: R stays finite), which is below any gradient's squares that fp32 holds
    to full precision, so a gradient of RMS 1e-13 gives the same direction as one of RMS 1. The sums run
    in another order than ``sinkhorn_scales`` (a batched product, not ``mv``): they differ by rounding.

    Launches: 8 + 4 * iters (28 at the default 5), whatever k.
    """
    _, m, n = a.shape
    a_t = a.mT if a_t is None else a_t
    row_norm_sq = a.sum(dim=2).unsqueeze_(1)  # (k, 1, m): A 1, the first row step's A C (C = 1)
    # the floor relative to G's mean square, as in sinkhorn_scales, divided by n for the scaled form
    floor = row_norm_sq.sum(dim=2, keepdim=True).mul_(eps * eps / (m * n * n)).clamp_min_(1e-37)
    col_floor = torch.full_like(floor, eps * eps / m)
    row_sq = torch.add(floor, row_norm_sq, alpha=1.0 / n).reciprocal_()  # R = n / (A 1 + f)
    col_sq = row_sq
    for i in range(iters):
        if i:
            row_sq = torch.baddbmm(floor, col_sq, a_t, alpha=1.0 / n).reciprocal_()  # R = n / (A C + f)
        col_sq = torch.baddbmm(col_floor, row_sq, a, alpha=1.0 / m).reciprocal_()  # C = m / (A^T R + eps^2)
    return row_sq.sqrt_(), col_sq.sqrt_()


def sinkhorn_scaled_add_stacked_(params: Sequence[Tensor], grads: Sequence[Tensor], iters: int, lr: float | Tensor,
                           scale: float = 1.0, decay: float | Tensor | None = None, eps: float = 1e-8, *,
                           stack: Tensor, gram: Tensor, gram_t: Tensor | None = None,
                           updates: Sequence[Tensor] | None = None, gram_rows: Sequence[Tensor] | None = None,
                           grads_finite: bool = False) -> Tensor:
    """The SR-Sinkhorn step of k same-shaped matrices: ``W <- W * decay - lr scale SR-Sinkhorn(G, iters)``, in place.
    Returns which matrices were left alone (bool, (k, 1, 1), on the device: see below).

    ``decay`` is the weight-decay factor 1 - lr scale wd (None: no decay). ``lr`` (and ``decay``) may be
    0-d tensors (a scheduled lr: never read on the host); ``lr`` and ``scale`` are applied as two
    multiplications, so that a tensor lr and the same float give the same bits. ``params`` and
    ``grads`` are k (m, n) tensors (views of any layout; gradients in any float
    dtype); ``stack`` and ``gram`` are fp32 work buffers of shape (k, m, n), overwritten. A caller that
    keeps them from step to step may also pass ``gram_t`` = ``gram.mT``, ``updates`` =
    ``stack.unbind(0)`` and ``gram_rows`` = ``gram.unbind(0)``, which saves those views' launches.

    Non-finite results without a host sync: a matrix whose scales come out non-finite (a NaN or inf in
    its gradient, or G*G overflowing) gets zero scales and a decay of 1, so it is left exactly as it
    was; the others step. ``grads_finite`` says every gradient was checked finite by the caller; without
    it one more pass over the update turns NaN (a non-finite G times a zero scale) into zero.

    The design, per stack of k matrices (L = iters):

    * launches: 1 stack G, 1 square, 8 + 4L for the scales (``sinkhorn_scales_stacked``), 8 to zero the
      scales of a non-finite matrix and fold the step size into them, 2 to scale the rows and columns of
      the stack, 1 multi-tensor add into the parameters: 4L + 21 = 41 at L = 5, for all k matrices (the
      per-matrix path: ~50 per matrix). Weight decay adds 4, non-fp32 parameters 2 (``add_stacked_``);
      ``grads_finite=False`` adds the clean-up pass;
    * bytes per element (fp32 G and W): stack G (read 4, write 4), square it into A (8), the first row
      sums of A (4), 2L - 1 batched matrix-vector products that each read A (4 each: 36 at L = 5),
      scale the stack's rows and then its columns (8 + 8), W += U (read 8, write 4): 84 B at L = 5
      (bf16 G: 82). The per-matrix torch path moves 68 B (no stack, but one launch sequence per matrix);
      2L + 1 passes over G with the squares taken on the fly, the minimum without a cache, are 52 B
      (what ``slimopt.ops.sinkhorn_triton`` moves on CUDA); fused AdamW moves 28 B.
    * the cache: the 2L - 1 products re-read A. Launches are per stack, so a stack of several MB to
      ~256 MB (the caller's cap, see ``slimopt.optim.hybrid``) comes from HBM every time; a stack that
      fits in L2 (50 MB on an H100, 60 MB on an H200: one 2048 x 5461 fp32 A is 45 MB) would serve the
      2L - 1 re-reads from L2 and move ~44 B, at one stack per matrix, i.e. ~40 launches per matrix
      again. Few large stacks are the default (launch overhead, not bandwidth, dominated the per-matrix
      path on an H200: 20,902 kernels for 1.34B parameters); the cap is a knob, and a CUDA graph of the
      step (which this function allows: no host sync, no allocation when the buffers are kept) removes
      launch overhead and favours the L2-sized stacks.
    """
    torch.stack(list(grads), out=stack)  # G, widened to fp32
    torch.mul(stack, stack, out=gram)  # A = G*G
    r, c = sinkhorn_scales_stacked(gram, iters, eps, a_t=gram_t)  # (k, 1, m), (k, 1, n)
    # c is finite iff the matrix's scales are (a NaN in R reaches every column, an overflowed A_ij makes
    # column j NaN): one sum per matrix, and x - x is NaN exactly for NaN and inf
    total = c.sum(dim=2, keepdim=True)  # (k, 1, 1)
    bad = torch.sub(total, total).ne(0)
    c = c.masked_fill_(bad, 0.0).mul_(-scale).mul_(lr)  # the step folded into the column scales
    r = r.masked_fill_(bad, 0.0).mT  # (k, m, 1)
    stack.mul_(r).mul_(c)  # U = alpha diag(r) G diag(c)
    if not grads_finite:
        stack.nan_to_num_(0.0, 0.0, 0.0)  # a non-finite G times its zeroed scales
    factors = None if decay is None else decay_factors(total, decay, bad)
    add_stacked_(params, stack, factors, work=gram, updates=updates, work_rows=gram_rows)
    return bad


def decay_factors(like: Tensor, decay: float | Tensor, skip: Tensor) -> Tensor:
    """The weight-decay factor ``decay`` (a float or a 0-d tensor) per matrix, shaped like ``like``
    ((k, 1, 1) fp32), 1 where ``skip``: 2 launches."""
    if isinstance(decay, Tensor):  # (a 0-d CPU tensor, as a scheduled lr makes it, joins as a scalar)
        return torch.where(skip, 1.0, decay)
    return torch.full_like(like, decay).masked_fill_(skip, 1.0)


def add_stacked_(params: Sequence[Tensor], update: Tensor, decay: Tensor | None = None, *,
                 work: Tensor | None = None, updates: Sequence[Tensor] | None = None,
                 work_rows: Sequence[Tensor] | None = None) -> None:
    """``params[j] <- params[j] * decay[j] + update[j]`` for k same-shaped tensors, in place.

    ``update`` is an fp32 stack (k, ...) of the parameters' shape; ``decay`` None or (k, 1, 1). Every
    parameter is computed in fp32 and rounded once to its dtype (W * decay + U is an ``addcmul``, which
    torch's CPU and CUDA kernels may contract into one FMA). fp32 parameters without decay: one multi-tensor add
    (read W and U, write W: 12 B per element; ``updates`` may pass ``update.unbind(0)``). Otherwise the
    parameters are stacked into ``work`` (fp32, ``update``'s shape, overwritten; allocated if None),
    updated there and copied back (``work_rows``: ``work.unbind(0)``): 3 launches, 32 B per element for
    fp32 W, 24 B for bf16 W. Parameters wider than the update (fp64) are updated one at a time in their
    own dtype.
    """
    params = list(params)
    if decay is None and all(p.dtype == update.dtype for p in params):
        torch._foreach_add_(params, list(updates) if updates is not None else list(update.unbind(0)))
        return
    if any(p.dtype.itemsize > update.dtype.itemsize for p in params):
        # wider than the update (fp64 W): no fp32 stack of W; one op pair per tensor (a CPU/test dtype)
        for j, (p, u) in enumerate(zip(params, updates if updates is not None else update.unbind(0))):
            (p if decay is None else p.mul_(decay[j])).add_(u)
        return
    work = torch.empty_like(update) if work is None else work
    torch.stack(params, out=work)
    if decay is None:
        work.add_(update)
    else:
        torch.addcmul(update, work, decay, out=work)  # W * decay + U: W rounded as W.mul_(decay) would be
    torch._foreach_copy_(params, list(work_rows) if work_rows is not None else list(work.unbind(0)))


def row_standardize_stacked_(x: Tensor, eps: float = 1e-8, *, scale: float = 1.0) -> Tensor:
    """``row_standardize`` of every matrix of an fp32 stack (..., m, n), in place, times ``scale``.

    Nine launches for the whole stack. Each row's standard deviation is taken as its norm over sqrt(n)
    (no squared copy of the stack), and the floor, ``eps`` times the RMS of the row deviations, is
    computed per matrix: the same as ``row_standardize`` on each matrix up to fp32 rounding.
    """
    m, n = x.shape[-2], x.shape[-1]
    if x.numel() == 0:
        return x
    x.sub_(x.mean(dim=-1, keepdim=True))
    norms = torch.linalg.vector_norm(x, dim=-1, keepdim=True)  # sqrt(n) * std, per row
    # eps * sqrt(mean of the variances), in the norms' units (sqrt(n) * std), clamped as row_standardize does
    floor = torch.linalg.vector_norm(norms, dim=-2, keepdim=True).mul_(eps / math.sqrt(m))
    floor.clamp_min_(1e-30 * math.sqrt(n))
    return x.div_(norms.clamp_min_(floor).mul_(1.0 / (math.sqrt(n) * scale)))
