"""Triton kernels for one MicroAdam step of one tensor (the GPU path).

Each kernel mirrors a torch reference, and tests/test_microadam_triton.py holds them against each other (on
CPU under ``TRITON_INTERPRET=1``, on a GPU with the same tests):

==================  ===============================================================  ==================================
kernel              does                                                             reference
==================  ===============================================================  ==================================
``dequant_add``     a = g + Q^-1(e)                                                  ops.quant.dequantize_4bit + add
``block_topk``      Top-K of each block by |a|, ties to the lower index; writes the  ops.topk.block_topk
                    window row (ascending block-relative indices, bf16 values) and
                    zeroes a there
``bucket_ranges``   per-bucket min/max rounded outwards to bf16                      ops.quant.bucket_ranges
``quantize_pack``   4-bit codes, two per byte                                        ops.quant.quantize_4bit
``window_update``   p <- p * (1 - lr wd) - lr * m_hat / (sqrt(v_hat) + eps), the     ops.microadam_window.
                    moments summed from the window rows (rows in order 0..m-1)       apply_window_update_
==================  ===============================================================  ==================================

Launches per tensor and step: 4 for the compression (one each above) and 1 for the window update when
``fp32(1 - lr * wd) == 1`` (no weight decay, the default), else 3; no memset, no scratch as large as the
tensor. Bytes per parameter of global memory, for n parameters of s_p bytes (4 fp32, 2 bf16), s_g bytes of
gradient and E = m * k_init window entries per parameter (0.1 at the defaults m = 10, k_init = 0.01);
entries are 2 B of index + 2 B of value:

* ``dequant_add``: reads s_g + 0.5 (codes) + 4 / bucket (bf16 min/max), writes 4 (a, fp32).
* ``block_topk``: reads 4 (a) and writes 4 k_init (the new window row) + 4 k_init (a = 0 where chosen). One
  program per block. A block of up to 4096 entries is one tile held in registers and ranked by a radix
  select on the int32 bits of |a| (31 one-bit passes, as before). A longer block (up to ops.topk.MAX_BLOCK_SIZE
  = 32768) is walked in tiles of 4096 inside the kernel: 7 passes over the block build 32-bin histograms of
  5-bit digits of the key (the threshold's digits, high to low), then one pass writes the selection. Those 8
  passes re-read the block from L1/L2 (128 KB at 32768), not from DRAM. Registers and compile time depend on
  the tile only, not on the block size.
* ``bucket_ranges``: reads 4, writes 4 / bucket. ``quantize_pack``: reads 4 + 4 / bucket, writes 0.5.
* ``window_update``, sparse: one lane per window entry of the rows written so far (min(step, m) rows). The
  lane finds its position in every row by binary search (rows are ascending per block), sums the moments in
  row order, and the lane of the first row holding a position (its *owner*) computes that position's new p.
  With E' <= E distinct positions per parameter:

  - without weight decay (the default) this is the whole update, one launch: the window, 4 E (its searches,
    log2(k_block) probes per row, hit L1/L2), and p read and written at owned positions, 2 s_p E'. Off the
    window p is left alone, as the reference leaves it bit-for-bit. ~4 E + 2 s_p E': <= 1.2 B/param for fp32,
    <= 0.8 for bf16 at the defaults.
  - with weight decay, three launches: (1) the entries kernel writes the owners' new values to a
    (rows, k_total) buffer of p's dtype and an owner byte per entry, (2) a dense pass p <- round(p * (1 - lr
    wd)), (3) the owners' values are scattered into p. 2 s_p + 6 E + (2 + 4 s_p) E': ~10.4 B/param for fp32,
    ~5.6 for bf16 at the defaults.

  The previous design moved ~2 s_p + 24 B/param (an 8 B/param fp32 scratch zeroed, read and re-zeroed) and
  raced on it (see below).

Memory ordering: no launch reads an address that a program of the same launch writes, except a lane that
reads an address and later writes it itself (in-place elementwise passes; Top-K zeroing what it read; an
owner updating its own position of p). The previous window kernel scattered the rows into a global fp32
scratch and read it back in the same program behind ``tl.debug_barrier()``, which on the H200 was not
enough: with bf16 parameters runs differed (shared/measurements/h200-2026-11-30/race_probe.py).

Arithmetic: every launch passes ``enable_fp_fusion=False``, so the compiler keeps ``a * b + c`` as two
roundings (no FMA contraction; ptxas ``--fmad=false``), and division and square root are ``tl.div_rn`` /
``tl.sqrt_rn`` (Triton's ``/`` and ``tl.sqrt`` are approximate on NVIDIA GPUs). Each kernel then performs
the same IEEE fp32 operations, in the same order, as its torch reference does on CPU, so the results are
bit-equal. Where torch itself is not IEEE, the kernels follow IEEE: torch's vectorised CPU ``sqrt`` is 1 ulp
off for ~17% of inputs (torch 2.13, AVX-512), so tests give the window update's reference an IEEE sqrt; and
torch on CUDA divides by a Python scalar as a multiplication by its reciprocal (``(hi - lo) / 15`` in
ops.quant) and computes ``addcdiv`` as ``p + alpha * (m / d)``, so the torch path on CUDA is not bit-equal to
the torch path on CPU; tests hold the kernels against the CPU reference.
"""

