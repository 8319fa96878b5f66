"""Triton kernels for one step of block-wise Adam over many tensors: one second moment per block of rows.

The maths (``blockstats``' multi-tensor torch step is the reference): every tensor is cut into blocks, each a
run of whole rows (output neurons) that are contiguous in memory -- rows (a block per row), heads (``unit``
rows), fused projections (segments of either), or the whole tensor (one block). Each block keeps one float32
second moment ``v_b``; the first moment ``m`` is full size, in its own dtype::

    t <- t + 1                                  per tensor, its own counter (a 0-d fp32 tensor on the device)
    m <- beta1 m + (1 - beta1) g                torch's lerp (an FMA, as torch computes it on CPU and CUDA)
    v_b <- beta2 v_b + (1 - beta2) mean_b(g²)   mean over the block's elements
    r_b = (lr / (1 - beta1^t)) / (sqrt(v_b) / sqrt(1 - beta2^t) + eps)
    p <- p (1 - lr wd) - r_b m                  (weight decay decoupled, per tensor)

``BlockMomentsStep`` steps the tensors of one device and one (parameter, gradient, moment) dtype triple in three
launches whatever their number. A *span* is a run of rows of one tensor with one block size (a fused projection
has several); the programs of each launch run over the spans of all tensors, through int32 tables built once per
list of shapes (``spans``: per span its tensor, first element, elements, row length, rows per block, rows, and
where its rows, blocks and v start; and for each launch the span of every program). Tensors are reached through
int64 address tables (``ops.tables.AddressTable``), each kernel given only the tensors it touches:

=================================  ===========================================  ===============================
launch                             reads, writes                                bytes per parameter
=================================  ===========================================  ===============================
``_row_sq_sums_kernel``            reads g; writes one fp32 sum of g² per row,  s_g (+ 4 per row)
                                   and per tensor a flag: 1 where g holds a
                                   NaN or an inf (checked element by element,
                                   so a finite g whose square overflows is not
                                   flagged)
``_block_second_moment_kernel``    per block: reads its rows' sums, v_b, the    O(rows): 4 per row, 12 per block
                                   tensor's flag and step counter; writes v_b
                                   (unless flagged) and r_b (0 where flagged)
``_scaled_moment_update_kernel``   reads p, g, m and r of the element's block;  2 s_p + s_g + 2 s_m (+ r, 4 per
                                   writes p, m (not for a flagged tensor);      block, from L1/L2)
                                   advances the step counter of every tensor
                                   it updated
=================================  ===========================================  ===============================

s_p, s_g, s_m: bytes of a parameter, gradient and first-moment element. fp32: 4 + 20 = 24 B/param, plus O(rows)
for the sums, v and r (0.01 B/param at the 1b preset's widths), against 28 for torch's fused AdamW, whose v is
full size; bf16: 2 + 10 = 12. (The torch step also reads and writes p for the weight decay and reads m once more
for the update: 36 B/param with weight decay.)

Non-finite gradients are decided on the device: a flagged tensor keeps p, m, v and its step counter (the flags
of a step alternate between two rows, the first launch clears next step's row), and ``check`` returns the flags
as a bool device tensor for the caller's policy (nothing is read back). Nothing here syncs with the host:
tables are uploaded pinned and non-blocking, an lr tensor on the device is read by the kernels, and the bias
corrections come from each tensor's counter inside the kernel.

Arithmetic. Every launch passes ``enable_fp_fusion=False`` (no contraction of ``a * b + c``) and uses
``div_rn``/``sqrt_rn``; the three multiply-adds that torch itself fuses on CPU (vectorised ``lerp``, ``add``
with ``alpha``, ``addcmul``) and on CUDA (nvcc contracts them) are explicit ``tl.fma``: the lerp of m, the
v update and the p update. So m is bit-equal to the torch step, and v, r and p are too wherever the block sums
of g² are (they are formed in another order: row sums of lanes, then a tree, against torch's vector norm), up to
the bias corrections, computed here by square-and-multiply in fp64 (torch: ``pow``; equal where the powers are
exact, else within a few fp64 ulps, invisible after rounding to fp32 but for rare ties). bf16 and fp16 values
are rounded to nearest-even where torch rounds them (m after the lerp, p after the decay and after the update),
by bit arithmetic for bf16 (the interpreter's own cast truncates).

Sizes: a tensor of at most 2**31 - 2**20 elements (offsets are int32), p, g and m contiguous;
``contiguous_blocks`` says whether a partition is one this step takes.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import Any

import numpy as np
import torch
from torch import Tensor

from .tables import AddressTable, ValueTable, upload
from .triton_helpers import EXACT, bf16_nearest, float64_bits, pow2, round_fp32
from .triton_support import tl, triton, triton_available

__all__ = ["DTYPES", "BlockMomentsStep", "contiguous_blocks", "triton_available"]

DTYPES = (torch.float32, torch.bfloat16, torch.float16)  # parameter, gradient and moment dtypes the kernels take
# columns of the int32 span table (the kernels read them by number, in this order)
(_T, _START, _NUMEL, _ROW_LEN, _UNIT, _ROWS, _ROW_BASE, _BLOCK_BASE, _V_OFFSET, _BLOCK_LEN, _FIRST_SUMS,
 _FIRST_MOMENT, _FIRST_UPDATE) = range(13)
_META = 13
_WHOLE_ROW = 4096  # a one-block ("whole") tensor is summed in rows of this many elements (the last one shorter)
_ROW_TILE = 2048  # elements of g per iteration of a row-sums program: (rows, columns) of the tile
_ROW_TILE_COLS = 256
_BLOCK_LANES = 1024  # blocks per program of the second-moment launch when each block is one row
_UNIT_TILE = (32, 32)  # (blocks, rows) per iteration when blocks are several rows (heads, whole)
_UPDATE_BLOCK = 4096  # elements per program of the update (GPU)
# Under the interpreter (CPU tensors) each operation costs about the same whatever its width: fewer, wider programs
_ROW_TILE_INTERPRETED = 8192
_UPDATE_BLOCK_INTERPRETED = 16384
_INT32_LIMIT = 2**31 - 1
_MAX_NUMEL = 2**31 - 2**20  # int32 offsets, with room for the last tile of a span


def contiguous_blocks(shape: Sequence[int], partition: dict[str, Any]) -> list[tuple[int, int, int, int, int]] | None:
    """The spans of a tensor of ``shape`` under ``partition`` (``blockstats.Partition``: ``rule`` rows, heads,
    qkv or whole, ``out_dim``, ``unit``, ``segments``), as ``(first element, elements, rows, row length, rows per
    block)``, when every block is a run of contiguous rows; None when this step does not take the tensor: blocks
    along another dimension than the first (GPT-2's Conv1D columns), elementwise partitions, no elements, or
    more than 2**31 - 2**20 (int32 offsets). A whole tensor is one span of rows of at most 4096 elements (any
    shape), all in one block."""
    shape = tuple(int(s) for s in shape)
    numel = math.prod(shape)
    rule = partition.get("rule")
    if numel == 0 or numel > _MAX_NUMEL:
        return None
    if rule == "whole":
        row = min(numel, _WHOLE_ROW)
        rows = -(-numel // row)
        return [(0, numel, rows, row, rows)]
    if rule not in ("rows", "heads", "qkv") or len(shape) < 2 or partition["out_dim"] % len(shape) != 0:
        return None
    rows, row = shape[0], numel // shape[0]
    if rule == "qkv":
        segments = [tuple(int(x) for x in s) for s in partition["segments"]]
    else:
        segments = [(0, rows, int(partition.get("unit", 1)))]
    spans, covered = [], 0
    for start, length, unit in segments:
        if start != covered or unit < 1 or length % unit:
            raise ValueError(f"segments {segments} do not cut {rows} rows into whole blocks")
        covered += length
        spans.append((start * row, length * row, length, row, unit))
    if covered != rows:
        raise ValueError(f"segments {segments} do not cover {rows} rows")
    return spans


def _triton_dtype(dtype: torch.dtype) -> Any:
    return {torch.float32: tl.float32, torch.bfloat16: tl.bfloat16, torch.float16: tl.float16}[dtype]


if triton is not None:

    @triton.jit
    def _rounded(x, DTYPE: tl.constexpr):
        """fp32 ``x`` rounded to nearest-even in DTYPE (bf16 or fp16), returned as fp32 (exactly representable in
        DTYPE). bf16 by bit arithmetic: the interpreter's fp32 -> bf16 cast truncates. No NaN reaches it (flagged
        tensors are masked); inf stays inf and an overflow rounds to inf, as the cast does."""
        if tl.bfloat16 == DTYPE:
            x = bf16_nearest(x)
        else:
            x = x.to(DTYPE).to(tl.float32)
        return x

    @triton.jit(do_not_specialize=["flag_now", "flag_next"])
    def _row_sq_sums_kernel(spans_ptr, program_span_ptr, grads_ptr, sums_ptr, flags_ptr, flag_now, flag_next,
                            G_DTYPE: tl.constexpr, ROWS: tl.constexpr, COLS: tl.constexpr, META: tl.constexpr):
        """ROWS rows of one span: ``sums[row] = Σ g²`` over the row (fp32; lanes accumulate column tiles in order,
        then a tree over the lanes). Reads g once (s_g bytes per element), writes 4 B per row. Flags: stores 1 at
        ``flags[flag_now + t]`` if a value of the rows is NaN or ±inf (a store of one value, from any program of
        the tensor: no atomics), and the tensor's first program stores 0 at ``flags[flag_next + t]`` (next
        step's row; this step's was cleared by the previous launch)."""
        pid = tl.program_id(0)
        span = spans_ptr + tl.load(program_span_ptr + pid).to(tl.int64) * META
        t = tl.load(span + 0)
        start = tl.load(span + 1)
        numel = tl.load(span + 2)
        row_len = tl.load(span + 3)
        n_rows = tl.load(span + 5)
        row_base = tl.load(span + 6)
        local = pid - tl.load(span + 10)
        rows = local * ROWS + tl.arange(0, ROWS)
        live = rows < n_rows
        g = tl.load(grads_ptr + t).to(tl.pointer_type(G_DTYPE)) + start
        first = rows * row_len
        acc = tl.full((ROWS, COLS), 0.0, tl.float32)
        bad = tl.full((ROWS, COLS), 0, tl.int32)
        for c0 in range(0, row_len, COLS):
            cols = c0 + tl.arange(0, COLS)
            offs = first[:, None] + cols[None, :]
            mask = live[:, None] & (cols < row_len)[None, :] & (offs < numel)
            x = tl.load(g + offs, mask=mask, other=0.0).to(tl.float32)
            acc += x * x
            bad = tl.where(tl.abs(x) < float("inf"), bad, 1)  # NaN fails the comparison too
        tl.store(sums_ptr + row_base + rows, tl.sum(acc, axis=1), mask=live)
        # the flag: every lane that saw a NaN/inf stores the same 1 (no reduction, no atomics)
        tl.store(flags_ptr + flag_now + t + bad * 0, tl.full((ROWS, COLS), 1, tl.uint8), mask=bad != 0)
        tl.store(flags_ptr + flag_next + t, tl.full((), 0, tl.uint8), mask=(start == 0) & (local == 0))

    @triton.jit
    def _second_moment_and_rate(sums, old, count, beta2, one_minus_beta2, eps, step_size, corr):
        """The new v_b = beta2 v_b + (1 - beta2) mean_b and the rate r_b = step_size / (sqrt(v_b) / corr + eps),
        in torch's order: mean = sum / count; v * beta2; fma(mean, 1 - beta2, .); sqrt; / corr; + eps;
        step_size / ."""
        new = tl.fma(tl.div_rn(sums, count), one_minus_beta2, old * beta2)
        return new, tl.div_rn(step_size, tl.div_rn(tl.sqrt_rn(new), corr) + eps)

    @triton.jit(do_not_specialize=["flag_now", "lr_bits", "beta1_bits", "beta2_bits"])
    def _block_second_moment_kernel(spans_ptr, program_span_ptr, state_ptr, sums_ptr, rates_ptr, flags_ptr,
                                    flag_now, lr_ptr, lr_bits, beta1_bits, beta2_bits, beta2, one_minus_beta2, eps,
                                    LR_FROM_PTR: tl.constexpr, LANES: tl.constexpr, UNIT_BLOCKS: tl.constexpr,
                                    UNIT_ROWS: tl.constexpr, META: tl.constexpr):
        """Blocks of one span: each block's sum of its rows' sums, its mean, the v_b update and the rate r_b
        (one fp32 per block, written to ``rates``). Per block, not per element: reads 4 B per row and 8 B per
        block (v_b), writes 8 B per block (v_b, r_b). The bias corrections come from the tensor's step counter
        (read here, advanced by the update launch): 1 - beta^(t+1) in fp64, as torch's step in fp64, then
        lr / (1 - beta1^t) and sqrt(1 - beta2^t) rounded to fp32. ``state`` holds per tensor the addresses of v
        and of the step counter."""
        pid = tl.program_id(0)
        span = spans_ptr + tl.load(program_span_ptr + pid).to(tl.int64) * META
        t = tl.load(span + 0)
        unit = tl.load(span + 4)
        n_rows = tl.load(span + 5)
        row_base = tl.load(span + 6)
        block_base = tl.load(span + 7)
        block_len = tl.load(span + 9)
        local = pid - tl.load(span + 11)
        n_blocks = n_rows // unit
        bad = tl.load(flags_ptr + flag_now + t).to(tl.int32)
        v = tl.load(state_ptr + 2 * t).to(tl.pointer_type(tl.float32)) + tl.load(span + 8)
        step = tl.load(tl.load(state_ptr + 2 * t + 1).to(tl.pointer_type(tl.float32))) + 1.0
        if LR_FROM_PTR:
            lr = tl.load(lr_ptr).to(tl.float64)
        else:
            lr = lr_bits.to(tl.int64).to(tl.float64, bitcast=True)
        # beta1^t and beta2^t in fp64 by square and multiply: exact where every partial power is (beta = 0.5,
        # 0.75), else within a few fp64 ulps of torch's pow
        base1 = beta1_bits.to(tl.int64).to(tl.float64, bitcast=True)
        base2 = beta2_bits.to(tl.int64).to(tl.float64, bitcast=True)
        power1 = tl.full((), 1.0, tl.float64)
        power2 = tl.full((), 1.0, tl.float64)
        exponent = step.to(tl.int32)
        while exponent > 0:
            odd = (exponent & 1) != 0
            power1 = tl.where(odd, power1 * base1, power1)
            power2 = tl.where(odd, power2 * base2, power2)
            base1 = base1 * base1
            base2 = base2 * base2
            exponent = exponent >> 1
        bias1 = 1.0 - power1
        bias2 = 1.0 - power2
        step_size = ((1.0 / bias1) * lr).to(tl.float32)  # torch: (1 - beta1^t).reciprocal_().mul_(lr)
        corr = tl.sqrt(bias2).to(tl.float32)  # fp64 sqrt (IEEE), then fp32
        count = tl.maximum(block_len, 1).to(tl.float32)
        # (the branches' tiles differ in shape, so no name is assigned in both: Triton would merge them)
        if unit == 1:
            row_blocks = local * LANES + tl.arange(0, LANES)
            row_live = row_blocks < n_blocks
            row_sums = tl.load(sums_ptr + row_base + row_blocks, mask=row_live, other=0.0)
            row_old = tl.load(v + row_blocks, mask=row_live, other=0.0)
            row_new, row_rate = _second_moment_and_rate(row_sums, row_old, count, beta2, one_minus_beta2, eps,
                                                        step_size, corr)
            tl.store(v + row_blocks, row_new, mask=tl.where(bad == 0, row_live, False))
            tl.store(rates_ptr + block_base + row_blocks, tl.where(bad == 0, row_rate, 0.0), mask=row_live)
        else:
            unit_blocks = local * UNIT_BLOCKS + tl.arange(0, UNIT_BLOCKS)
            unit_live = unit_blocks < n_blocks
            acc = tl.full((UNIT_BLOCKS, UNIT_ROWS), 0.0, tl.float32)
            for u0 in range(0, unit, UNIT_ROWS):
                u = u0 + tl.arange(0, UNIT_ROWS)
                acc += tl.load(sums_ptr + row_base + unit_blocks[:, None] * unit + u[None, :],
                               mask=unit_live[:, None] & (u < unit)[None, :], other=0.0)
            unit_old = tl.load(v + unit_blocks, mask=unit_live, other=0.0)
            unit_new, unit_rate = _second_moment_and_rate(tl.sum(acc, axis=1), unit_old, count, beta2,
                                                          one_minus_beta2, eps, step_size, corr)
            tl.store(v + unit_blocks, unit_new, mask=tl.where(bad == 0, unit_live, False))
            tl.store(rates_ptr + block_base + unit_blocks, tl.where(bad == 0, unit_rate, 0.0), mask=unit_live)

    @triton.jit(do_not_specialize=["flag_now", "lr_bits"])
    def _scaled_moment_update_kernel(spans_ptr, program_span_ptr, grads_ptr, tensors_ptr, decays_ptr, rates_ptr,
                                     flags_ptr, flag_now, lr_ptr, lr_bits, weight, P_DTYPE: tl.constexpr,
                                     G_DTYPE: tl.constexpr, M_DTYPE: tl.constexpr, SMALL_WEIGHT: tl.constexpr,
                                     LR_FROM_PTR: tl.constexpr, ALIGNED: tl.constexpr, BLOCK: tl.constexpr,
                                     META: tl.constexpr):
        """BLOCK elements of one span, each with its block's rate r (``rates[block_base + offset // block_len]``):
        m <- lerp(m, g, weight) (torch's formula: fma(w, g - m, m) for w < 0.5, else fma(w - 1, g - m, g); g
        rounded to m's dtype first when they differ); p <- round(p * fp32(1 - lr wd)); p <- round(fma(-m, r, p)).
        Reads p, g, m (s_p + s_g + s_m bytes per element) and r (4 B per block, cached), writes p and m (s_p + s_m);
        nothing for a flagged tensor. The tensor's first program advances its step counter (unless flagged).
        ``tensors`` holds per tensor the addresses of p, m and the step counter; ``decays`` its weight decay (fp64).
        """
        pid = tl.program_id(0)
        span = spans_ptr + tl.load(program_span_ptr + pid).to(tl.int64) * META
        t = tl.load(span + 0)
        start = tl.load(span + 1)
        numel = tl.load(span + 2)
        block_base = tl.load(span + 7)
        block_len = tl.load(span + 9)
        local = pid - tl.load(span + 12)
        clean = tl.load(flags_ptr + flag_now + t) == 0
        row = tensors_ptr + 3 * t
        p = tl.load(row).to(tl.pointer_type(P_DTYPE))
        m = tl.load(row + 1).to(tl.pointer_type(M_DTYPE))
        g = tl.load(grads_ptr + t).to(tl.pointer_type(G_DTYPE))
        if ALIGNED:  # (checked on the host) the compiler may then load 16 bytes per lane and instruction
            p = tl.multiple_of(p, 16)
            m = tl.multiple_of(m, 16)
            g = tl.multiple_of(g, 16)
            start = tl.multiple_of(start, 8)
            numel = tl.multiple_of(numel, 8)
        p += start
        m += start
        g += start
        offs = local * BLOCK + tl.arange(0, BLOCK)
        live = tl.where(clean, offs < numel, False)  # (`bool tensor & bool scalar` fails in the interpreter)
        if LR_FROM_PTR:
            lr = tl.load(lr_ptr).to(tl.float64)
        else:
            lr = lr_bits.to(tl.int64).to(tl.float64, bitcast=True)
        decay = (1.0 - lr * tl.load(decays_ptr + t)).to(tl.float32)  # Python's 1 - lr * wd, in doubles, then fp32
        rate = tl.load(rates_ptr + block_base + offs // block_len, mask=live, other=0.0)
        grad = tl.load(g + offs, mask=live, other=0.0).to(tl.float32)
        if M_DTYPE != G_DTYPE and tl.float32 != M_DTYPE:
            grad = _rounded(grad, M_DTYPE)  # torch: g.to(m.dtype) before the lerp
        old = tl.load(m + offs, mask=live, other=0.0).to(tl.float32)
        if SMALL_WEIGHT:
            moment = tl.fma(weight, grad - old, old)
        else:
            moment = tl.fma(weight - 1.0, grad - old, grad)
        if tl.float32 != M_DTYPE:  # (the constexpr tests spare the interpreter a call per program)
            moment = _rounded(moment, M_DTYPE)
        tl.store(m + offs, moment.to(M_DTYPE), mask=live)
        param = tl.load(p + offs, mask=live, other=0.0).to(tl.float32) * decay
        if tl.float32 != P_DTYPE:
            param = _rounded(param, P_DTYPE)
        param = tl.fma(-moment, rate, param)
        if tl.float32 != P_DTYPE:
            param = _rounded(param, P_DTYPE)
        tl.store(p + offs, param.to(P_DTYPE), mask=live)
        first = (start == 0) & (local == 0)
        counter = tl.load(row + 2).to(tl.pointer_type(tl.float32))
        old_step = tl.load(counter, mask=first, other=0.0)
        tl.store(counter, old_step + 1.0, mask=tl.where(clean, first, False))


class BlockMomentsStep:
    """One block-wise Adam step of many tensors of one device and one (param, grad, moment) dtype triple, in three
    Triton launches whatever their number: ``check`` (row sums of g² and the non-finite flags), then ``step``
    (block second moments and rates, then the update).

    Built once per list of (shape, partition) (``contiguous_blocks`` must take each): the span table and each
    launch's program table are uploaded here, the buffers for the row sums, the rates and the flags allocated
    here. Per step only address tables are uploaded, and only when an address changed. Nothing is read back.

    The tensors ``step`` is given, per tensor i: ``params[i]`` (contiguous, ``param_dtype``), ``grads[i]``
    (contiguous, ``grad_dtype``), ``exp_avgs[i]`` (contiguous, ``moment_dtype``), ``exp_avg_sqs[i]`` (fp32, one
    value per block: the blocks of its spans in order; 0-d for a whole tensor), ``steps[i]`` (0-d fp32, the
    number of steps taken; advanced where the tensor is updated).
    """

    def __init__(self, shapes: Sequence[Sequence[int]], partitions: Sequence[dict[str, Any]],
                 device: torch.device | str, *, param_dtype: torch.dtype, grad_dtype: torch.dtype,
                 moment_dtype: torch.dtype) -> None:
        if not triton_available():
            raise RuntimeError("BlockMomentsStep needs Triton")
        for name, dtype in (("param_dtype", param_dtype), ("grad_dtype", grad_dtype), ("moment_dtype", moment_dtype)):
            if dtype not in DTYPES:
                raise ValueError(f"Invalid {name}: {dtype} (must be torch.float32, torch.bfloat16 or torch.float16)")
        if len(shapes) != len(partitions) or not shapes:
            raise ValueError(f"BlockMomentsStep: {len(shapes)} shapes and {len(partitions)} partitions (non-empty, "
                             "equal)")
        self.device = torch.device(device)
        self.count = len(shapes)
        self.p_dtype, self.g_dtype, self.m_dtype = (_triton_dtype(d) for d in (param_dtype, grad_dtype, moment_dtype))
        self.dtypes = (param_dtype, grad_dtype, moment_dtype)
        self.numels = [math.prod(int(s) for s in shape) for shape in shapes]
        spans = []
        for i, (shape, partition) in enumerate(zip(shapes, partitions)):
            found = contiguous_blocks(shape, partition)
            if found is None:
                raise ValueError(f"BlockMomentsStep: tensor {i} (shape {tuple(shape)}, rule {partition.get('rule')!r}) "
                                 "is not cut into blocks of contiguous rows")
            spans += [(i, *s) for s in found]
        interpreted = self.device.type != "cuda"
        max_row = max(s[4] for s in spans)
        self.cols = min(_ROW_TILE_COLS, pow2(max_row))
        self.rows = max(1, (_ROW_TILE_INTERPRETED if interpreted else _ROW_TILE) // self.cols)
        self.block = _UPDATE_BLOCK_INTERPRETED if interpreted else _UPDATE_BLOCK
        meta = np.zeros((len(spans), _META), dtype=np.int64)
        programs = np.zeros((3, len(spans)), dtype=np.int64)
        self.blocks_per_tensor = [0] * self.count
        rows_total = blocks_total = 0
        for j, (t, start, numel, rows, row_len, unit) in enumerate(spans):
            n_blocks = rows // unit
            block_len = numel if n_blocks == 1 else unit * row_len
            meta[j] = (t, start, numel, row_len, unit, rows, rows_total, blocks_total, self.blocks_per_tensor[t],
                       block_len, 0, 0, 0)
            programs[0, j] = -(-rows // self.rows)
            programs[1, j] = -(-n_blocks // (_BLOCK_LANES if unit == 1 else _UNIT_TILE[0]))
            programs[2, j] = -(-numel // self.block)
            rows_total += rows
            blocks_total += n_blocks
            self.blocks_per_tensor[t] += n_blocks
        meta[:, _FIRST_SUMS:] = (np.cumsum(programs, axis=1) - programs).T
        # spans that start and end on 8-element boundaries (16 bytes of bf16, 32 of fp32): with 16-byte aligned
        # tensors the update may then use 16-byte loads and stores
        self.spans_aligned = bool(np.all(meta[:, _START] % 8 == 0) and np.all(meta[:, _NUMEL] % 8 == 0))
        if max(rows_total, blocks_total, int(programs.sum(axis=1).max())) > _INT32_LIMIT:
            raise ValueError("BlockMomentsStep: more than 2**31 rows, blocks or programs")
        self.spans = upload(meta.astype(np.int32), self.device)
        self.programs = [upload(np.repeat(np.arange(len(spans), dtype=np.int32), n), self.device) for n in programs]
        self.grids = [(int(n.sum()),) for n in programs]
        self.sums = torch.empty(rows_total, dtype=torch.float32, device=self.device)
        self.rates = torch.empty(blocks_total, dtype=torch.float32, device=self.device)
        self.flags = torch.zeros(2, self.count, dtype=torch.uint8, device=self.device)
        self._no_lr = torch.zeros(1, dtype=torch.float32, device=self.device)  # lr_ptr when lr is a number
        self.flag_rows = (self.flags[0].view(torch.bool), self.flags[1].view(torch.bool))  # made once: no op per step
        self.parity = 0
        self._grad_table = AddressTable(self.device)
        self._tensor_table = AddressTable(self.device)
        self._state_table = AddressTable(self.device)
        self._decays = ValueTable(self.device, np.float64)
        self._checked: tuple[int, ...] | None = None  # the gradients of the last check, until a step uses it
        self._grads_seen: tuple[int, ...] | None = None  # addresses validated
        self._bound: tuple[int, ...] | None = None

    # -- stage 0 ------------------------------------------------------------------------------------
    def check(self, grads: Sequence[Tensor]) -> Tensor:
        """Launch the row sums of g² and the non-finite flags of ``grads`` (which must stay unchanged until
        ``step``). Returns this step's flags, a bool tensor on the device, one per tensor: True where the gradient
        holds a NaN or an inf (``step`` will leave that tensor and its state alone). Reads nothing back."""
        if len(grads) != self.count:
            raise ValueError(f"check: {len(grads)} gradients for {self.count} tensors")
        addresses = tuple(g.data_ptr() for g in grads)
        if addresses != self._grads_seen:  # (gradients allocated again usually come back at the same addresses)
            for i, g in enumerate(grads):
                if g.dtype != self.dtypes[1] or g.numel() != self.numels[i] or not g.is_contiguous() \
                        or g.device != self.device:
                    raise ValueError(f"check: gradient {i} must be a contiguous {self.dtypes[1]} tensor of "
                                     f"{self.numels[i]} elements on {self.device}, got {g.dtype}, {g.numel()} "
                                     f"elements, contiguous={g.is_contiguous()}, on {g.device}")
            self._grads_seen = addresses
        table = self._grad_table(grads)
        self.parity ^= 1
        now, following = self.parity * self.count, (1 - self.parity) * self.count
        _row_sq_sums_kernel[self.grids[0]](self.spans, self.programs[0], table, self.sums, self.flags, now, following,
                                           G_DTYPE=self.g_dtype, ROWS=self.rows, COLS=self.cols, META=_META, **EXACT)
        self._checked = addresses
        return self.flag_rows[self.parity]

    def discard_check(self) -> None:
        """Forget a ``check`` that no ``step`` follows."""
        self._checked = None

    # -- stages 1 and 2 -----------------------------------------------------------------------------
    def _validate(self, params: Sequence[Tensor], exp_avgs: Sequence[Tensor], exp_avg_sqs: Sequence[Tensor],
                  steps: Sequence[Tensor]) -> None:
        for i in range(self.count):
            n = self.numels[i]
            for what, x, dtype, numel in (("param", params[i], self.dtypes[0], n),
                                          ("exp_avg", exp_avgs[i], self.dtypes[2], n),
                                          ("exp_avg_sq", exp_avg_sqs[i], torch.float32, self.blocks_per_tensor[i]),
                                          ("step", steps[i], torch.float32, 1)):
                if x.dtype != dtype or x.numel() != numel or not x.is_contiguous() or x.device != self.device:
                    raise ValueError(f"step: {what} {i} must be a contiguous {dtype} tensor of {numel} elements on "
                                     f"{self.device}, got {x.dtype}, {x.numel()} elements, "
                                     f"contiguous={x.is_contiguous()}, on {x.device}")

    def step(self, params: Sequence[Tensor], grads: Sequence[Tensor], exp_avgs: Sequence[Tensor],
             exp_avg_sqs: Sequence[Tensor], steps: Sequence[Tensor], *, lr: float | Tensor, beta1: float,
             beta2: float, eps: float, weight_decays: Sequence[float]) -> None:
        """Stages 1 and 2, after ``check`` of the same gradients (run here if it was not). ``lr`` is a number or
        a one-element tensor (read by the kernels on the tables' device, no host sync; read on the host when it
        lives on the CPU); the others are numbers, ``weight_decays`` one per tensor."""
        lists = (params, exp_avgs, exp_avg_sqs, steps, weight_decays)
        if any(len(x) != self.count for x in lists):
            raise ValueError(f"step: lists of {[len(x) for x in lists]} entries for {self.count} tensors")
        grad_addresses = tuple(g.data_ptr() for g in grads)
        if self._checked != grad_addresses:
            self.check(grads)
        self._checked = None
        bound = tuple(x.data_ptr() for x in (*params, *exp_avgs, *exp_avg_sqs, *steps))
        if bound != self._bound:
            self._validate(params, exp_avgs, exp_avg_sqs, steps)
            self._bound = bound
        aligned = self.spans_aligned and all(a % 16 == 0 for a in (*grad_addresses, *bound[:2 * self.count]))
        lr_from_ptr = isinstance(lr, Tensor) and lr.device == self.device
        if isinstance(lr, Tensor) and not lr_from_ptr:
            if lr.device.type == "cpu":
                lr = float(lr)  # host memory: no device sync
            else:
                lr, lr_from_ptr = lr.to(self.device), True
        if lr_from_ptr and lr.numel() != 1:
            raise ValueError(f"step: lr must be a number or a one-element tensor, got shape {tuple(lr.shape)}")
        lr_ptr, lr_bits = (lr, 0) if lr_from_ptr else (self._no_lr, float64_bits(float(lr)))
        weight = round_fp32(1.0 - beta1)  # torch: the Python double 1 - beta1, as fp32
        now = self.parity * self.count
        _block_second_moment_kernel[self.grids[1]](
            self.spans, self.programs[1], self._state_table(exp_avg_sqs, steps), self.sums, self.rates, self.flags,
            now, lr_ptr, lr_bits, float64_bits(float(beta1)), float64_bits(float(beta2)), float(beta2),
            1.0 - float(beta2), float(eps), LR_FROM_PTR=lr_from_ptr, LANES=_BLOCK_LANES, UNIT_BLOCKS=_UNIT_TILE[0],
            UNIT_ROWS=_UNIT_TILE[1], META=_META, **EXACT)
        _scaled_moment_update_kernel[self.grids[2]](
            self.spans, self.programs[2], self._grad_table(grads), self._tensor_table(params, exp_avgs, steps),
            self._decays([float(w) for w in weight_decays]), self.rates, self.flags, now, lr_ptr, lr_bits, weight,
            P_DTYPE=self.p_dtype, G_DTYPE=self.g_dtype, M_DTYPE=self.m_dtype, SMALL_WEIGHT=abs(weight) < 0.5,
            LR_FROM_PTR=lr_from_ptr, ALIGNED=aligned, BLOCK=self.block, META=_META,
            num_warps=8 if self.block >= 4096 else 4,
            **EXACT)
