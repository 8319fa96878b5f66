"""MicroAdam (Modoranu et al., NeurIPS 2024, arXiv:2405.15593).

Adam without dense moments. Per tensor, flattened to 1-D, the state is

* a ring window of the last m sparse gradients: block-relative int16 indices and bf16 values,
  ``k = ceil(k_init * block)`` entries per Top-K block;
* the error feedback: whatever Top-K left out, 4-bit quantised (bf16 min/max per bucket);
* a step counter of its own, so a tensor that skips steps keeps the right row ages.

Per step (the numbers are the lines of the paper's Algorithm 1):

    (4)  a   = g + Q^-1(e)                      error feedback
    (5)  I   = block Top-K of |a|               k per block
    (9)  window row (t-1) % m  <-  (I, a[I])
    (6)  a[I] = 0
    (7,8) e  = Q(a)                             4-bit, new per-bucket min/max
         p  <- p * (1 - lr * wd)                decoupled weight decay
    (10,11) m_hat, v_hat from the window with beta powers by row age;  p <- p - lr * m_hat / (sqrt(v_hat) + eps)

State bytes per parameter: 0.5 (codes) + 4 * m * k_init (window) + 4 / quant_block_size (min/max).

Departures from the official code, all fixes: per-tensor step counters; fp32/bf16/fp16 parameters on
any device (the working accumulator is fp32); ``p.grad`` is never written; zero-range buckets and code
overflow handled; betas/eps per param group; any k_init in (0, 1]; state that survives save/load.

On CPU, tensors are processed in chunks of whole Top-K blocks and quantisation buckets, so the dense
fp32 temporaries stay cache-sized; small tensors share chunks (``_pack_chunks``). CUDA tensors use the
Triton kernels in ``ops.sparse_window_triton``: the plain (non-DTensor), contiguous fp32/bf16/fp16 tensors of a
group, per device and dtype, are stepped together by ``SparseWindowStep`` (three launches per step whatever
their number; their finiteness is checked on the device, so "skip" needs no host sync, and their step
counters live on the device; ``optim.microadam_launches`` keeps their tables, counters and hyper-parameters);
other CUDA tensors, and sizes the fused pass does not take, one by one.
"""

from __future__ import annotations

import math
from collections.abc import Iterator
from typing import Any, NamedTuple

import torch
from torch import Tensor

from ..core.base import (
    BACKENDS,
    STEP_BYTES,
    GradFlags,
    SlimOptimizer,
    check_betas,
    check_choice,
    check_lr,
    check_nonnegative,
    check_positive_int,
    check_range,
)
from ..core.distributed import local, padded_local, shard_state
from ..core.scratch import Scratch
from ..ops.quant import bucket_ranges, dequantize_4bit, num_buckets, quantize_4bit, quantize_scratch_size
from ..ops.sparse_window import BIAS_CORRECTIONS, apply_window_update_, window_weights
from ..ops.topk import MAX_BLOCK_SIZE, TopKBlocks, block_starts, block_topk_fast, k_for, topk_blocks
from ..plans.param_plan import ParamInfo
from .microadam_launches import group_batches, uses_triton

__all__ = ["MicroAdam", "chunk_spans", "state_bytes_formula"]

# Dense fp32 temporaries of the compression pass cover at most this many entries (rounded up to whole
# blocks and buckets): the accumulator and 1.5x that of quantiser scratch in the step's scratch.
# Measured on a 42M model: 2**16 costs ~2x more (per-op overhead dominates), 2**18 ~15% more, 2**20 to a
# whole tensor about the same.
CHUNK_ELEMENTS = 1 << 20
# The window update scatters into two fp32 moment buffers at random positions: it runs over its own,
# smaller spans so that those stay in L2 (measured ~15% cheaper for that part than 2**20).
WINDOW_CHUNK_ELEMENTS = 1 << 18

# State that describes one rank's own rows under FSDP2, and the dimension along which the ranks' parts
# are concatenated into one DTensor (so that DCP saves every rank's part).
PER_RANK_STATE = {"window_indices": 1, "window_values": 1, "ef_codes": 0, "ef_min": 0, "ef_max": 0}


