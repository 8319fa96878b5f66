"""Triton kernels for one MicroAdam step of one tensor (the GPU path).

Each kernel mirrors a torch reference, and the tests hold them against each other (on CPU under
``TRITON_INTERPRET=1``):

* ``dequant_add``      a = g + Q^-1(e)                         ops.quant.dequantize_4bit + add
* ``block_topk``       Top-K per block by radix select on |a|'s bits; writes the window row
                       (ascending block-relative indices, bf16 values) and zeroes a there
                                                               ops.topk.block_topk
* ``bucket_ranges`` /  per-bucket min/max rounded outwards to bf16, then 4-bit codes, two per byte
  ``quantize_pack``                                            ops.quant.bucket_ranges / quantize_4bit
* ``window_update``    one program per Top-K block: adds the window rows into fp32 scratch moments row
                       by row (indices are unique within a row, so no atomics and a fixed summation
                       order), then the dense pass p <- p * (1 - lr wd) - lr * c1 M / (sqrt(c2 S) + eps)
                                                               ops.microadam_window.adam_update_from_window

The scratch moments are 8 bytes per entry of the tensor being stepped, on the GPU only while it is
stepped (the official kernels keep them in shared memory instead).
"""

from __future__ import annotations

from typing import Any

import torch
from torch import Tensor

from .microadam_window import bias_corrections, row_weights
from .topk import block_layout
from .triton_support import tl, triton, triton_available

__all__ = ["microadam_step_triton", "triton_available"]


