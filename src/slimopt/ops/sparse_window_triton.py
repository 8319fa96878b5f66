"""Triton kernels for Adam from a window of block Top-K gradients with 4-bit error feedback (the GPU path):
group launches, and their one-tensor references.

**Group launches** (``SparseWindowStep``; the optimizer steps the plain contiguous fp32/bf16/fp16 tensors of a param
group this way, per device and dtype): three launches per step whatever the number of tensors. The program
grid runs over (tensor, Top-K block) pairs of the whole group, through tables built once per list of tensors:
``block_tensor`` (int32, the tensor of each program) and ``meta`` (int64 per tensor: n, k_total, full blocks,
k_tail, first block, then the addresses of p and of its state tensors, cast in the kernel with
``tl.load(meta + i).to(tl.pointer_type(...))``); the gradients' addresses are a table of their own, uploaded
(pinned, non-blocking) only when they change. Nothing is read back to the host: each tensor's step counter is
a 0-d fp32 tensor on the device that the last launch advances; the bias corrections come from a table of fp32
values per step (Python doubles, as ``window_weights``; extended, doubling, as steps pass its end, and constant
from the step where 1 - beta**t rounds to 1); a tensor lr is read by the kernel (1 - lr * wd in fp64, then
fp32, as Python and torch compute it); the non-finite policy is a per-tensor flag on the device.

==========================  =================================================================================
launch                      does, per (tensor, block) program
==========================  =================================================================================
``_group_check_kernel``     flag = the tensor has a gradient and it is finite (stores of 0 from any program
                            of a bad tensor; the other flag row, next step's, set back to 1); copies the step
                            counter to ``old``
``_group_compress_kernel``  on chip, per block: a = g + Q^-1(e) (as ``dequant_add``) and the Top-K threshold
                            of |a| (as ``block_topk``: the keys of a block <= TILE_MAX in registers, 31 one-bit
                            passes; a longer block in 7 histogram passes over sub-tiles that recompute a); then
                            sub-tiles of SUB_MAX entries recompute a (from L1/L2) and write the window row
                            (t - 1) % m, a[I] = 0, bucket ranges and 4-bit codes (as ``bucket_ranges``,
                            ``quantize_pack``: a bucket is a row of the sub-tile seen as (SUB / bucket,
                            bucket)). Flag 0: everything masked
``_group_window_kernel``    the step counter first (block 0's program; the launch reads ``old``); then the
                            block's window entries (as ``window_update``): moments in row order, owners write
                            p; with weight decay, the block's other positions (those no row holds, found by a
                            histogram of the entries per tile of <= 2048) get p * (1 - lr wd): one launch, no
                            scratch
==========================  =================================================================================

Fused: everything from reading g to writing the new error feedback and window row (nothing dense goes back to
memory; the one-tensor path writes an fp32 ``a`` once and reads it three times), and the window update with
the weight decay and the step counter. Not fused: the finiteness check, which must see a whole tensor before
any program may write its state (it reads g once more, as SlimOptimizer's check did), and the window update,
which reads rows that other programs of the compression launch write.

Bytes per parameter of global memory, for s_g bytes of gradient, s_p of parameter, buckets of B entries and
E = m * k_init window entries per parameter (0.1 at the defaults m = 10, k_init = 0.01; 4 B each):

* check: reads s_g.
* compress: reads s_g + 0.5 (codes) + 4 / B (ranges), writes 0.5 + 4 / B + 4 k_init (the new row). It reads
  g and e of a block twice, the second time from L1/L2 (18 KB for a 4096-entry fp32 block; a block longer
  than TILE_MAX 8 times, <= 147 KB per program): what a thread holds at once stays small (sm_90 at 8 warps:
  <= 72 registers, 24 resident warps per SM; holding the whole 4096-entry tile through the selection and
  requantisation needed 152-192 registers, 8 warps per SM).
* window: reads the window, 4 E (its binary searches hit L1/L2), and reads and writes p where a row holds a
  position, 2 s_p E' (E' <= E distinct positions). With weight decay also the rest of p, read and written,
  2 s_p (1 - E'), and the block's entries once more per tile of <= 2048 positions (L1/L2). At 4 warps: sm_80
  <= 72 registers, 28 resident warps per SM; sm_90 <= 56, 36; no spills.

At the defaults: fp32 p and g ~10.4 B/param without weight decay, ~17.6 with; bf16 ~6.0 and ~9.6. (The floor:
read g and e, write e and a row, ~s_g + 1.2, + 2 s_p with weight decay; the check's s_g comes on top.) The
one-tensor path moves ~2 s_g + 18.6 + 4 E (~27 for fp32 without weight decay, its check included) in 5 to 7
launches per tensor, plus ~16 torch ops per tensor.

**One-tensor kernels**: the references the group launches' parts are tested beside, and the path for what the
group launches do not take (DTensor shards, non-contiguous parameters, bucket sizes that are not a power of two
<= TILE_MAX tiling the Top-K blocks). Each mirrors a torch reference, and the tests (test_microadam_triton.py) hold
them against each other (on CPU under ``TRITON_INTERPRET=1``, on a GPU with the same tests):

==================  ===============================================================  ==================================
kernel              does                                                             reference
==================  ===============================================================  ==================================
``dequant_add``     a = g + Q^-1(e)                                                  ops.quant.dequantize_4bit + add
``block_topk``      Top-K of each block by |a|, ties to the lower index; writes the  ops.topk.block_topk
                    window row (ascending block-relative indices, bf16 values) and
                    zeroes a there
``bucket_ranges``   per-bucket min/max rounded outwards to bf16                      ops.quant.bucket_ranges
``quantize_pack``   4-bit codes, two per byte                                        ops.quant.quantize_4bit
``window_update``   p <- p * (1 - lr wd) - lr * m_hat / (sqrt(v_hat) + eps), the     ops.sparse_window.
                    moments summed from the window rows (rows in order 0..m-1)       apply_window_update_
==================  ===============================================================  ==================================

Launches per tensor and step: 4 for the compression (one each above) and 1 for the window update when
``fp32(1 - lr * wd) == 1`` (no weight decay, the default), else 3; no memset, no scratch as large as the
tensor. Bytes per parameter of global memory, for n parameters of s_p bytes (4 fp32, 2 bf16), s_g bytes of
gradient and E = m * k_init window entries per parameter (0.1 at the defaults m = 10, k_init = 0.01);
entries are 2 B of index + 2 B of value:

* ``dequant_add``: reads s_g + 0.5 (codes) + 4 / bucket (bf16 min/max), writes 4 (a, fp32).
* ``block_topk``: reads 4 (a) and writes 4 k_init (the new window row) + 4 k_init (a = 0 where chosen). One
  program per block. The keys (int32 bits of |a|) of a block of up to 4096 entries are held in registers and
  ranked by a radix select (31 one-bit passes). A longer block (up to ops.topk.MAX_BLOCK_SIZE = 32768) is
  walked in sub-tiles inside the kernel: 7 passes over the block build 32-bin histograms of 5-bit digits of
  the key (the threshold's digits, high to low). Then one pass over sub-tiles of SUB_MAX entries writes the
  selection. The passes after the first re-read the block from L1/L2 (16 KB at 4096, 128 KB at 32768), not
  from DRAM. Registers and compile time depend on the tile only, not on the block size.
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

In the group launches too, no program reads what another program of the same launch writes. Within a program,
a store to an address read earlier (codes, ranges, p at an owned position) stores a value computed from that
read, so the read has happened whichever threads hold the lanes; the window kernel's two sets of p addresses
(owned positions, positions no row holds) are disjoint, so no position is written twice.

Arithmetic: every launch passes ``enable_fp_fusion=False``, so the compiler keeps ``a * b + c`` as two
roundings (no FMA contraction; ptxas ``--fmad=false``), and division and square root are ``tl.div_rn`` /
``tl.sqrt_rn`` (Triton's ``/`` and ``tl.sqrt`` are approximate on NVIDIA GPUs), except the group launches'
(hi - lo) / 15, an fp64 product rounded once to fp32 that equals the IEEE quotient for every fp32 input
(``_fifteenth``). Each kernel then performs
the same IEEE fp32 operations, in the same order, as its torch reference does on CPU, so the results are
bit-equal. Where torch itself is not IEEE, the kernels follow IEEE: torch's vectorised CPU ``sqrt`` is 1 ulp
off for ~17% of inputs (torch 2.13, AVX-512), so tests give the window update's reference an IEEE sqrt; and
torch on CUDA divides by a Python scalar as a multiplication by its reciprocal (``(hi - lo) / 15`` in
ops.quant) and computes ``addcdiv`` as ``p + alpha * (m / d)``, so the torch path on CUDA is not bit-equal to
the torch path on CPU; tests hold the kernels against the CPU reference.
"""

