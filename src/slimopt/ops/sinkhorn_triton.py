"""Triton twin of SinkGD's kernel (``slimopt.ops.normalize``): SR-Sinkhorn scales and the update.

The torch path materialises A = G*G in an fp32 scratch and runs 2L matrix-vector products on it. Here
each reduction squares G on the fly (no scratch; a bf16 G is read at half the bytes of A):

* ``_row_sums``  (A C)_i   = sum_j G_ij^2 C_j     one program per row
* ``_col_sums``  (A^T R)_j = sum_i G_ij^2 R_i     one program per block of columns
* ``_apply``     W <- W (1 - lr alpha wd) - lr alpha r_i G_ij c_j, in fp32, stored in W's dtype

The length-m and length-n vector steps between them are torch ops, the same as the reference, so the
results differ from ``sinkhorn_scales`` only by summation order. Tested against it under
``TRITON_INTERPRET=1`` on CPU (tests/test_sinkgd_triton.py); on a GPU the same tests run natively.
"""

from __future__ import annotations

from collections.abc import Callable

import torch
from torch import Tensor

from .triton_support import tl, triton, triton_available

__all__ = ["sinkgd_update_triton", "sinkhorn_scales_triton", "triton_available"]


if triton is not None:

    @triton.jit
    def _row_sums(g_ptr, w_ptr, out_ptr, n, stride, BLOCK_N: tl.constexpr):
        row = tl.program_id(0).to(tl.int64)
        acc = tl.zeros([BLOCK_N], dtype=tl.float32)
        for start in range(0, n, BLOCK_N):
            cols = start + tl.arange(0, BLOCK_N)
            mask = cols < n
            g = tl.load(g_ptr + row * stride + cols, mask=mask, other=0.0).to(tl.float32)
            w = tl.load(w_ptr + cols, mask=mask, other=0.0)
            acc += g * g * w
        tl.store(out_ptr + row, tl.sum(acc, axis=0))

    @triton.jit
    def _col_sums(g_ptr, w_ptr, out_ptr, m, n, stride, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr):
        cols = tl.program_id(0) * BLOCK_N + tl.arange(0, BLOCK_N)
        cmask = cols < n
        acc = tl.zeros([BLOCK_N], dtype=tl.float32)
        for start in range(0, m, BLOCK_M):
            rows = start + tl.arange(0, BLOCK_M)
            rmask = rows < m
            g = tl.load(g_ptr + rows[:, None].to(tl.int64) * stride + cols[None, :],
                        mask=rmask[:, None] & cmask[None, :], other=0.0).to(tl.float32)
            w = tl.load(w_ptr + rows, mask=rmask, other=0.0)
            acc += tl.sum(g * g * w[:, None], axis=0)
        tl.store(out_ptr + cols, acc, mask=cmask)

    @triton.jit
    def _apply(p_ptr, g_ptr, r_ptr, c_ptr, alpha, decay, m, n, p_stride, g_stride,
               BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr):
        rows = tl.program_id(0) * BLOCK_M + tl.arange(0, BLOCK_M)
        cols = tl.program_id(1) * BLOCK_N + tl.arange(0, BLOCK_N)
        mask = (rows < m)[:, None] & (cols < n)[None, :]
        r = tl.load(r_ptr + rows, mask=rows < m, other=0.0)
        c = tl.load(c_ptr + cols, mask=cols < n, other=0.0)
        g = tl.load(g_ptr + rows[:, None].to(tl.int64) * g_stride + cols[None, :], mask=mask,
                    other=0.0).to(tl.float32)
        p_offs = rows[:, None].to(tl.int64) * p_stride + cols[None, :]
        p = tl.load(p_ptr + p_offs, mask=mask, other=0.0)
        out = p.to(tl.float32) * decay + alpha * (r[:, None] * g * c[None, :])
        tl.store(p_ptr + p_offs, out.to(p.dtype), mask=mask)


def _row_major(t: Tensor) -> Tensor:
    return t if t.stride(1) == 1 else t.contiguous()


def sinkhorn_scales_triton(grad: Tensor, iters: int, eps: float = 1e-8, *,
                           complete: Callable[[Tensor, tuple[int, ...]], Tensor] | None = None,
                           shape: tuple[int, int] | None = None) -> tuple[Tensor, Tensor]:
    """``sinkhorn_scales`` with the two reductions in Triton (same arguments, same result up to
    summation order)."""
    if grad.ndim != 2:
        raise ValueError(f"sinkhorn_scales_triton expects a matrix, got shape {tuple(grad.shape)}")
    g = _row_major(grad)
    rows, cols = g.shape
    m, n = shape or (rows, cols)
    complete = complete or (lambda partial, dims: partial)
    col_sq = torch.ones(cols, dtype=torch.float32, device=g.device)
    row_sq = torch.ones(rows, dtype=torch.float32, device=g.device)
    row_sums = torch.empty(rows, dtype=torch.float32, device=g.device)
    col_sums = torch.empty(cols, dtype=torch.float32, device=g.device)
    block_n = min(1024, triton.next_power_of_2(max(cols, 1)))
    block_cols = min(128, triton.next_power_of_2(max(cols, 1)))
    floor = None
    for _ in range(iters):
        _row_sums[(rows,)](g, col_sq, row_sums, cols, g.stride(0), BLOCK_N=block_n)
        row_norm_sq = complete(row_sums.clone(), (1,))
        if floor is None:  # relative clamp, as in ops.normalize: the result is scale-free
            floor = complete(row_norm_sq.sum(), (0,)).mul_(eps * eps / (m * n)).clamp_min_(1e-30)
        row_sq = row_norm_sq.clamp_min_(floor).reciprocal_().mul_(n)
        _col_sums[(triton.cdiv(cols, block_cols),)](g, row_sq, col_sums, rows, cols, g.stride(0), BLOCK_M=32,
                                                     BLOCK_N=block_cols)
        col_sq = complete(col_sums.clone(), (0,)).clamp_min_(eps * eps).reciprocal_().mul_(m)
    return row_sq.sqrt_(), col_sq.sqrt_()


def sinkgd_update_triton(param: Tensor, grad: Tensor, iters: int, step_size: float, weight_decay: float = 0.0,
                         eps: float = 1e-8, **scale_kwargs) -> None:
    """W <- W (1 - step_size wd) - step_size SR-Sinkhorn(G, iters), in place, for a row-major matrix W."""
    if param.stride(1) != 1:
        raise ValueError("sinkgd_update_triton needs a row-major parameter (stride 1 along columns)")
    r, c = sinkhorn_scales_triton(grad, iters, eps, **scale_kwargs)
    g = _row_major(grad)
    m, n = g.shape
    grid = (triton.cdiv(m, 32), triton.cdiv(n, 64))
    _apply[grid](param, g, r, c, -step_size, 1.0 - step_size * weight_decay, m, n, param.stride(0), g.stride(0),
                 BLOCK_M=32, BLOCK_N=64)