from __future__ import annotations

import functools

import torch
from torch import Tensor

from .microadam_window import window_weights
from .topk import block_layout
from .triton_support import tl, triton, triton_available

__all__ = ["microadam_step_triton", "triton_available"]

TILE_MAX = 4096  # entries of a block that one Top-K tile holds in registers
_ELEMENTWISE_BLOCK = 1024
# window entries per program of the window update: 128 on a GPU (one per thread, many programs to hide the
# searches' load latency); under the interpreter (CPU tensors) each operation costs ~50 us whatever its
# width, so fewer, wider programs
_WINDOW_ENTRIES = 128
_WINDOW_ENTRIES_INTERPRETED = 1024
# Every launch: no mul + add -> FMA contraction, so each operation rounds as in the torch reference.
_EXACT = {"enable_fp_fusion": False}


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
        step = tl.div_rn(hi - lo, 15.0)  # ops.quant._grid: (hi - lo) / LEVELS
        tl.store(out_ptr + offs, (code * step + lo) + grad, mask=mask)  # three roundings, as the reference

    @triton.jit
    def _topk_keys(a_ptr, start, cols, length):
        """a over ``cols`` of the block at ``start`` and its keys, the int32 bits of |a| (which order like |a|)."""
        valid = cols < length
        x = tl.load(a_ptr + start + cols, mask=valid, other=0.0)
        return x, x.to(tl.int32, bitcast=True) & 0x7FFFFFFF, valid

    @triton.jit
    def _digit_pass(a_ptr, start, length, k, prefix, above, SHIFT: tl.constexpr, WIDTH: tl.constexpr,
                    TILE: tl.constexpr):
        """One radix pass over the block's tiles: the next WIDTH bits (from bit SHIFT) of the k-th largest key.

        ``prefix``: its bits above SHIFT + WIDTH found so far; ``above``: keys known to be larger (their high
        bits exceed prefix), fewer than k. Histogram the digit of the keys whose high bits equal prefix and
        take the largest digit d with at least k - above of them at d or higher."""
        bins = tl.arange(0, 32)
        hist = tl.zeros((32,), dtype=tl.int32)
        for t0 in range(0, length, TILE):
            x, key, valid = _topk_keys(a_ptr, start, t0 + tl.arange(0, TILE), length)
            match = valid & ((key >> (SHIFT + WIDTH)) == prefix)
            digit = tl.where(match, (key >> SHIFT) & ((1 << WIDTH) - 1), 0)
            # the lanes that do not match were counted in bin 0 (histogram's mask= needs Triton >= 3.4)
            unmatched = TILE - tl.sum(match.to(tl.int32), axis=0)
            hist += tl.histogram(digit, 32) - tl.where(bins == 0, unmatched, 0)
        at_least = tl.sum(hist, axis=0) - tl.cumsum(hist, axis=0) + hist  # matching keys with digit >= bin
        digit = tl.max(tl.where(at_least >= k - above, bins, 0), axis=0)
        above += tl.sum(tl.where(bins > digit, hist, 0), axis=0)
        return (prefix << WIDTH) | digit, above

    @triton.jit
    def _block_topk_kernel(a_ptr, idx_ptr, val_ptr, n, block_size, k_block, k_tail, TILE: tl.constexpr,
                           SINGLE_TILE: tl.constexpr):
        block = tl.program_id(0).to(tl.int64)
        start = block * block_size
        length = tl.minimum(block_size, n - start).to(tl.int32)
        k = tl.where(length == block_size, k_block, k_tail)
        # 1. the threshold: the k-th largest key of the block, and how many keys lie above it
        if SINGLE_TILE:  # the block is one tile: keep it in registers, one bit per pass
            x, key, valid = _topk_keys(a_ptr, start, tl.arange(0, TILE), length)
            key = tl.where(valid, key, -1)  # lanes past the block are never counted
            threshold = tl.zeros((), dtype=tl.int32)
            for bit in tl.static_range(30, -1, -1):
                candidate = threshold | (1 << bit)
                threshold = tl.where(tl.sum((key >= candidate).to(tl.int32), axis=0) >= k, candidate, threshold)
            above = tl.sum((key > threshold).to(tl.int32), axis=0)
        else:  # 31 key bits as 5-bit digits, high to low, each one histogram pass over the tiles
            threshold = tl.zeros((), dtype=tl.int32)
            above = tl.zeros((), dtype=tl.int32)
            threshold, above = _digit_pass(a_ptr, start, length, k, threshold, above, 26, 5, TILE)
            threshold, above = _digit_pass(a_ptr, start, length, k, threshold, above, 21, 5, TILE)
            threshold, above = _digit_pass(a_ptr, start, length, k, threshold, above, 16, 5, TILE)
            threshold, above = _digit_pass(a_ptr, start, length, k, threshold, above, 11, 5, TILE)
            threshold, above = _digit_pass(a_ptr, start, length, k, threshold, above, 6, 5, TILE)
            threshold, above = _digit_pass(a_ptr, start, length, k, threshold, above, 1, 5, TILE)
            threshold, above = _digit_pass(a_ptr, start, length, k, threshold, above, 0, 1, TILE)
        # 2. every key above the threshold, and of the keys equal to it the first k - above by index (the
        # reference's tie rule), in index order: ties and slots are counted across the tiles in order
        need = k - above
        tied_before = tl.zeros((), dtype=tl.int32)
        chosen_before = tl.zeros((), dtype=tl.int32)
        for t0 in range(0, length, TILE):
            cols = t0 + tl.arange(0, TILE)
            x, key, valid = _topk_keys(a_ptr, start, cols, length)
            tied = valid & (key == threshold)
            tie_rank = tied_before + tl.cumsum(tied.to(tl.int32), axis=0)
            chosen = (valid & (key > threshold)) | (tied & (tie_rank <= need))
            out = block * k_block + (chosen_before + tl.cumsum(chosen.to(tl.int32), axis=0) - 1)
            tl.store(idx_ptr + out, cols.to(tl.int16), mask=chosen)
            tl.store(val_ptr + out, _bf16_nearest(x).to(tl.bfloat16), mask=chosen)
            tl.store(a_ptr + start + cols, tl.zeros_like(x), mask=chosen)  # after this lane's last read of it
            tied_before += tl.sum(tied.to(tl.int32), axis=0)
            chosen_before += tl.sum(chosen.to(tl.int32), axis=0)

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
        because the interpreter's own fp32 -> bf16 cast truncated (older Triton)."""
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
        step = tl.div_rn(hi - lo, 15.0)
        quantised = step >= 1.1754943508222875e-38  # ops.quant.TINY: below it, 1 / step is inf
        inv_step = tl.where(quantised, tl.div_rn(1.0, tl.where(quantised, step, 1.0)), 0.0)
        y = tl.floor((x - lo) * inv_step + 0.5)  # three roundings, as sub_, mul_, add_ in the reference
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
    def _lower_bound(idx_ptr, segment, count, x, active, steps):
        """Per lane: the first j in [0, count) with idx[segment + j] >= x (count if none); the ``count``
        indices of a segment ascend. ``steps`` >= count.bit_length() halvings reach an empty range."""
        lo = tl.zeros_like(x)
        size = tl.where(active, count, 0)
        for _ in range(0, steps):
            half = size // 2
            probe = tl.load(idx_ptr + segment + lo + half, mask=size > 0, other=0).to(tl.int32)
            right = (size > 0) & (probe < x)
            lo = tl.where(right, lo + half + 1, lo)
            size = tl.where(right, size - half - 1, half)
        return lo

    @triton.jit
    def _window_entries_kernel(p_ptr, idx_ptr, val_ptr, w1_ptr, w2_ptr, upd_ptr, own_ptr, k_total, block_size,
                               k_block, full_blocks, k_tail, rows, steps, lr, eps, decay,
                               IN_PLACE: tl.constexpr, ENTRIES: tl.constexpr):
        """Lane = window entry (row, j). The moments at its position from every written row, in row order
        (the reference's scatter order); its owner (the entry of the first row holding the position) computes
        p's new value there: into p itself (IN_PLACE) or into ``upd`` with ``own`` marking owners."""
        row = tl.program_id(1)
        j = tl.program_id(0) * ENTRIES + tl.arange(0, ENTRIES)
        live = j < k_total
        block = tl.minimum(j // k_block, full_blocks)
        col0 = block * k_block
        count = tl.where(block < full_blocks, k_block, k_tail)
        stride = tl.zeros((), dtype=tl.int64) + k_total  # int64 row offsets
        x = tl.load(idx_ptr + row * stride + j, mask=live, other=0).to(tl.int32)
        first = tl.zeros((ENTRIES,), dtype=tl.float32)
        second = tl.zeros((ENTRIES,), dtype=tl.float32)
        owner = live
        for other in range(0, rows):
            segment = other * stride + col0
            at = _lower_bound(idx_ptr, segment, count, x, live, steps)
            inside = live & (at < count)
            found = inside & (tl.load(idx_ptr + segment + at, mask=inside, other=0).to(tl.int32) == x)
            # not the owner: an earlier row holds the position, or an earlier entry of its own row does
            earlier = (found & (other < row)) | ((other == row) & (at != j - col0))
            owner = tl.where(earlier, False, owner)
            v = tl.load(val_ptr + segment + at, mask=found, other=0.0).to(tl.float32)
            w1 = tl.load(w1_ptr + other)
            w2 = tl.load(w2_ptr + other)
            first = tl.where(found, first + v * w1, first)
            second = tl.where(found, second + (v * v) * w2, second)
        # apply_window_update_: denominator = sqrt(v_hat + TINY) + eps; p * decay + (-lr * m_hat) / denominator
        denominator = tl.sqrt_rn(second + 1.1754943508222875e-38) + eps
        update = tl.div_rn((-lr) * first, denominator)
        pos = block.to(tl.int64) * block_size + x
        p = tl.load(p_ptr + pos, mask=owner, other=0.0)
        new = p.to(tl.float32) * decay + update
        if p.dtype == tl.bfloat16:
            new = _bf16_nearest(new)
        if IN_PLACE:
            tl.store(p_ptr + pos, new.to(p.dtype), mask=owner)  # only the owner reads or writes p[pos]
        else:
            entry = row * stride + j
            tl.store(upd_ptr + entry, new.to(p.dtype), mask=owner)
            tl.store(own_ptr + entry, owner.to(tl.int8), mask=live)

    @triton.jit
    def _decay_kernel(p_ptr, n, decay, BLOCK: tl.constexpr):
        offs = tl.program_id(0).to(tl.int64) * BLOCK + tl.arange(0, BLOCK)
        mask = offs < n
        p = tl.load(p_ptr + offs, mask=mask, other=0.0)
        new = p.to(tl.float32) * decay
        if p.dtype == tl.bfloat16:
            new = _bf16_nearest(new)
        tl.store(p_ptr + offs, new.to(p.dtype), mask=mask)

    @triton.jit
    def _window_scatter_kernel(p_ptr, idx_ptr, upd_ptr, own_ptr, total, k_total, block_size, k_block, full_blocks,
                               BLOCK: tl.constexpr):
        entry = tl.program_id(0).to(tl.int64) * BLOCK + tl.arange(0, BLOCK)
        live = entry < total
        own = tl.load(own_ptr + entry, mask=live, other=0) != 0
        block = tl.minimum((entry % k_total) // k_block, full_blocks)
        pos = block * block_size + tl.load(idx_ptr + entry, mask=own, other=0).to(tl.int64)
        tl.store(p_ptr + pos, tl.load(upd_ptr + entry, mask=own, other=0.0), mask=own)


def _pow2(x: int) -> int:
    return 1 << max(0, (x - 1).bit_length())


def dequant_add(codes: Tensor, lo: Tensor, hi: Tensor, grad: Tensor, bucket_size: int) -> Tensor:
    """fp32 a = grad + Q^-1(codes) (grad flat, any float dtype)."""
    n = grad.numel()
    out = torch.empty(n, dtype=torch.float32, device=grad.device)
    grid = (triton.cdiv(n, _ELEMENTWISE_BLOCK),)
    _dequant_add_kernel[grid](codes, lo, hi, grad, out, n, bucket_size, BLOCK=_ELEMENTWISE_BLOCK, **_EXACT)
    return out


def block_topk_into(a: Tensor, indices: Tensor, values: Tensor, block_size: int, k_init: float) -> None:
    """Top-K of every block of ``a`` into one window row (int16 ``indices``, bf16 ``values``); a[chosen] = 0."""
    n = a.numel()
    layout = block_layout(n, block_size, k_init)
    longest = min(block_size, n)
    tile = min(_pow2(longest), TILE_MAX)
    grid = (layout.full_blocks + (1 if layout.tail else 0),)
    _block_topk_kernel[grid](a, indices, values, n, block_size, layout.k_block, layout.k_tail, TILE=tile,
                             SINGLE_TILE=longest <= tile, **_EXACT)


def bucket_ranges(a: Tensor, bucket_size: int, out: tuple[Tensor, Tensor] | None = None) -> tuple[Tensor, Tensor]:
    """bf16 (min, max) per bucket, rounded outwards (into ``out`` if given)."""
    n = a.numel()
    buckets = triton.cdiv(n, bucket_size)
    if out is None:
        out = (torch.empty(buckets, dtype=torch.bfloat16, device=a.device),
               torch.empty(buckets, dtype=torch.bfloat16, device=a.device))
    lo, hi = out
    _bucket_ranges_kernel[(buckets,)](a, lo, hi, n, bucket_size, BLOCK=min(_pow2(bucket_size), 1024), **_EXACT)
    return lo, hi


def quantize_pack(a: Tensor, lo: Tensor, hi: Tensor, bucket_size: int, out: Tensor | None = None) -> Tensor:
    n = a.numel()
    if out is None:
        out = torch.empty((n + 1) // 2, dtype=torch.uint8, device=a.device)
    grid = (triton.cdiv((n + 1) // 2, _ELEMENTWISE_BLOCK),)
    _quantize_pack_kernel[grid](a, lo, hi, out, n, bucket_size, BLOCK=_ELEMENTWISE_BLOCK, **_EXACT)
    return out


@functools.lru_cache(maxsize=32)
def _weights(step: int, m: int, betas: tuple[float, float], device: torch.device) -> tuple[Tensor, Tensor]:
    """``window_weights`` (bias corrections folded in, as the torch path uses them), built once per step:
    the tensors of a group share it instead of copying two small tensors to the device each."""
    return window_weights(step, m, betas, device)


def _fp32(x: float) -> float:
    return torch.tensor(x, dtype=torch.float32).item()


def window_update(p_flat: Tensor, indices: Tensor, values: Tensor, block_size: int, k_init: float, step: int,
                  betas: tuple[float, float], eps: float, lr: float, weight_decay: float) -> None:
    """p <- p * (1 - lr wd) - lr * (Adam direction from the window), in place on the flat ``p_flat``.

    ``indices``/``values``: the (m, k_total) window, rows ascending per block (as ``block_topk_into`` writes
    them); rows at or past ``step`` are not written yet and are skipped (their weights are 0)."""
    n, (m, k_total) = p_flat.numel(), indices.shape
    if not (p_flat.is_contiguous() and indices.is_contiguous() and values.is_contiguous()):
        raise ValueError("window_update needs contiguous p_flat, indices and values")
    layout = block_layout(n, block_size, k_init)
    rows = min(step, m)
    w1, w2 = _weights(step, m, (float(betas[0]), float(betas[1])), p_flat.device)
    decay = 1.0 - lr * weight_decay  # as the torch path computes it (in Python floats, then fp32)
    in_place = _fp32(decay) == 1.0  # then p * decay is p: no dense pass, owners update p themselves
    steps = max(layout.k_block, layout.k_tail).bit_length()
    entries = _WINDOW_ENTRIES if p_flat.is_cuda else _WINDOW_ENTRIES_INTERPRETED
    grid = (triton.cdiv(k_total, entries), rows)
    args = (k_total, block_size, layout.k_block, layout.full_blocks, layout.k_tail, rows, steps, lr, eps, decay)
    if in_place:
        _window_entries_kernel[grid](p_flat, indices, values, w1, w2, p_flat, indices, *args, IN_PLACE=True,
                                     ENTRIES=entries, **_EXACT)
        return
    upd = torch.empty(rows, k_total, dtype=p_flat.dtype, device=p_flat.device)
    own = torch.empty(rows, k_total, dtype=torch.int8, device=p_flat.device)
    _window_entries_kernel[grid](p_flat, indices, values, w1, w2, upd, own, *args, IN_PLACE=False,
                                 ENTRIES=entries, **_EXACT)
    _decay_kernel[(triton.cdiv(n, _ELEMENTWISE_BLOCK),)](p_flat, n, decay, BLOCK=_ELEMENTWISE_BLOCK, **_EXACT)
    total = rows * k_total
    _window_scatter_kernel[(triton.cdiv(total, _ELEMENTWISE_BLOCK),)](
        p_flat, indices, upd, own, total, k_total, block_size, layout.k_block, layout.full_blocks,
        BLOCK=_ELEMENTWISE_BLOCK, **_EXACT)


def _to_float(x: float | Tensor) -> float:
    return float(x.item()) if isinstance(x, Tensor) else float(x)


def microadam_step_triton(p: Tensor, grad: Tensor, window_indices: Tensor, window_values: Tensor,
                          ef_codes: Tensor, ef_min: Tensor, ef_max: Tensor, *, step: int, lr: float | Tensor,
                          betas: tuple[float | Tensor, float | Tensor], eps: float | Tensor,
                          weight_decay: float | Tensor, m: int, k_init: float, topk_block_size: int,
                          quant_block_size: int) -> None:
    """One MicroAdam step of one tensor with the Triton kernels (same semantics as the torch path).

    ``p`` is updated in place and the five state tensors (shapes as MicroAdam's state: window (m, k_total)
    int16 / bf16, ``ef_codes`` (ceil(n / 2),) uint8, ``ef_min``/``ef_max`` (buckets,) bf16) are advanced;
    ``step`` is the tensor's own step count, from 1. Hyperparameters are plain numbers (a 0-dim tensor is
    read with ``.item()``)."""
    if window_indices.shape[0] != m:
        raise ValueError(f"window has {window_indices.shape[0]} rows, m = {m}")
    lr_, wd, eps_ = _to_float(lr), _to_float(weight_decay), _to_float(eps)
    betas_ = (_to_float(betas[0]), _to_float(betas[1]))
    row = (step - 1) % m

    a = dequant_add(ef_codes, ef_min, ef_max, grad.reshape(-1), quant_block_size)  # (4)
    block_topk_into(a, window_indices[row], window_values[row], topk_block_size, k_init)  # (5, 9, 6)
    bucket_ranges(a, quant_block_size, out=(ef_min, ef_max))  # (7): dequant_add has read the old ones
    quantize_pack(a, ef_min, ef_max, quant_block_size, out=ef_codes)  # (8)
    del a
    p_flat = p.view(-1) if p.is_contiguous() else p.detach().reshape(-1).clone()
    window_update(p_flat, window_indices, window_values, topk_block_size, k_init, step, betas_, eps_, lr_,
                  wd)  # (10, 11)
    if p_flat.data_ptr() != p.data_ptr():
        p.copy_(p_flat.view_as(p))