def state_sizes(n: int, m: int, k_init: float, quant_block_size: int, topk_block_size: int) -> tuple[int, int, int]:
    """(window rows, entries per row, quantisation buckets) of a tensor of ``n`` entries."""
    return m, topk_blocks(n, topk_block_size, k_init).k_total, num_buckets(n, quant_block_size)


def state_bytes_formula(t: ParamInfo, *, param_bytes: int = 4, m: int, k_init: float, quant_block_size: int,
                        topk_block_size: int) -> int:
    """State bytes of one tensor (registry formula): a window of m rows of k int16 indices + k bf16 values,
    4-bit error feedback (two codes a byte), bf16 min and max per bucket, the step. ~0.5 + 4·m·k_init +
    4/quant_block_size B/param, whatever the parameter dtype."""
    rows, k_total, buckets = state_sizes(t.numel, m, k_init, quant_block_size, topk_block_size)
    return rows * k_total * (2 + 2) + (t.numel + 1) // 2 + 2 * buckets * 2 + STEP_BYTES


class MicroAdam(SlimOptimizer):
    """MicroAdam: Top-K sparse gradient window + 4-bit error feedback.

    Args:
        params: tensors, ``(name, tensor)`` pairs or param-group dicts.
        lr, betas, eps, weight_decay: as in AdamW (weight decay is decoupled).
        m: number of sparse gradients in the window.
        k_init: fraction of each Top-K block kept per step, in (0, 1].
        quant_block_size: bucket size of the 4-bit error-feedback quantiser.
        topk_block_size: Top-K block size (<= 32768 so indices fit int16).
        backend: ``"auto"`` (Triton for CUDA tensors, torch otherwise), ``"torch"`` or ``"triton"``.
        bias_correction: ``"paper"`` (Algorithm 1: (1 - beta) / (1 - beta**t)) or ``"window"``: divide by the
            weight the m-row window holds, (1 - beta) / (1 - beta**min(t, m)), so a coordinate's step does not
            grow with t (see ``ops.sparse_window``; beyond the paper). Measured on CPU it was no better
            than ``"paper"`` at the end of either committed comparison (pre-training 1.434x vs 1.412x AdamW,
            within the seeds' spread; fine-tuning 1.048x vs 1.044x), better only in the middle of the
            fine-tuning, so ``"paper"`` is the default.
        nonfinite: ``"skip"`` (default: on the device, no host sync) or ``"raise"`` (a host sync per step) on a
            tensor whose gradient has NaN/inf (see ``SlimOptimizer``).
    """

    def __init__(self, params: Any, lr: float = 1e-3, betas: tuple[float, float] = (0.9, 0.999),
                 eps: float = 1e-8, weight_decay: float = 0.0, m: int = 10, k_init: float = 0.01,
                 quant_block_size: int = 64, *, topk_block_size: int = 4096, backend: str = "auto",
                 bias_correction: str = "paper", nonfinite: str = "skip") -> None:
        # backend is a group setting, not an attribute, so that it survives pickling and deepcopy
        # (torch's Optimizer.__getstate__ keeps only defaults, state and param groups)
        defaults = dict(lr=lr, betas=betas, eps=eps, weight_decay=weight_decay, m=m, k_init=k_init,
                        quant_block_size=quant_block_size, topk_block_size=topk_block_size, backend=backend,
                        bias_correction=bias_correction, nonfinite=nonfinite)
        self._validate(defaults)
        super().__init__(params, defaults)

    def add_param_group(self, param_group: dict[str, Any]) -> None:
        super().add_param_group(param_group)
        self._validate(self.param_groups[-1])

    @staticmethod
    def _validate(h: dict[str, Any]) -> None:
        check_lr(h["lr"])
        check_choice("backend", h.get("backend", "auto"), BACKENDS)
        check_choice("bias_correction", h.get("bias_correction", "paper"), BIAS_CORRECTIONS)
        check_betas(h["betas"])
        check_nonnegative("eps", h["eps"])
        check_nonnegative("weight_decay", h["weight_decay"])
        check_positive_int("m", h["m"])
        check_range("k_init", h["k_init"], 0.0, 1.0, low_open=True)
        check_positive_int("quant_block_size", h["quant_block_size"])
        check_positive_int("topk_block_size", h["topk_block_size"])
        if h["topk_block_size"] > MAX_BLOCK_SIZE:
            raise ValueError(f"Invalid topk_block_size: {h['topk_block_size']} (must be <= {MAX_BLOCK_SIZE})")

    # -- state ----------------------------------------------------------------------------------------
    @staticmethod
    def _init_state(state: dict[str, Any], p: Tensor, group: dict[str, Any]) -> None:
        n = p.numel()
        m, k_total, buckets = state_sizes(n, group["m"], group["k_init"], group["quant_block_size"],
                                          group["topk_block_size"])
        state["window_indices"] = torch.zeros(m, k_total, dtype=torch.int16, device=p.device)
        state["window_values"] = torch.zeros(m, k_total, dtype=torch.bfloat16, device=p.device)
        state["ef_codes"] = torch.zeros((n + 1) // 2, dtype=torch.uint8, device=p.device)
        state["ef_min"] = torch.zeros(buckets, dtype=torch.bfloat16, device=p.device)
        state["ef_max"] = torch.zeros(buckets, dtype=torch.bfloat16, device=p.device)

    @torch.compiler.disable  # launches Triton kernels and reads tables on the host, as update_group
    def nonfinite_flags(self, group: dict[str, Any]) -> list[GradFlags]:
        """The non-finite check (``SlimOptimizer``): the tensors of the group launches are checked by their first
        launch, on the device, and those launches leave a bad tensor and its state alone by themselves (gated:
        no host sync under "skip"); the others by the default multi-tensor norm."""
        batches = group_batches(self, group)
        alone = [i for i in self.checked_indices(group)
                 if batches is None or not batches.takes(group["params"][i], group["params"][i].grad)]
        out = self.default_flags(group, alone) if alone else []
        for batch in batches.batches if batches is not None else ():
            ok = batch.check(self.state)
            if ok is not None:
                out.append(GradFlags(batch.indices, batch.skipped(ok), True))
        return out

    # -- the step -------------------------------------------------------------------------------------
    # Not traced by torch.compile: the step is data-dependent Top-K over chunk loops with integer ages,
    # and its fast paths are kernels of its own (vectorised torch on CPU, Triton on CUDA). A compiled
    # ``optimizer.step`` breaks its graph here once per param group and runs this eagerly.
    @torch.compiler.disable
    def update_group(self, group: dict[str, Any]) -> None:
        # plain tensors on the torch path are stepped together at the end, per device, so that small ones
        # share chunks (see _pack_chunks); shards are stepped inside their padded_local block; the tensors of
        # the group launches get their state here and are stepped together after the loop
        batches = group_batches(self, group)
        deferred: dict[torch.device, list[_Job]] = {}
        scratches: dict[torch.device, Scratch] = {}  # buffers and constants, shared by a device's tensors
        for _, param, full_grad in self.grads(group):
            state = self.state[param]
            if batches is not None and batches.takes(param, full_grad):
                if not state:
                    self._init_state(state, param, group)
                    state["step"] = batches.new_counter(param)  # on the device: a fill, no copy, no read
                continue
            if batches is not None:
                batches.stepped_alone(param)
            # Under FSDP2 every rank compresses its own rows, padded to the largest shard so that all
            # ranks' states have one shape and form one DTensor (docs/distributed.md: what changes).
            with padded_local(param, full_grad) as (p, grad):
                if not state:
                    self._init_state(state, p, group)
                    for key, dim in PER_RANK_STATE.items():
                        state[key] = shard_state(state[key], param, dim)
                step = int(self.advance_step(state))
                if p.numel() == 0 or p.is_meta:  # meta: state shapes only (load_state_dict's probe)
                    continue
                job = _Job(p, grad, {key: local(value) for key, value in state.items()}, step)
                if uses_triton(p, group):
                    from ..ops.sparse_window_triton import sparse_window_step_triton

                    s = job.state
                    sparse_window_step_triton(
                        p, grad, s["window_indices"], s["window_values"], s["ef_codes"], s["ef_min"], s["ef_max"],
                        step=step, lr=group["lr"], betas=group["betas"], eps=group["eps"],
                        weight_decay=group["weight_decay"], m=group["m"], k_init=group["k_init"],
                        topk_block_size=group["topk_block_size"], quant_block_size=group["quant_block_size"],
                        bias_correction=group.get("bias_correction", "paper"))
                elif p is param:
                    deferred.setdefault(p.device, []).append(job)
                else:
                    _microadam_step_torch([job], group, scratches.setdefault(p.device, Scratch(p.device)))
        if batches is not None:
            for batch in batches.batches:
                batch.step(self.state, group)
        for device, jobs in deferred.items():
            _microadam_step_torch(jobs, group, scratches.setdefault(device, Scratch(device)))


class _Job(NamedTuple):
    """One tensor's step: its parameter, gradient, (rank-local) state and own step count."""

    p: Tensor
    grad: Tensor
    state: dict[str, Tensor]
    step: int


class ChunkSpan(NamedTuple):
    """A piece of a flat tensor made of whole Top-K blocks and whole quantisation buckets."""

    start: int
    end: int
    columns: tuple[int, int]  # its window columns
    buckets: tuple[int, int]  # its min/max entries
    code_bytes: tuple[int, int]  # its packed EF bytes


def _chunk_length(block_size: int, bucket_size: int, elements: int | None = None) -> int:
    unit = math.lcm(block_size, bucket_size, 2)  # whole blocks, whole buckets, whole nibble pairs
    return max(unit, (CHUNK_ELEMENTS if elements is None else elements) // unit * unit)


def chunk_spans(blocks: TopKBlocks, bucket_size: int, elements: int | None = None) -> Iterator[ChunkSpan]:
    """Cut a tensor into spans of about ``elements`` (default CHUNK_ELEMENTS); all offsets are Python
    ints (no int32 limit)."""
    n, block_size, k_block = blocks.n, blocks.block_size, blocks.k_block
    chunk = _chunk_length(block_size, bucket_size, elements)
    for start in range(0, n, chunk):
        end = min(start + chunk, n)
        col1 = blocks.k_total if end == n else end // block_size * k_block
        yield ChunkSpan(start, end, (start // block_size * k_block, col1),
                        (start // bucket_size, num_buckets(end, bucket_size)), (start // 2, (end + 1) // 2))


def _block_starts(scratch: Scratch, n: int, block_size: int, k_init: float) -> Tensor:
    """``block_starts`` of an ``n``-entry span, made once per step (callers must not modify it)."""
    return scratch.constant(("block_starts", n, block_size, k_init),
                            lambda: block_starts(topk_blocks(n, block_size, k_init), scratch.device))


def _window_weights(scratch: Scratch, step: int, m: int, betas: tuple[float, float], bias_correction: str
                    ) -> tuple[Tensor, Tensor]:
    """``window_weights``, made once per step for all the tensors at that step."""
    return scratch.constant(("window_weights", step, m, betas, bias_correction),
                            lambda: window_weights(step, m, betas, scratch.device, bias_correction))


def _spans_with_block_starts(blocks: TopKBlocks, k_init: float, bucket_size: int, elements: int | None,
                             scratch: Scratch) -> Iterator[tuple[ChunkSpan, Tensor]]:
    """``chunk_spans`` with, for each span, the offset of the block each of its window columns belongs to."""
    for span in chunk_spans(blocks, bucket_size, elements):
        yield span, _block_starts(scratch, span.end - span.start, blocks.block_size, k_init)


class _TensorStep(NamedTuple):
    """What the torch path needs of one tensor during a step."""

    p: Tensor
    p_flat: Tensor  # p as 1-D: p's own storage, or a copy written back at the end
    g_flat: Tensor
    state: dict[str, Tensor]
    blocks: TopKBlocks
    row: int  # the ring row written at this step, (step - 1) % m
    weights: tuple[Tensor, Tensor]  # window_weights at this step


class _Segment(NamedTuple):
    """A span of one tensor, placed at ``offset`` in a chunk's accumulator."""

    tensor: _TensorStep
    span: ChunkSpan
    offset: int


def _pack_chunks(tensors: list[_TensorStep], block_size: int, bucket_size: int
                 ) -> Iterator[tuple[int, list[_Segment]]]:
    """The chunks of the compression pass, each with the Top-K block size to cut it by: each tensor's
    spans (chunk_spans), with consecutive spans of whole blocks and buckets (small tensors, tensor ends)
    packed together up to CHUNK_ELEMENTS.

    Block Top-K and the bucket ranges treat every block and bucket on its own, so a chunk of several
    aligned segments gives each segment what it would get alone; a segment that ends in a partial block
    or bucket is a chunk by itself. Small tensors (a 512 x 512 matrix is a quarter of a chunk) otherwise
    pay the per-op cost of a whole chunk each, and give torch too few Top-K rows to use a second thread.
    A span shorter than one block is a single partial block (a whole small tensor such as a norm weight
    or bias, or a tensor's last span): consecutive ones of one length L (whole buckets) share a chunk
    cut into Top-K blocks of L, which ranks each as its tensor's own blocks do (k = ceil(k_init * L)).
    """
    limit = _chunk_length(block_size, bucket_size)
    unit = math.lcm(block_size, bucket_size, 2)
    pending: list[_Segment] = []
    pending_block, filled = block_size, 0
    for tensor in tensors:
        for span in chunk_spans(tensor.blocks, bucket_size):
            length = span.end - span.start
            if length < block_size and length % math.lcm(bucket_size, 2) == 0:
                segment_block = length  # one partial block
            elif length % unit == 0:
                segment_block = block_size
            else:  # a tensor end with a partial block or bucket: alone
                if pending:
                    yield pending_block, pending
                pending, filled = [], 0
                yield block_size, [_Segment(tensor, span, 0)]
                continue
            if pending and (segment_block != pending_block or filled + length > limit):
                yield pending_block, pending
                pending, filled = [], 0
            pending_block = segment_block
            pending.append(_Segment(tensor, span, filled))
            filled += length
    if pending:
        yield pending_block, pending


def _microadam_step_torch(jobs: list[_Job], group: dict[str, Any], scratch: Scratch) -> None:
    """One MicroAdam step of ``jobs`` (tensors on one device) with plain torch ops (the reference path):
    the compression pass chunk by chunk, then each tensor's update from its window."""
    m = group["m"]
    block_size, bucket_size, k_init = group["topk_block_size"], group["quant_block_size"], group["k_init"]
    lr, wd = float(group["lr"]), float(group["weight_decay"])  # a tensor lr: read here (.item())
    betas, eps = tuple(float(b) for b in group["betas"]), float(group["eps"])
    tensors = []
    for job in jobs:
        p = job.p
        p_flat = p.view(-1) if p.is_contiguous() else p.detach().reshape(-1).clone()
        tensors.append(_TensorStep(p, p_flat, job.grad.reshape(-1), job.state,
                                   topk_blocks(p.numel(), block_size, k_init), (job.step - 1) % m,
                                   _window_weights(scratch, job.step, m, betas,
                                                   group.get("bias_correction", "paper"))))
    for chunk_block, segments in _pack_chunks(tensors, block_size, bucket_size):
        _compress_chunk(segments, chunk_block, bucket_size, k_init, scratch)
        # each tensor's update right after its window is complete, while its state is still in cache
        for tensor, span, _ in segments:
            if span.end == tensor.blocks.n:
                _update_from_window(tensor, bucket_size, k_init, (eps, lr, wd), scratch)
                if tensor.p_flat.data_ptr() != tensor.p.data_ptr():
                    tensor.p.copy_(tensor.p_flat.view_as(tensor.p))


def _compress_chunk(segments: list[_Segment], block_size: int, bucket_size: int, k_init: float,
                    scratch: Scratch) -> None:
    """Lines 4-9 of the algorithm for the segments of one chunk, cut into Top-K blocks of ``block_size``:
    new window rows and error feedback."""
    last = segments[-1]
    n = last.offset + last.span.end - last.span.start
    accumulator = scratch.empty("accumulator", n + 1)  # + 1: an odd tensor's codes fill a whole byte
    # (4) error feedback: a = g + Q^-1(e)
    for tensor, span, offset in segments:
        (b0, b1), (c0, c1), state = span.buckets, span.code_bytes, tensor.state
        length = span.end - span.start
        dequantize_4bit(state["ef_codes"][c0:c1], state["ef_min"][b0:b1], state["ef_max"][b0:b1], length,
                        bucket_size, out=accumulator[offset:])
        accumulator[offset:offset + length].add_(tensor.g_flat[span.start:span.end])
    a = accumulator[:n]
    # (5) block Top-K and (9) the newest window rows
    rel = block_topk_fast(a, block_size, k_init)
    pos = rel + _block_starts(scratch, n, block_size, k_init)
    rel16, selected = rel.to(torch.int16), a.index_select(0, pos)
    k_block = k_for(block_size, k_init)
    for tensor, span, offset in segments:
        (col0, col1), first = span.columns, offset // block_size * k_block
        tensor.state["window_indices"][tensor.row, col0:col1] = rel16[first:first + col1 - col0]
        tensor.state["window_values"][tensor.row, col0:col1] = selected[first:first + col1 - col0]
    # (6) drop what was selected, (7, 8) quantise the rest into the new error feedback
    a.index_fill_(0, pos, 0.0)
    lo, hi = bucket_ranges(a, bucket_size)
    work = scratch.empty("work", quantize_scratch_size(n))
    packed = len(segments) > 1
    if packed:  # codes through a buffer, then apart
        out = scratch.empty("codes", (n + 1) // 2, torch.uint8)
    else:  # straight into the state
        out = segments[0].tensor.state["ef_codes"][slice(*segments[0].span.code_bytes)]
    codes = quantize_4bit(a, lo, hi, bucket_size, out=out, scratch=work)
    for tensor, span, offset in segments:
        (b0, b1), (c0, c1), state = span.buckets, span.code_bytes, tensor.state
        first_bucket, first_byte = offset // bucket_size, offset // 2
        state["ef_min"][b0:b1] = lo[first_bucket:first_bucket + b1 - b0]
        state["ef_max"][b0:b1] = hi[first_bucket:first_bucket + b1 - b0]
        if packed:
            state["ef_codes"][c0:c1] = codes[first_byte:first_byte + c1 - c0]


def _update_from_window(tensor: _TensorStep, bucket_size: int, k_init: float, hyper: tuple[float, float, float],
                        scratch: Scratch) -> None:
    """Lines 10-11 and the update: moments from the window (the row just written included), decoupled
    weight decay, p <- p - lr * m_hat / (sqrt(v_hat) + eps), span by span."""
    eps, lr, wd = hyper
    blocks, state = tensor.blocks, tensor.state
    window_idx, window_val = state["window_indices"], state["window_values"]
    span_length = _chunk_length(blocks.block_size, bucket_size, WINDOW_CHUNK_ELEMENTS)
    moments = scratch.zeros("moments", 2, min(blocks.n, span_length))
    for span, span_starts in _spans_with_block_starts(blocks, k_init, bucket_size, WINDOW_CHUNK_ELEMENTS, scratch):
        (col0, col1) = span.columns
        positions = torch.add(window_idx[:, col0:col1], span_starts)  # int16 + int64: one int64 pass
        apply_window_update_(tensor.p_flat[span.start:span.end], positions, window_val[:, col0:col1],
                             tensor.weights, eps, lr, wd, moments)