from __future__ import annotations

import functools
from collections.abc import Sequence

import numpy as np
import torch
from torch import Tensor

from .sparse_window import window_weights
from .topk import topk_blocks
from .triton_helpers import (
    EXACT,
    POINTER_KINDS,
    bf16_nearest,
    float64_bits,
    pow2,
    round_fp32,
    typed_pointer,
)
from .triton_support import tl, triton, triton_available
from .weight_decay import decay_factor

__all__ = ["SparseWindowStep", "group_sizes_supported", "sparse_window_step_triton", "triton_available"]

TILE_MAX = 4096  # entries of a block that one Top-K tile holds in registers
SUB_MAX = 512  # entries a Top-K kernel's selection pass (and its histogram passes) takes at a time
_ELEMENTWISE_BLOCK = 1024
# window entries per program of the window update: 128 on a GPU (one per thread, many programs to hide the
# searches' load latency); under the interpreter (CPU tensors) each operation costs ~50 us whatever its
# width, so fewer, wider programs
_WINDOW_ENTRIES = 128
_WINDOW_ENTRIES_INTERPRETED = 1024
# The kernels whose results tests/test_microadam_triton.py holds bit-equal to the torch reference (torch.equal):
# compiled for a GPU they must contain no FMA and no approximate instruction (bench/triton_check.py checks the PTX)
BIT_EXACT_KERNELS = ("_dequant_add_kernel", "_block_topk_kernel", "_bucket_ranges_kernel", "_quantize_pack_kernel",
                     "_window_entries_kernel", "_decay_kernel", "_window_scatter_kernel", "_group_check_kernel",
                     "_group_compress_kernel", "_group_window_kernel")


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
    def _topk_keys(a, cols, length):
        """a over ``cols`` of the block at ``a`` and its keys, the int32 bits of |a| (which order like |a|)."""
        valid = cols < length
        x = tl.load(a + cols, mask=valid, other=0.0)
        return x, x.to(tl.int32, bitcast=True) & 0x7FFFFFFF, valid

    @triton.jit
    def _digit_pass(a, length, k, prefix, above, SHIFT: tl.constexpr, WIDTH: tl.constexpr, TILE: tl.constexpr):
        """One radix pass over the block's tiles: the next WIDTH bits (from bit SHIFT) of the k-th largest key.

        ``prefix``: its bits above SHIFT + WIDTH found so far; ``above``: keys known to be larger (their high
        bits exceed prefix), fewer than k. Histogram the digit of the keys whose high bits equal prefix and
        take the largest digit d with at least k - above of them at d or higher."""
        bins = tl.arange(0, 32)
        hist = tl.zeros((32,), dtype=tl.int32)
        for t0 in range(0, length, TILE):
            x, key, valid = _topk_keys(a, t0 + tl.arange(0, TILE), length)
            match = valid & ((key >> (SHIFT + WIDTH)) == prefix)
            digit = tl.where(match, (key >> SHIFT) & ((1 << WIDTH) - 1), 0)
            # the lanes that do not match were counted in bin 0 (histogram's mask= needs Triton >= 3.4)
            unmatched = TILE - tl.sum(match.to(tl.int32), axis=0)
            hist += tl.histogram(digit, 32) - tl.where(bins == 0, unmatched, 0)
        return _next_digit(hist, k, prefix, above, WIDTH)

    @triton.jit
    def _next_digit(hist, k, prefix, above, WIDTH: tl.constexpr):
        """From the histogram of the next WIDTH-bit digit of the keys that match ``prefix``: the largest digit d
        with at least k - above of them at d or higher, appended to ``prefix``, and ``above`` grown by the keys
        whose digit exceeds d."""
        bins = tl.arange(0, 32)
        at_least = tl.sum(hist, axis=0) - tl.cumsum(hist, axis=0) + hist  # matching keys with digit >= bin
        digit = tl.max(tl.where(at_least >= k - above, bins, 0), axis=0)
        above += tl.sum(tl.where(bins > digit, hist, 0), axis=0)
        return (prefix << WIDTH) | digit, above

    @triton.jit
    def _block_topk_kernel(a_ptr, idx_ptr, val_ptr, n, block_size, k_block, k_tail, TILE: tl.constexpr,
                           SUB: tl.constexpr, SINGLE_TILE: tl.constexpr):
        block = tl.program_id(0).to(tl.int64)
        start = block * block_size
        a = a_ptr + start  # the block's own pointers: int32 offsets per lane from here
        idx = idx_ptr + block * k_block
        val = val_ptr + block * k_block
        length = tl.minimum(block_size, n - start).to(tl.int32)
        k = tl.where(length == block_size, k_block, k_tail)
        # 1. the threshold: the k-th largest key of the block, and how many keys lie above it
        if SINGLE_TILE:  # the block is one tile: its keys stay in registers, one bit per pass
            _, keys, in_block = _topk_keys(a, tl.arange(0, TILE), length)
            keys = tl.where(in_block, keys, -1)  # lanes past the block are never counted
            threshold = tl.zeros((), dtype=tl.int32)
            for bit in tl.static_range(30, -1, -1):
                candidate = threshold | (1 << bit)
                threshold = tl.where(tl.sum((keys >= candidate).to(tl.int32), axis=0) >= k, candidate, threshold)
            above = tl.sum((keys > threshold).to(tl.int32), axis=0)
        else:  # 31 key bits as 5-bit digits, high to low, each one histogram pass over the tiles
            threshold = tl.zeros((), dtype=tl.int32)
            above = tl.zeros((), dtype=tl.int32)
            threshold, above = _digit_pass(a, length, k, threshold, above, 26, 5, SUB)
            threshold, above = _digit_pass(a, length, k, threshold, above, 21, 5, SUB)
            threshold, above = _digit_pass(a, length, k, threshold, above, 16, 5, SUB)
            threshold, above = _digit_pass(a, length, k, threshold, above, 11, 5, SUB)
            threshold, above = _digit_pass(a, length, k, threshold, above, 6, 5, SUB)
            threshold, above = _digit_pass(a, length, k, threshold, above, 1, 5, SUB)
            threshold, above = _digit_pass(a, length, k, threshold, above, 0, 1, SUB)
        # 2. every key above the threshold, and of the keys equal to it the first k - above by index (the
        # reference's tie rule), in index order: ties and slots are counted across the sub-tiles in order (a
        # sub-tile of SUB lanes at a time, re-read from L1/L2: fewer values per thread than a whole tile)
        need = k - above
        tied_before = tl.zeros((), dtype=tl.int32)
        above_before = tl.zeros((), dtype=tl.int32)
        for t0 in range(0, length, SUB):
            cols = t0 + tl.arange(0, SUB)
            x, key, valid = _topk_keys(a, cols, length)
            higher = valid & (key > threshold)
            tied = valid & (key == threshold)
            # one scan for both ranks: a sub-tile has < 2**16 lanes, so the two counts never carry into each other
            packed = higher.to(tl.int32) + (tied.to(tl.int32) << 16)
            rank = tl.cumsum(packed, axis=0)
            ties_upto = tied_before + (rank >> 16)  # ties of the block up to this lane
            chosen = higher | (tied & (ties_upto <= need))
            slot = above_before + (rank & 65535) + tl.minimum(ties_upto, need) - 1
            tl.store(idx + slot, cols.to(tl.int16), mask=chosen)
            tl.store(val + slot, bf16_nearest(x).to(tl.bfloat16), mask=chosen)
            tl.store(a + cols, tl.zeros_like(x), mask=chosen)  # after this lane's last read of it
            counts = tl.sum(packed, axis=0)
            tied_before += counts >> 16
            above_before += counts & 65535

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
    def _row_entry(idx, val, segment, count, x, live, steps):
        """Per lane: where position ``x`` would stand among the ``count`` ascending indices of a window row's
        block (``segment``), whether the row holds it there, and its value (fp32; 0 where not held)."""
        at = _lower_bound(idx, segment, count, x, live, steps)
        inside = live & (at < count)
        found = inside & (tl.load(idx + segment + at, mask=inside, other=0).to(tl.int32) == x)
        return at, found, tl.load(val + segment + at, mask=found, other=0.0).to(tl.float32)

    @triton.jit
    def _add_moments(first, second, found, v, w1, w2):
        """One window row's terms of the moments where it holds the position: v w1 and v² w2, rows in order."""
        return tl.where(found, first + v * w1, first), tl.where(found, second + (v * v) * w2, second)

    @triton.jit
    def _window_direction(first, second, neg_lr, eps):
        """As ``apply_window_update_``: (-lr m_hat) / (sqrt(v_hat + TINY) + eps), each operation rounded once."""
        return tl.div_rn(neg_lr * first, tl.sqrt_rn(second + 1.1754943508222875e-38) + eps)

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
            at, found, v = _row_entry(idx_ptr, val_ptr, other * stride + col0, count, x, live, steps)
            # not the owner: an earlier row holds the position, or an earlier entry of its own row does
            earlier = (found & (other < row)) | ((other == row) & (at != j - col0))
            owner = tl.where(earlier, False, owner)
            first, second = _add_moments(first, second, found, v, tl.load(w1_ptr + other), tl.load(w2_ptr + other))
        update = _window_direction(first, second, -lr, eps)
        pos = block.to(tl.int64) * block_size + x
        p = tl.load(p_ptr + pos, mask=owner, other=0.0)
        new = p.to(tl.float32) * decay + update
        if p.dtype == tl.bfloat16:
            new = bf16_nearest(new)
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
            new = bf16_nearest(new)
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

    # -- the group launches: every tensor of a group (one device, one parameter dtype) in one launch per stage --
    # Program = (tensor, Top-K block), found through ``block_tensor`` (int32, one entry per block of the group).
    # Per tensor a row of META int64 in ``meta``: its sizes, then the addresses of p and of its state tensors
    # (read with _ptr). Gradients' addresses are a table of their own (they change more often than state).

    # flag rows alternate: their offsets are not specialised on (one compiled kernel, not two)
    @triton.jit(do_not_specialize=["flag_now", "flag_next"])
    def _group_check_kernel(meta_ptr, gptr_ptr, block_tensor_ptr, flags_ptr, flag_now, flag_next, old_ptr,
                            block_size, G_KIND: tl.constexpr, TILE: tl.constexpr, META: tl.constexpr):
        """Stage 0: flag[t] = 0 where tensor t has no gradient or a NaN/inf in it (each block's program stores
        0 if its part is bad: stores of one value, no atomics), and the program of block 0 sets next step's
        flag back to 1 and copies the tensor's step counter to ``old`` (which the next two launches read, so
        that the last one may advance the counter itself)."""
        pid = tl.program_id(0)
        t = tl.load(block_tensor_ptr + pid).to(tl.int64)
        row = meta_ptr + t * META
        n = tl.load(row)
        b = pid - tl.load(row + 4)
        g_raw = tl.load(gptr_ptr + t)
        present = g_raw != 0
        start = b * block_size
        length = tl.where(present, tl.minimum(block_size, n - start), 0)
        g = typed_pointer(g_raw, G_KIND)
        bad = tl.zeros((), dtype=tl.int32)
        for t0 in range(0, length, TILE):
            cols = t0 + tl.arange(0, TILE)
            x = tl.load(g + start + cols, mask=cols < length, other=0.0).to(tl.float32)
            bad += tl.sum((~(tl.abs(x) < float("inf"))).to(tl.int32), axis=0)  # NaN fails the comparison too
        tl.store(flags_ptr + flag_now + t, 0, mask=(bad > 0) | (~present))
        first = b == 0
        tl.store(flags_ptr + flag_next + t, 1, mask=first)
        step_raw = tl.load(row + 11)
        old = tl.load(typed_pointer(step_raw, 0), mask=first & (step_raw != 0), other=0.0)
        tl.store(old_ptr + t, old, mask=first)

    @triton.jit
    def _fifteenth(d):
        """fp32 d / 15, correctly rounded (as tl.div_rn(d, 15.0) and IEEE division on CPU), without a division:
        fp64(d) * fp64(1 / 15), rounded once to fp32. The fp64 product is within 2**-52 (relative) of d / 15,
        and d / 15 is never that close to a point where fp32 rounding changes: its binary digits repeat with
        period 4 (1 / 15 = 0.000100010001...), never a long run of 0s or 1s, unless it is exact. (Checked for
        every fp32 d.) tl.div_rn calls a slow-path subroutine per value, which cost registers around it."""
        return (d.to(tl.float64) * (1.0 / 15.0)).to(tl.float32)

    @triton.jit
    def _count(flags):
        """How many lanes of a 2-D tile are set (summed as one row: one in-thread sum, one shuffle tree)."""
        return tl.sum(tl.reshape(flags.to(tl.int32), (flags.shape[0] * flags.shape[1],)), axis=0)

    @triton.jit
    def _inclusive_cumsum(x):
        """Per lane of a 2-D tile, the sum of x over the lanes up to and including it, in row-major order."""
        return tl.reshape(tl.cumsum(tl.reshape(x, (x.shape[0] * x.shape[1],)), axis=0), x.shape)

    @triton.jit
    def _fused_tile(g, codes, lo, hi, t0, length, NB: tl.constexpr, BUCKET: tl.constexpr):
        """a = g + Q^-1(e) over the tile of NB buckets at ``t0`` of a block, as an (NB, BUCKET) tensor (a bucket
        per row; three roundings, as the reference), with each lane's block-relative column and whether it lies
        in the block. ``g``, ``codes``, ``lo``, ``hi`` point at the block's first entry, byte and bucket: the
        offsets here are int32 and the range of a bucket is loaded once, not per lane."""
        rows = tl.arange(0, NB)
        cols = t0 + rows[:, None] * BUCKET + tl.arange(0, BUCKET)[None, :]
        valid = cols < length
        pair = t0 // 2 + tl.arange(0, NB * BUCKET // 2)
        byte = tl.load(codes + pair, mask=2 * pair < length, other=0).to(tl.int32)
        code = tl.reshape(tl.join(byte >> 4, byte & 15), (NB, BUCKET)).to(tl.float32)  # high nibble first
        bucket = t0 // BUCKET + rows
        held = bucket * BUCKET < length
        lo_b = tl.load(lo + bucket, mask=held, other=0.0).to(tl.float32)
        hi_b = tl.load(hi + bucket, mask=held, other=0.0).to(tl.float32)
        step = _fifteenth(hi_b - lo_b)  # ops.quant._grid: (hi - lo) / LEVELS
        even = 2 * pair
        g_even = tl.load(g + even, mask=even < length, other=0.0).to(tl.float32)
        g_odd = tl.load(g + even + 1, mask=even + 1 < length, other=0.0).to(tl.float32)
        grad = tl.reshape(tl.join(g_even, g_odd), (NB, BUCKET))  # pairs, as the codes: no layout conversion
        return (code * step[:, None] + lo_b[:, None]) + grad, cols, valid

    @triton.jit
    def _fused_digit_pass(g, codes, lo, hi, length, k, prefix, above, SHIFT: tl.constexpr, WIDTH: tl.constexpr,
                          NB: tl.constexpr, BUCKET: tl.constexpr):
        """_digit_pass over a block that is not held anywhere: each tile's a is recomputed from g and e."""
        TILE: tl.constexpr = NB * BUCKET
        bins = tl.arange(0, 32)
        hist = tl.zeros((32,), dtype=tl.int32)
        for t0 in range(0, length, TILE):
            x, cols, valid = _fused_tile(g, codes, lo, hi, t0, length, NB, BUCKET)
            key = x.to(tl.int32, bitcast=True) & 0x7FFFFFFF
            match = valid & ((key >> (SHIFT + WIDTH)) == prefix)
            digit = tl.where(match, (key >> SHIFT) & ((1 << WIDTH) - 1), 0)
            unmatched = TILE - _count(match)  # counted in bin 0 below
            hist += tl.histogram(tl.reshape(digit, (TILE,)), 32) - tl.where(bins == 0, unmatched, 0)
        return _next_digit(hist, k, prefix, above, WIDTH)

    @triton.jit
    def _select_requantize(x, cols, valid, key, threshold, need, tied_before, above_before, idx, val, codes, lo,
                           hi, t0, length, NB: tl.constexpr, BUCKET: tl.constexpr):
        """One tile of the last pass: the chosen lanes (keys above the threshold, and of the keys equal to it the
        first ``need`` by index, ``tied_before`` of them in earlier tiles) into the window row, in index order
        after the ``above_before`` keys above the threshold of earlier tiles and the chosen ties; then the
        tile's bucket ranges and 4-bit codes of a with the chosen lanes zeroed (the buckets are the tile's rows,
        so min/max and codes never leave registers). Every store depends on the loads of the same addresses in
        ``_fused_tile``. Returns the tile's ties and keys above the threshold, packed as ties * 2**16 + above."""
        above = valid & (key > threshold)
        tied = valid & (key == threshold)
        # one scan for both ranks: a tile has < 2**16 lanes, so the two counts never carry into each other
        packed = above.to(tl.int32) + (tied.to(tl.int32) << 16)
        rank = _inclusive_cumsum(packed)
        ties_upto = tied_before + (rank >> 16)  # ties of the block up to this lane
        chosen = above | (tied & (ties_upto <= need))
        slot = above_before + (rank & 65535) + tl.minimum(ties_upto, need) - 1
        tl.store(idx + slot, cols.to(tl.int16), mask=chosen)
        tl.store(val + slot, bf16_nearest(x).to(tl.bfloat16), mask=chosen)
        az = tl.where(chosen, 0.0, x)
        bucket = t0 // BUCKET + tl.arange(0, NB)
        held = bucket * BUCKET < length
        lo_b = tl.where(held, _round_bf16(tl.min(tl.where(valid, az, float("inf")), axis=1), True), 0.0)
        hi_b = tl.where(held, _round_bf16(tl.max(tl.where(valid, az, float("-inf")), axis=1), False), 0.0)
        tl.store(lo + bucket, lo_b.to(tl.bfloat16), mask=held)
        tl.store(hi + bucket, hi_b.to(tl.bfloat16), mask=held)
        step = _fifteenth(hi_b - lo_b)  # as _code
        quantised = step >= 1.1754943508222875e-38
        inv_step = tl.where(quantised, tl.div_rn(1.0, tl.where(quantised, step, 1.0)), 0.0)
        y = tl.floor((az - lo_b[:, None]) * inv_step[:, None] + 0.5)  # three roundings, as the reference
        code = tl.where(valid, tl.minimum(tl.maximum(y, 0.0), 15.0).to(tl.int32), 0)  # an odd end's low nibble: 0
        high, low = tl.split(tl.reshape(code, (NB * BUCKET // 2, 2)))
        pair = t0 // 2 + tl.arange(0, NB * BUCKET // 2)
        tl.store(codes + pair, ((high << 4) | low).to(tl.uint8), mask=2 * pair < length)
        return tl.sum(tl.reshape(packed, (NB * BUCKET,)), axis=0)

    @triton.jit(do_not_specialize=["flag_now"])
    def _group_compress_kernel(meta_ptr, gptr_ptr, block_tensor_ptr, flags_ptr, flag_now, old_ptr, block_size,
                               k_block, m, G_KIND: tl.constexpr, BUCKET: tl.constexpr, TILE: tl.constexpr,
                               SUB: tl.constexpr, SINGLE_TILE: tl.constexpr, META: tl.constexpr):
        """Stage 1, one block of one tensor: a = g + Q^-1(e); its Top-K into the window row of this step;
        a[chosen] = 0; new bucket ranges and codes. The threshold of the Top-K first: a block of <= TILE entries
        is read once and its keys stay in registers for the 31 one-bit passes; a longer one is walked in 7
        histogram passes over sub-tiles. Then a last pass over sub-tiles recomputes a (from L1/L2), writes the
        chosen entries and requantises. Sub-tiles of SUB entries ((SUB / BUCKET, BUCKET): a bucket per row)
        keep what a thread holds small: a whole 4096-entry tile of a, its keys, ranks and ranges at once needed
        ~140-190 registers (8 resident warps per SM on sm_90)."""
        NB: tl.constexpr = SUB // BUCKET
        pid = tl.program_id(0)
        t = tl.load(block_tensor_ptr + pid).to(tl.int64)
        row = meta_ptr + t * META
        n = tl.load(row)
        k_total = tl.load(row + 1)
        k_tail = tl.load(row + 3)
        b = pid - tl.load(row + 4)
        active = tl.load(flags_ptr + flag_now + t) != 0
        start = b * block_size
        whole = tl.minimum(block_size, n - start)
        length = tl.where(active, whole, 0).to(tl.int32)  # an inactive tensor: every load and store masked
        k = tl.where(whole == block_size, k_block, k_tail).to(tl.int32)
        ring = tl.load(old_ptr + t).to(tl.int32) % m  # (step - 1) % m of this step
        # the block's own pointers (int64 arithmetic once; per lane int32 offsets from them)
        g = typed_pointer(tl.load(gptr_ptr + t), G_KIND) + start
        out = ring * k_total + b * k_block
        idx = typed_pointer(tl.load(row + 6), 3) + out
        val = typed_pointer(tl.load(row + 7), 1) + out
        codes = typed_pointer(tl.load(row + 8), 4) + start // 2  # block_size is even and a multiple of BUCKET
        lo = typed_pointer(tl.load(row + 9), 1) + start // BUCKET
        hi = typed_pointer(tl.load(row + 10), 1) + start // BUCKET
        zero = tl.zeros((), dtype=tl.int32)
        # 1. the threshold: the k-th largest key of the block, and how many keys lie above it
        if SINGLE_TILE:
            whole_a, _, in_block = _fused_tile(g, codes, lo, hi, 0, length, TILE // BUCKET, BUCKET)
            keys = tl.where(in_block, whole_a.to(tl.int32, bitcast=True) & 0x7FFFFFFF, -1)  # past it: never counted
            threshold = zero
            for bit in tl.static_range(30, -1, -1):
                candidate = threshold | (1 << bit)
                threshold = tl.where(_count(keys >= candidate) >= k, candidate, threshold)
            above = _count(keys > threshold)
        else:
            threshold, above = _fused_digit_pass(g, codes, lo, hi, length, k, zero, zero, 26, 5, NB, BUCKET)
            threshold, above = _fused_digit_pass(g, codes, lo, hi, length, k, threshold, above, 21, 5, NB, BUCKET)
            threshold, above = _fused_digit_pass(g, codes, lo, hi, length, k, threshold, above, 16, 5, NB, BUCKET)
            threshold, above = _fused_digit_pass(g, codes, lo, hi, length, k, threshold, above, 11, 5, NB, BUCKET)
            threshold, above = _fused_digit_pass(g, codes, lo, hi, length, k, threshold, above, 6, 5, NB, BUCKET)
            threshold, above = _fused_digit_pass(g, codes, lo, hi, length, k, threshold, above, 1, 5, NB, BUCKET)
            threshold, above = _fused_digit_pass(g, codes, lo, hi, length, k, threshold, above, 0, 1, NB, BUCKET)
        # 2. every key above the threshold, and of the keys equal to it the first k - above by index (the
        # reference's tie rule), in index order: ties and slots are counted across the sub-tiles in order
        tied_before = zero
        above_before = zero
        for t0 in range(0, length, SUB):
            x, cols, valid = _fused_tile(g, codes, lo, hi, t0, length, NB, BUCKET)
            key = x.to(tl.int32, bitcast=True) & 0x7FFFFFFF
            counts = _select_requantize(x, cols, valid, key, threshold, k - above, tied_before, above_before, idx,
                                        val, codes, lo, hi, t0, length, NB, BUCKET)
            tied_before += counts >> 16
            above_before += counts & 65535

    @triton.jit
    def _window_entry_chunk(idx, k_total, count, total, e0, ENTRIES: tl.constexpr):
        """Window entries e0 .. e0 + ENTRIES of a block (row-major over (rows, count); ``idx`` points at the
        block's column 0 of row 0): row, column, index."""
        e = e0 + tl.arange(0, ENTRIES)
        live = e < total
        r = e // tl.maximum(count, 1)
        j = e - r * count
        x = tl.load(idx + r * k_total + j, mask=live, other=0).to(tl.int32)
        return live, r, j, x

    @triton.jit(do_not_specialize=["flag_now", "wd_bits"])
    def _group_window_kernel(meta_ptr, block_tensor_ptr, flags_ptr, flag_now, old_ptr, table_ptr, m, c_last,
                             block_size, k_block, search_steps, lr, decay, eps, lr_ptr, wd_bits,
                             P_KIND: tl.constexpr, LR_FROM_PTR: tl.constexpr, DECAY: tl.constexpr,
                             ENTRIES: tl.constexpr, TILE: tl.constexpr, META: tl.constexpr):
        """Stage 2, one block of one tensor: its window entries (every written row) give the moments at their
        positions, and the entry of the first row holding a position (its owner) writes p there; with weight
        decay, the positions of the block that no row holds get p * decay (found by a histogram of the entries,
        so the two sets of addresses are disjoint and no program reads what another lane writes). The tensor's
        step counter advances first (block 0's program): this launch reads ``old``, never the counter, and the
        store at the end kept its address and value live (spilled) across both loops."""
        pid = tl.program_id(0)
        t = tl.load(block_tensor_ptr + pid).to(tl.int64)
        row = meta_ptr + t * META
        n = tl.load(row)
        k_total = tl.load(row + 1)
        full_blocks = tl.load(row + 2)
        k_tail = tl.load(row + 3)
        b = pid - tl.load(row + 4)
        active = tl.load(flags_ptr + flag_now + t) != 0
        old = tl.load(old_ptr + t)
        tl.store(typed_pointer(tl.load(row + 11), 0), old + 1.0, mask=active & (b == 0))
        step = old.to(tl.int32) + 1
        rows = tl.where(active, tl.minimum(step, m), 0)
        newest = (step - 1) % m
        ci = tl.minimum(step, c_last)  # bias corrections: constant past c_last when the table is saturated
        c1 = tl.load(table_ptr + 2 * m + ci)
        c2 = tl.load(table_ptr + 2 * m + c_last + 1 + ci)
        if LR_FROM_PTR:  # a tensor lr on the device, read here (no host sync); 1 - lr * wd in fp64, as Python
            lr64 = tl.load(lr_ptr).to(tl.float64)
            neg_lr = (-lr64).to(tl.float32)
            decay_ = (1.0 - lr64 * wd_bits.to(tl.int64).to(tl.float64, bitcast=True)).to(tl.float32)
        else:
            neg_lr = -lr
            decay_ = decay
        # the block's own addresses and the length its weight decay covers, made once before the loops: fewer
        # values live across them
        col0 = b * k_block
        base = b * block_size
        p = typed_pointer(tl.load(row + 5), P_KIND) + base
        idx = typed_pointer(tl.load(row + 6), 3) + col0
        val = typed_pointer(tl.load(row + 7), 1) + col0
        count = tl.where(b < full_blocks, k_block, k_tail).to(tl.int32)  # int32: _lower_bound's loop types
        total = rows * count
        if DECAY:
            length = tl.where(active, tl.minimum(block_size, n - base), 0).to(tl.int32)
        for e0 in range(0, total, ENTRIES):
            live, r, j, x = _window_entry_chunk(idx, k_total, count, total, e0, ENTRIES)
            first = tl.zeros((ENTRIES,), dtype=tl.float32)
            second = tl.zeros((ENTRIES,), dtype=tl.float32)
            owner = live
            for other in range(0, rows):
                at, found, v = _row_entry(idx, val, other * k_total, count, x, live, search_steps)
                earlier = (found & (other < r)) | ((other == r) & (at != j))
                owner = tl.where(earlier, False, owner)
                age = (newest - other + m) % m
                # window_weights: fp32(beta**age) * fp32(c)
                first, second = _add_moments(first, second, found, v, tl.load(table_ptr + age) * c1,
                                             tl.load(table_ptr + m + age) * c2)
            update = _window_direction(first, second, neg_lr, eps)
            q = tl.load(p + x, mask=owner, other=0.0)
            new = q.to(tl.float32) * decay_ + update
            if P_KIND == 1:
                new = bf16_nearest(new)
            tl.store(p + x, new.to(q.dtype), mask=owner)
        if DECAY:
            bins = tl.arange(0, TILE)
            for t0 in range(0, length, TILE):
                held = tl.zeros((TILE,), dtype=tl.int32)
                for e0 in range(0, total, ENTRIES):
                    live, r, j, x = _window_entry_chunk(idx, k_total, count, total, e0, ENTRIES)
                    inside = live & (x >= t0) & (x < t0 + TILE)
                    outside = ENTRIES - tl.sum(inside.to(tl.int32), axis=0)  # counted in bin 0 below
                    at = tl.where(inside, x - t0, 0).to(tl.int32)
                    held += tl.histogram(at, TILE) - tl.where(bins == 0, outside, 0)
                cols = t0 + bins
                keep = (cols < length) & (held == 0)
                q = tl.load(p + cols, mask=keep, other=0.0)
                new = q.to(tl.float32) * decay_
                if P_KIND == 1:
                    new = bf16_nearest(new)
                tl.store(p + cols, new.to(q.dtype), mask=keep)


def dequant_add(codes: Tensor, lo: Tensor, hi: Tensor, grad: Tensor, bucket_size: int) -> Tensor:
    """fp32 a = grad + Q^-1(codes) (grad flat, any float dtype)."""
    n = grad.numel()
    out = torch.empty(n, dtype=torch.float32, device=grad.device)
    grid = (triton.cdiv(n, _ELEMENTWISE_BLOCK),)
    _dequant_add_kernel[grid](codes, lo, hi, grad, out, n, bucket_size, BLOCK=_ELEMENTWISE_BLOCK, **EXACT)
    return out


def block_topk_into(a: Tensor, indices: Tensor, values: Tensor, block_size: int, k_init: float) -> None:
    """Top-K of every block of ``a`` into one window row (int16 ``indices``, bf16 ``values``); a[chosen] = 0."""
    n = a.numel()
    blocks = topk_blocks(n, block_size, k_init)
    longest = min(block_size, n)
    tile = min(pow2(longest), TILE_MAX)
    grid = (blocks.full_blocks + (1 if blocks.tail else 0),)
    _block_topk_kernel[grid](a, indices, values, n, block_size, blocks.k_block, blocks.k_tail, TILE=tile,
                             SUB=min(tile, SUB_MAX), SINGLE_TILE=longest <= tile, num_warps=8 if tile >= 2048 else 4,
                             **EXACT)


def bucket_ranges(a: Tensor, bucket_size: int, out: tuple[Tensor, Tensor] | None = None) -> tuple[Tensor, Tensor]:
    """bf16 (min, max) per bucket, rounded outwards (into ``out`` if given)."""
    n = a.numel()
    buckets = triton.cdiv(n, bucket_size)
    if out is None:
        out = (torch.empty(buckets, dtype=torch.bfloat16, device=a.device),
               torch.empty(buckets, dtype=torch.bfloat16, device=a.device))
    lo, hi = out
    _bucket_ranges_kernel[(buckets,)](a, lo, hi, n, bucket_size, BLOCK=min(pow2(bucket_size), 1024), **EXACT)
    return lo, hi


def quantize_pack(a: Tensor, lo: Tensor, hi: Tensor, bucket_size: int, out: Tensor | None = None) -> Tensor:
    n = a.numel()
    if out is None:
        out = torch.empty((n + 1) // 2, dtype=torch.uint8, device=a.device)
    grid = (triton.cdiv((n + 1) // 2, _ELEMENTWISE_BLOCK),)
    _quantize_pack_kernel[grid](a, lo, hi, out, n, bucket_size, BLOCK=_ELEMENTWISE_BLOCK, **EXACT)
    return out


@functools.lru_cache(maxsize=32)
def _weights(step: int, m: int, betas: tuple[float, float], device: torch.device, bias_correction: str = "paper"
             ) -> tuple[Tensor, Tensor]:
    """``window_weights`` (bias corrections folded in, as the torch path uses them), built once per step:
    the tensors of a group share it instead of copying two small tensors to the device each."""
    return window_weights(step, m, betas, device, bias_correction)


def window_update(p_flat: Tensor, indices: Tensor, values: Tensor, block_size: int, k_init: float, step: int,
                  betas: tuple[float, float], eps: float, lr: float, weight_decay: float,
                  bias_correction: str = "paper") -> None:
    """p <- p * (1 - lr wd) - lr * (Adam direction from the window), in place on the flat ``p_flat``.

    ``indices``/``values``: the (m, k_total) window, rows ascending per block (as ``block_topk_into`` writes
    them); rows at or past ``step`` are not written yet and are skipped (their weights are 0)."""
    n, (m, k_total) = p_flat.numel(), indices.shape
    if not (p_flat.is_contiguous() and indices.is_contiguous() and values.is_contiguous()):
        raise ValueError("window_update needs contiguous p_flat, indices and values")
    blocks = topk_blocks(n, block_size, k_init)
    rows = min(step, m)
    w1, w2 = _weights(step, m, (float(betas[0]), float(betas[1])), p_flat.device, bias_correction)
    decay = decay_factor(lr, weight_decay)  # as the torch path computes it (in Python floats, then fp32)
    in_place = round_fp32(decay) == 1.0  # then p * decay is p: no dense pass, owners update p themselves
    steps = max(blocks.k_block, blocks.k_tail).bit_length()
    entries = _WINDOW_ENTRIES if p_flat.is_cuda else _WINDOW_ENTRIES_INTERPRETED
    grid = (triton.cdiv(k_total, entries), rows)
    args = (k_total, block_size, blocks.k_block, blocks.full_blocks, blocks.k_tail, rows, steps, lr, eps, decay)
    if in_place:
        _window_entries_kernel[grid](p_flat, indices, values, w1, w2, p_flat, indices, *args, IN_PLACE=True,
                                     ENTRIES=entries, **EXACT)
        return
    upd = torch.empty(rows, k_total, dtype=p_flat.dtype, device=p_flat.device)
    own = torch.empty(rows, k_total, dtype=torch.int8, device=p_flat.device)
    _window_entries_kernel[grid](p_flat, indices, values, w1, w2, upd, own, *args, IN_PLACE=False,
                                 ENTRIES=entries, **EXACT)
    _decay_kernel[(triton.cdiv(n, _ELEMENTWISE_BLOCK),)](p_flat, n, decay, BLOCK=_ELEMENTWISE_BLOCK, **EXACT)
    total = rows * k_total
    _window_scatter_kernel[(triton.cdiv(total, _ELEMENTWISE_BLOCK),)](
        p_flat, indices, upd, own, total, k_total, block_size, blocks.k_block, blocks.full_blocks,
        BLOCK=_ELEMENTWISE_BLOCK, **EXACT)


def sparse_window_step_triton(p: Tensor, grad: Tensor, window_indices: Tensor, window_values: Tensor,
                          ef_codes: Tensor, ef_min: Tensor, ef_max: Tensor, *, step: int, lr: float | Tensor,
                          betas: tuple[float | Tensor, float | Tensor], eps: float | Tensor,
                          weight_decay: float | Tensor, m: int, k_init: float, topk_block_size: int,
                          quant_block_size: int, bias_correction: str = "paper") -> None:
    """One step of one tensor with the Triton kernels (the same maths as the torch references).

    ``p`` is updated in place and the five state tensors (the window (m, k_total)
    int16 / bf16, ``ef_codes`` (ceil(n / 2),) uint8, ``ef_min``/``ef_max`` (buckets,) bf16) are advanced;
    ``step`` is the tensor's own step count, from 1. Hyperparameters are plain numbers (a 0-dim tensor is
    read with ``.item()``)."""
    if window_indices.shape[0] != m:
        raise ValueError(f"window has {window_indices.shape[0]} rows, m = {m}")
    lr_, wd, eps_ = float(lr), float(weight_decay), float(eps)  # a 0-d tensor: read once (.item())
    betas_ = (float(betas[0]), float(betas[1]))
    row = (step - 1) % m

    a = dequant_add(ef_codes, ef_min, ef_max, grad.reshape(-1), quant_block_size)  # (4)
    block_topk_into(a, window_indices[row], window_values[row], topk_block_size, k_init)  # (5, 9, 6)
    bucket_ranges(a, quant_block_size, out=(ef_min, ef_max))  # (7): dequant_add has read the old ones
    quantize_pack(a, ef_min, ef_max, quant_block_size, out=ef_codes)  # (8)
    del a
    p_flat = p.view(-1) if p.is_contiguous() else p.detach().reshape(-1).clone()
    window_update(p_flat, window_indices, window_values, topk_block_size, k_init, step, betas_, eps_, lr_,
                  wd, bias_correction)  # (10, 11)
    if p_flat.data_ptr() != p.data_ptr():
        p.copy_(p_flat.view_as(p))


# -- the group launches -------------------------------------------------------------------------------------
_META = 12  # int64 per tensor: n, k_total, full_blocks, k_tail, first block, p, idx, val, codes, lo, hi, step
_GROUP_ENTRIES = 512  # window entries per chunk of a block's program (GPU); the interpreter takes wider ones
_GROUP_ENTRIES_INTERPRETED = 4096
# positions of a block that the window launch's weight decay takes at a time (one histogram of the entries
# each): a 4096 tile held 32 counts, then 32 values of p, per thread at 4 warps (64-96 registers on sm_80/sm_90
# where the entries loop needs <= 72); at 2048 the entries loop sets them (sm_80 70-72, sm_90 55-56)
_DECAY_TILE = 2048
_TABLE_START = 1024  # steps the first bias-correction table covers (it doubles as steps grow)
_STATE_DTYPES = (torch.int16, torch.bfloat16, torch.uint8, torch.bfloat16, torch.bfloat16, torch.float32)


def group_sizes_supported(topk_block_size: int, quant_block_size: int) -> bool:
    """Whether ``SparseWindowStep`` takes these sizes: the fused pass keeps every bucket of a Top-K block in
    registers, so buckets must be a power of two <= TILE_MAX that tiles every block (and nibble pairs too)."""
    b = quant_block_size
    return b >= 1 and b & (b - 1) == 0 and b <= TILE_MAX and topk_block_size % max(b, 2) == 0


def _saturation(beta: float) -> int:
    """The least step s with 1 - beta**s == 1.0 in doubles: from s on, (1 - beta) / (1 - beta**s) is constant."""
    if beta <= 0.0:
        return 1
    hi = 1
    while 1 - beta**hi != 1.0:
        hi *= 2
    lo = hi // 2 + 1 if hi > 1 else 1
    while lo < hi:
        mid = (lo + hi) // 2
        if 1 - beta**mid == 1.0:
            hi = mid
        else:
            lo = mid + 1
    return hi


class SparseWindowStep:
    """One step of many tensors of one device and one parameter dtype, in three launches whatever
    their number: ``check`` (stage 0: which gradients are present and finite), then ``step`` (stage 1: the
    fused compression, stage 2: the window update, which also advances each tensor's step counter).

    Built once per list of tensor sizes: ``block_tensor`` maps each program (a Top-K block of the whole list)
    to its tensor, ``meta`` holds per tensor its Top-K blocks and the addresses of p and of its state (``bind``);
    the gradients' addresses are a table of their own, uploaded only when they change. No host sync: the
    flags, the step counters and a tensor lr stay on the device; bias corrections come from a table of fp32
    values per step (computed in Python doubles exactly as ``window_weights`` does), indexed in the kernel by
    the tensor's own step. Each state tensor must be contiguous, with the shapes and dtypes of ``bind``; ``step``
    is a 0-d fp32 tensor on the device (the kernels advance it where the tensor was updated)."""

    def __init__(self, numels: Sequence[int], device: torch.device | str, param_dtype: torch.dtype, *, m: int,
                 k_init: float, topk_block_size: int, quant_block_size: int, bias_correction: str = "paper") -> None:
        if not group_sizes_supported(topk_block_size, quant_block_size):
            raise ValueError(f"SparseWindowStep needs a power-of-two quant_block_size <= {TILE_MAX} dividing "
                             f"topk_block_size, got {quant_block_size} and {topk_block_size}")
        if param_dtype not in POINTER_KINDS or not numels or min(numels) < 1:
            raise ValueError("SparseWindowStep takes non-empty fp32, bf16 or fp16 tensors")
        self.device, self.count, self.p_kind = torch.device(device), len(numels), POINTER_KINDS[param_dtype]
        self.m, self.k_init, self.block_size, self.bucket = m, k_init, topk_block_size, quant_block_size
        self.bias_correction = bias_correction  # "window": corrections at min(step, m) (ops.sparse_window)
        splits = [topk_blocks(n, topk_block_size, k_init) for n in numels]
        blocks = np.array([lay.full_blocks + (1 if lay.tail else 0) for lay in splits], dtype=np.int64)
        self.blocks = int(blocks.sum())
        meta = np.zeros((self.count, _META), dtype=np.int64)
        meta[:, 0] = numels
        meta[:, 1] = [lay.k_total for lay in splits]
        meta[:, 2] = [lay.full_blocks for lay in splits]
        meta[:, 3] = [lay.k_tail for lay in splits]
        meta[:, 4] = np.cumsum(blocks) - blocks
        self._meta = meta
        self.meta = self._upload(meta)
        self.block_tensor = self._upload(np.repeat(np.arange(self.count, dtype=np.int32), blocks))
        longest = max(min(topk_block_size, n) for n in numels)
        self.single_tile = longest <= TILE_MAX
        self.tile = max(min(pow2(longest), TILE_MAX), quant_block_size, 32)
        self.sub = max(min(self.tile, SUB_MAX), quant_block_size)  # whole buckets
        self.k_block = splits[0].k_block
        k_max = max(max((lay.k_block for lay in splits if lay.full_blocks), default=0),
                    max(lay.k_tail for lay in splits))
        self.search_steps = k_max.bit_length()
        cap = _GROUP_ENTRIES if self.device.type == "cuda" else _GROUP_ENTRIES_INTERPRETED
        self.entries = max(32, min(pow2(m * k_max), cap))
        self.flags = torch.ones(2, self.count, dtype=torch.int32, device=self.device)
        self.flag_rows = (self.flags[0], self.flags[1])  # views made once: reading one back costs no torch op
        self.old = torch.zeros(self.count, dtype=torch.float32, device=self.device)
        self.parity, self.bound = 0, 0  # bound: no tensor's step counter exceeds it
        self._gptrs: tuple[int, ...] | None = None
        self._gdev: Tensor | None = None
        self._grads: list[Tensor | None] | None = None
        self._g_kind = 0
        self._table_key: tuple[float, float] | None = None
        self._table_len = 0
        self._table: Tensor | None = None

    def _upload(self, array: np.ndarray) -> Tensor:
        """A host table on the device without a sync: pinned, non-blocking (the caching host allocator keeps
        the pinned block until the copy has run)."""
        host = torch.from_numpy(np.ascontiguousarray(array).copy())
        if self.device.type == "cpu":
            return host
        return host.pin_memory().to(self.device, non_blocking=True)

    def bind(self, params: Sequence[Tensor], states: Sequence[Sequence[Tensor] | None], bound: int) -> None:
        """Point the tables at ``params`` and their state, per tensor (window_indices, window_values, ef_codes,
        ef_min, ef_max, step) or None for a tensor without state (it must then have no gradient in ``step``).
        ``bound``: an upper bound of their step counters."""
        if len(params) != self.count or len(states) != self.count:
            raise ValueError(f"bind: {len(params)} tensors and {len(states)} states, the tables have {self.count}")
        meta = self._meta
        meta[:, 5:] = 0
        for i, (p, state) in enumerate(zip(params, states)):
            if p.numel() != meta[i, 0] or POINTER_KINDS.get(p.dtype) != self.p_kind or not p.is_contiguous():
                raise ValueError(f"bind: tensor {i} is not a contiguous tensor of {meta[i, 0]} entries of the "
                                 "tables' dtype")
            meta[i, 5] = p.data_ptr()
            if state is None:
                continue
            for j, (t, dtype) in enumerate(zip(state, _STATE_DTYPES)):
                if t.dtype != dtype or t.device != self.device or not t.is_contiguous():
                    raise ValueError(f"bind: state tensor {j} of tensor {i} must be a contiguous {dtype} tensor on "
                                     f"{self.device}")
                meta[i, 6 + j] = t.data_ptr()
        self.meta = self._upload(meta)
        self.bound = max(self.bound, bound)

    def check(self, grads: Sequence[Tensor | None]) -> Tensor:
        """Stage 0 for this step's gradients (None: no gradient; ``grads`` must stay unchanged until ``step``).
        Returns this step's flags (int32, on the device; not to be written): 1 where tensor i will be updated
        (present and finite), 0 where it will be left alone."""
        dtypes = {g.dtype for g in grads if g is not None}
        if len(grads) != self.count or not dtypes <= POINTER_KINDS.keys():
            raise ValueError("check: one fp32, bf16 or fp16 gradient (or None) per tensor")
        g_dtype = next(iter(dtypes)) if len(dtypes) == 1 else torch.float32  # mixed: all as fp32 (exact)
        prepared = [None if g is None else g.to(g_dtype).contiguous() for g in grads]  # to fp32: exact
        ptrs = tuple(0 if g is None else g.data_ptr() for g in prepared)
        if ptrs != self._gptrs:
            self._gptrs, self._gdev = ptrs, self._upload(np.array(ptrs, dtype=np.int64))
        self._grads, self._g_kind = prepared, POINTER_KINDS[g_dtype]
        self.parity ^= 1  # this step's flags row; the other one is set back to 1 for the next step
        now, following = self.parity * self.count, (1 - self.parity) * self.count
        _group_check_kernel[(self.blocks,)](self.meta, self._gdev, self.block_tensor, self.flags, now, following,
                                            self.old, self.block_size, G_KIND=self._g_kind, TILE=self.tile,
                                            META=_META, **EXACT)
        return self.flag_rows[self.parity]

    def _weights_table(self, betas: tuple[float, float]) -> tuple[Tensor, int]:
        """fp32 [beta1**age (m), beta2**age (m), c1(s) (L), c2(s) (L)] covering every step up to ``bound``;
        returns it and L - 1 (the kernel reads c at min(step, L - 1), where the table saturates)."""
        beta1, beta2 = betas
        saturated = max(_saturation(beta1), _saturation(beta2))
        need = min(self.bound, saturated) + 1
        if self._table_key != (beta1, beta2) or self._table_len < need:
            length = min(max(need, 2 * self._table_len if self._table_key == (beta1, beta2) else 0, _TABLE_START),
                         saturated + 1)
            powers = [beta**age for beta in (beta1, beta2) for age in range(self.m)]  # as row_weights
            cap = self.m if self.bias_correction == "window" else length
            corrections = [0.0 if s == 0 else (1 - beta) / (1 - beta ** min(s, cap))  # as bias_corrections
                           for beta in (beta1, beta2) for s in range(length)]
            self._table = self._upload(np.array(powers + corrections, dtype=np.float64).astype(np.float32))
            self._table_key, self._table_len = (beta1, beta2), length
        return self._table, self._table_len - 1

    def discard_check(self) -> None:
        """Forget a ``check`` that no ``step`` follows."""
        self._grads = None

    def step(self, grads: Sequence[Tensor | None], *, lr: float | Tensor, betas: tuple[float, float], eps: float,
             weight_decay: float) -> None:
        """Stages 1 and 2 (after ``check`` of the same gradients; run here if it was not). ``lr`` may be a
        0-d tensor on the tables' device (read in the kernel), or a number; the rest are numbers."""
        if self._grads is None:
            self.check(grads)
        unbound = [i for i, g in enumerate(self._grads) if g is not None and self._meta[i, 6] == 0]
        if unbound:
            self._grads = None
            raise ValueError(f"step: tensors {unbound[:5]} have a gradient but no state bound")
        self.bound += 1
        table, c_last = self._weights_table((float(betas[0]), float(betas[1])))
        wd = float(weight_decay)
        lr_ptr = table
        lr_from_ptr = isinstance(lr, Tensor) and lr.device == self.device and lr.numel() == 1
        if lr_from_ptr:
            lr_ptr, lr_value, decay = lr, 0.0, 1.0
            has_decay = wd != 0.0
        else:
            lr_value = float(lr)
            decay = round_fp32(decay_factor(lr_value, wd))  # as the torch path: Python doubles, then fp32
            lr_value = round_fp32(lr_value)
            has_decay = wd != 0.0 and decay != 1.0
        now = self.parity * self.count
        gpu = self.device.type == "cuda"
        _group_compress_kernel[(self.blocks,)](
            self.meta, self._gdev, self.block_tensor, self.flags, now, self.old, self.block_size, self.k_block,
            self.m, G_KIND=self._g_kind, BUCKET=self.bucket, TILE=self.tile, SUB=self.sub, SINGLE_TILE=self.single_tile,
            META=_META, num_warps=8 if gpu and self.tile >= 2048 else 4, **EXACT)
        _group_window_kernel[(self.blocks,)](
            self.meta, self.block_tensor, self.flags, now, self.old, table, self.m, c_last, self.block_size,
            self.k_block, self.search_steps, lr_value, decay, round_fp32(float(eps)), lr_ptr, float64_bits(wd),
            P_KIND=self.p_kind, LR_FROM_PTR=lr_from_ptr, DECAY=has_decay, ENTRIES=self.entries,
            TILE=min(self.tile, _DECAY_TILE), META=_META, **EXACT)
        self._grads = None