if triton is not None:

    @triton.jit
    def _dequant_add_kernel(codes_ptr, lo_ptr, hi_ptr, grad_ptr, out_ptr, n, bucket_size,
                            BLOCK: tl.constexpr):
        offs = tl.program_id(0).to(tl.int64) * BLOCK + tl.arange(0, BLOCK)
        mask = offs < n
        byte = tl.load(codes_ptr + offs // 2, mask=mask, other=0).to(tl.int32)
        code = tl.where(offs % 2 == 0, byte >> 4, byte & 15).to(tl.float32)
        bucket = offs // bucket_size
        lo = tl.load(lo_ptr + bucket, mask=mask, other=0.0).to(tl.float32)
        hi = tl.load(hi_ptr + bucket, mask=mask, other=0.0).to(tl.float32)
        grad = tl.load(grad_ptr + offs, mask=mask, other=0.0).to(tl.float32)
        tl.store(out_ptr + offs, (code * ((hi - lo) / 15.0) + lo) + grad, mask=mask)

    @triton.jit
    def _block_topk_kernel(a_ptr, idx_ptr, val_ptr, n, block_size, k_block, k_tail, BLOCK: tl.constexpr):
        block = tl.program_id(0).to(tl.int64)
        start = block * block_size
        length = tl.minimum(block_size, n - start)
        k = tl.where(length == block_size, k_block, k_tail)
        cols = tl.arange(0, BLOCK)
        mask = cols < length
        a = tl.load(a_ptr + start + cols, mask=mask, other=0.0)
        # |a| as int32 bits orders like |a|; -1 marks lanes past the block so they are never chosen
        key = tl.where(mask, (a.to(tl.int32, bitcast=True) & 0x7FFFFFFF), -1)
        # radix select: the largest threshold with at least k keys >= it is the k-th largest key
        threshold = tl.zeros((), dtype=tl.int32)
        for bit in tl.static_range(30, -1, -1):
            candidate = threshold | (1 << bit)
            threshold = tl.where(tl.sum((key >= candidate).to(tl.int32), axis=0) >= k, candidate, threshold)
        above = key > threshold
        tied = key == threshold
        need = k - tl.sum(above.to(tl.int32), axis=0)
        chosen = above | (tied & (tl.cumsum(tied.to(tl.int32), axis=0) <= need))  # ties: lower index first
        slot = tl.cumsum(chosen.to(tl.int32), axis=0) - 1
        out = block * k_block + slot
        tl.store(idx_ptr + out, cols.to(tl.int16), mask=chosen)
        tl.store(val_ptr + out, _bf16_nearest(a).to(tl.bfloat16), mask=chosen)
        tl.store(a_ptr + start + cols, tl.zeros_like(a), mask=chosen)

    @triton.jit
    def _round_bf16(x, down: tl.constexpr):
        """fp32 -> nearest bf16 towards -inf (down) or +inf, as fp32: truncate, then step out if inexact."""
        bits = x.to(tl.int32, bitcast=True)
        truncated = bits & -65536  # 0xFFFF0000: rounds the magnitude towards zero
        inexact = (bits & 65535) != 0
        if down:
            away = bits < 0  # towards -inf: a negative value grows in magnitude
        else:
            away = bits >= 0
        bumped = tl.where(inexact & away, truncated + 65536, truncated)
        return bumped.to(tl.float32, bitcast=True)

    @triton.jit
    def _bf16_nearest(x):
        """fp32 -> nearest bf16 (ties to even), as an fp32 whose low 16 bits are zero. Done on the bits
        because the interpreter's own fp32 -> bf16 cast truncates."""
        bits = x.to(tl.int32, bitcast=True)
        rounded = (bits + (32767 + ((bits >> 16) & 1))) & -65536
        return rounded.to(tl.float32, bitcast=True)

    @triton.jit
    def _bucket_ranges_kernel(a_ptr, lo_ptr, hi_ptr, n, bucket_size, BLOCK: tl.constexpr):
        bucket = tl.program_id(0).to(tl.int64)
        start = bucket * bucket_size
        end = tl.minimum(start + bucket_size, n)
        lo = tl.full((), float("inf"), tl.float32)
        hi = tl.full((), float("-inf"), tl.float32)
        for offset in range(0, bucket_size, BLOCK):
            offs = start + offset + tl.arange(0, BLOCK)
            mask = offs < end
            x = tl.load(a_ptr + offs, mask=mask, other=0.0)
            lo = tl.minimum(lo, tl.min(tl.where(mask, x, float("inf")), axis=0))
            hi = tl.maximum(hi, tl.max(tl.where(mask, x, float("-inf")), axis=0))
        tl.store(lo_ptr + bucket, _round_bf16(lo, True).to(tl.bfloat16))
        tl.store(hi_ptr + bucket, _round_bf16(hi, False).to(tl.bfloat16))

    @triton.jit
    def _code(x, lo_ptr, hi_ptr, bucket, mask):
        lo = tl.load(lo_ptr + bucket, mask=mask, other=0.0).to(tl.float32)
        hi = tl.load(hi_ptr + bucket, mask=mask, other=0.0).to(tl.float32)
        step = (hi - lo) / 15.0
        quantised = step >= 1.1754943508222875e-38  # ops.quant.TINY: below it, 1 / step is inf
        inv_step = tl.where(quantised, 1.0 / tl.where(quantised, step, 1.0), 0.0)
        y = tl.floor((x - lo) * inv_step + 0.5)
        return tl.minimum(tl.maximum(y, 0.0), 15.0).to(tl.int32)

    @triton.jit
    def _quantize_pack_kernel(a_ptr, lo_ptr, hi_ptr, codes_ptr, n, bucket_size, BLOCK: tl.constexpr):
        pair = tl.program_id(0).to(tl.int64) * BLOCK + tl.arange(0, BLOCK)
        even, odd = 2 * pair, 2 * pair + 1
        has_even, has_odd = even < n, odd < n
        x_even = tl.load(a_ptr + even, mask=has_even, other=0.0)
        x_odd = tl.load(a_ptr + odd, mask=has_odd, other=0.0)
        high = _code(x_even, lo_ptr, hi_ptr, even // bucket_size, has_even)
        low = tl.where(has_odd, _code(x_odd, lo_ptr, hi_ptr, odd // bucket_size, has_odd), 0)
        tl.store(codes_ptr + pair, ((high << 4) | low).to(tl.uint8), mask=has_even)

    @triton.jit
    def _window_update_kernel(p_ptr, idx_ptr, val_ptr, w1_ptr, w2_ptr, first_ptr, second_ptr, n, m, k_total,
                              block_size, k_block, c1, c2, eps, lr, decay, K_BLOCK: tl.constexpr,
                              BLOCK: tl.constexpr):
        block = tl.program_id(0).to(tl.int64)
        start = block * block_size
        length = tl.minimum(block_size, n - start)
        col0 = block * k_block
        cols = tl.arange(0, K_BLOCK)
        in_block = (col0 + cols < k_total) & (cols < k_block)
        for row in range(0, m):  # rows in order 0..m-1, as the torch reference sums them
            w1 = tl.load(w1_ptr + row)
            w2 = tl.load(w2_ptr + row)
            rel = tl.load(idx_ptr + row * k_total + col0 + cols, mask=in_block, other=0).to(tl.int64)
            v = tl.load(val_ptr + row * k_total + col0 + cols, mask=in_block, other=0.0).to(tl.float32)
            pos = start + rel
            first = tl.load(first_ptr + pos, mask=in_block, other=0.0)
            second = tl.load(second_ptr + pos, mask=in_block, other=0.0)
            tl.store(first_ptr + pos, first + v * w1, mask=in_block)
            tl.store(second_ptr + pos, second + (v * v) * w2, mask=in_block)
            tl.debug_barrier()  # the next row may hit the same positions
        for offset in range(0, block_size, BLOCK):
            offs = start + offset + tl.arange(0, BLOCK)
            mask = offs < start + length
            first = tl.load(first_ptr + offs, mask=mask, other=0.0)
            second = tl.load(second_ptr + offs, mask=mask, other=0.0)
            u = (first * c1) / (tl.sqrt(second * c2) + eps)
            p = tl.load(p_ptr + offs, mask=mask, other=0.0)
            new = p.to(tl.float32) * decay - lr * u
            if p.dtype == tl.bfloat16:
                new = _bf16_nearest(new)
            tl.store(p_ptr + offs, new.to(p.dtype), mask=mask)
            tl.store(first_ptr + offs, tl.zeros_like(first), mask=mask)  # leave the scratch zeroed
            tl.store(second_ptr + offs, tl.zeros_like(second), mask=mask)


_ELEMENTWISE_BLOCK = 1024


def _pow2(x: int) -> int:
    return 1 << max(0, (x - 1).bit_length())


def dequant_add(codes: Tensor, lo: Tensor, hi: Tensor, grad: Tensor, bucket_size: int) -> Tensor:
    """fp32 a = grad + Q^-1(codes) (grad flat, any float dtype)."""
    n = grad.numel()
    out = torch.empty(n, dtype=torch.float32, device=grad.device)
    grid = (triton.cdiv(n, _ELEMENTWISE_BLOCK),)
    _dequant_add_kernel[grid](codes, lo, hi, grad, out, n, bucket_size, BLOCK=_ELEMENTWISE_BLOCK)
    return out


def block_topk_into(a: Tensor, indices: Tensor, values: Tensor, block_size: int, k_init: float) -> None:
    """Top-K of every block of ``a`` into one window row (int16 ``indices``, bf16 ``values``); a[chosen] = 0."""
    layout = block_layout(a.numel(), block_size, k_init)
    grid = (layout.full_blocks + (1 if layout.tail else 0),)
    _block_topk_kernel[grid](a, indices, values, a.numel(), block_size, layout.k_block, layout.k_tail,
                             BLOCK=_pow2(min(block_size, a.numel())))


def bucket_ranges(a: Tensor, bucket_size: int) -> tuple[Tensor, Tensor]:
    n = a.numel()
    buckets = triton.cdiv(n, bucket_size)
    lo = torch.empty(buckets, dtype=torch.bfloat16, device=a.device)
    hi = torch.empty(buckets, dtype=torch.bfloat16, device=a.device)
    _bucket_ranges_kernel[(buckets,)](a, lo, hi, n, bucket_size, BLOCK=min(_pow2(bucket_size), 1024))
    return lo, hi


def quantize_pack(a: Tensor, lo: Tensor, hi: Tensor, bucket_size: int, out: Tensor | None = None) -> Tensor:
    n = a.numel()
    if out is None:
        out = torch.empty((n + 1) // 2, dtype=torch.uint8, device=a.device)
    grid = (triton.cdiv((n + 1) // 2, _ELEMENTWISE_BLOCK),)
    _quantize_pack_kernel[grid](a, lo, hi, out, n, bucket_size, BLOCK=_ELEMENTWISE_BLOCK)
    return out


def window_update(p_flat: Tensor, indices: Tensor, values: Tensor, block_size: int, k_init: float, step: int,
                  betas: tuple[float, float], eps: float, lr: float, weight_decay: float) -> None:
    """p <- p * (1 - lr wd) - lr * (Adam direction from the window), in place on the flat ``p_flat``."""
    n, (m, k_total) = p_flat.numel(), indices.shape
    layout = block_layout(n, block_size, k_init)
    w1 = torch.tensor(row_weights(step, m, betas[0]), dtype=torch.float32, device=p_flat.device)
    w2 = torch.tensor(row_weights(step, m, betas[1]), dtype=torch.float32, device=p_flat.device)
    first = torch.zeros(n, dtype=torch.float32, device=p_flat.device)
    second = torch.zeros(n, dtype=torch.float32, device=p_flat.device)
    c1, c2 = bias_corrections(step, *betas)
    grid = (layout.full_blocks + (1 if layout.tail else 0),)
    _window_update_kernel[grid](p_flat, indices, values, w1, w2, first, second, n, m, k_total, block_size,
                                layout.k_block, c1, c2, eps, lr, 1.0 - lr * weight_decay,
                                K_BLOCK=_pow2(max(layout.k_block, layout.k_tail)), BLOCK=_ELEMENTWISE_BLOCK)


def microadam_step_triton(p: Tensor, grad: Tensor, state: dict[str, Any], group: dict[str, Any],
                          step: int) -> None:
    """One MicroAdam step of one tensor with the Triton kernels (same semantics as the torch path)."""
    from ..optim.microadam import _as_float

    block_size, bucket_size, k_init = group["topk_block_size"], group["quant_block_size"], group["k_init"]
    lr, wd = _as_float(group["lr"]), _as_float(group["weight_decay"])
    betas, eps = tuple(_as_float(b) for b in group["betas"]), _as_float(group["eps"])
    row = (step - 1) % group["m"]
    window_idx, window_val = state["window_indices"], state["window_values"]

    a = dequant_add(state["ef_codes"], state["ef_min"], state["ef_max"], grad.reshape(-1), bucket_size)  # (4)
    block_topk_into(a, window_idx[row], window_val[row], block_size, k_init)  # (5, 9, 6)
    lo, hi = bucket_ranges(a, bucket_size)  # (7)
    state["ef_min"].copy_(lo)
    state["ef_max"].copy_(hi)
    quantize_pack(a, lo, hi, bucket_size, out=state["ef_codes"])  # (8)
    del a
    p_flat = p.view(-1) if p.is_contiguous() else p.detach().reshape(-1).clone()
    window_update(p_flat, window_idx, window_val, block_size, k_init, step, betas, eps, lr, wd)  # (10, 11)
    if p_flat.data_ptr() != p.data_ptr():
        p.copy_(p_flat.view_as(p))
