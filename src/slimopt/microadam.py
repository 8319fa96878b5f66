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
fp32 temporaries stay cache-sized. CUDA tensors use the Triton kernels in ``ops.microadam_triton``.
"""

from __future__ import annotations

import math
from collections.abc import Iterator
from typing import Any, NamedTuple

import torch
from torch import Tensor

from .distributed import local, padded_local, shard_state
from .ops.microadam_window import apply_window_update_, window_weights
from .ops.quant import bucket_ranges, dequantize_4bit, num_buckets, quantize_4bit, quantize_scratch_size
from .ops.topk import MAX_BLOCK_SIZE, BlockLayout, block_layout, block_starts, block_topk_fast
from .optimizer import (
    SlimOptimizer,
    check_betas,
    check_choice,
    check_lr,
    check_nonnegative,
    check_positive_int,
    check_range,
)

__all__ = ["MicroAdam", "chunk_spans"]

# Dense fp32 temporaries of the compression pass cover at most this many entries (rounded up to whole
# blocks and buckets): the accumulator and 1.5x that of quantiser scratch in the step's workspace.
# Measured on a 42M model: 2**16 costs ~2x more (per-op overhead dominates), 2**18 ~15% more, 2**20 to a
# whole tensor about the same.
CHUNK_ELEMENTS = 1 << 20
# The window update scatters into two fp32 moment buffers at random positions: it runs over its own,
# smaller spans so that those stay in L2 (measured ~15% cheaper for that part than 2**20).
WINDOW_CHUNK_ELEMENTS = 1 << 18

# State that describes one rank's own rows under FSDP2, and the dimension along which the ranks' parts
# are concatenated into one DTensor (so that DCP saves every rank's part).
PER_RANK_STATE = {"window_indices": 1, "window_values": 1, "ef_codes": 0, "ef_min": 0, "ef_max": 0}


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
        nonfinite: ``"raise"`` or ``"skip"`` a tensor whose gradient has NaN/inf (see SlimOptimizer).
    """

    def __init__(self, params: Any, lr: float = 1e-3, betas: tuple[float, float] = (0.9, 0.999),
                 eps: float = 1e-8, weight_decay: float = 0.0, m: int = 10, k_init: float = 0.01,
                 quant_block_size: int = 64, *, topk_block_size: int = 4096, backend: str = "auto",
                 nonfinite: str = "raise") -> None:
        # backend is a group setting, not an attribute, so that it survives pickling and deepcopy
        # (torch's Optimizer.__getstate__ keeps only defaults, state and param groups)
        defaults = dict(lr=lr, betas=betas, eps=eps, weight_decay=weight_decay, m=m, k_init=k_init,
                        quant_block_size=quant_block_size, topk_block_size=topk_block_size, backend=backend,
                        nonfinite=nonfinite)
        self._validate(defaults)
        super().__init__(params, defaults)

    def add_param_group(self, param_group: dict[str, Any]) -> None:
        super().add_param_group(param_group)
        self._validate(self.param_groups[-1])

    @staticmethod
    def _validate(h: dict[str, Any]) -> None:
        check_lr(h["lr"])
        check_choice("backend", h.get("backend", "auto"), ("auto", "torch", "triton"))
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
        k_total = block_layout(n, group["topk_block_size"], group["k_init"]).k_total
        m, buckets = group["m"], num_buckets(n, group["quant_block_size"])
        state["window_indices"] = torch.zeros(m, k_total, dtype=torch.int16, device=p.device)
        state["window_values"] = torch.zeros(m, k_total, dtype=torch.bfloat16, device=p.device)
        state["ef_codes"] = torch.zeros((n + 1) // 2, dtype=torch.uint8, device=p.device)
        state["ef_min"] = torch.zeros(buckets, dtype=torch.bfloat16, device=p.device)
        state["ef_max"] = torch.zeros(buckets, dtype=torch.bfloat16, device=p.device)

    @staticmethod
    def _use_triton(p: Tensor, group: dict[str, Any]) -> bool:
        backend = group.get("backend", "auto")
        if backend == "auto":
            if not p.is_cuda:
                return False
            from .ops.triton_support import triton_available

            return triton_available()
        return backend == "triton"

    # -- the step -------------------------------------------------------------------------------------
    # Not traced by torch.compile: the step is data-dependent Top-K over chunk loops with integer ages,
    # and its fast paths are kernels of its own (vectorised torch on CPU, Triton on CUDA). A compiled
    # ``optimizer.step`` breaks its graph here once per param group and runs this eagerly.
    @torch.compiler.disable
    def update_group(self, group: dict[str, Any]) -> None:
        workspace = None  # CPU buffers shared by this group's tensors during this step
        for _, param, full_grad in self.grads(group):
            state = self.state[param]
            # Under FSDP2 every rank compresses its own rows, padded to the largest shard so that all
            # ranks' states have one shape and form one DTensor (docs/distributed.md: what changes).
            with padded_local(param, full_grad) as (p, grad):
                if not state:
                    self._init_state(state, p, group)
                    for key, dim in PER_RANK_STATE.items():
                        state[key] = shard_state(state[key], param, dim)
                step = int(self.advance_step(state))
                if p.numel() == 0:
                    continue
                work = {key: local(value) for key, value in state.items()}
                if self._use_triton(p, group):
                    from .ops.microadam_triton import microadam_step_triton

                    microadam_step_triton(p, grad, work, group, step)
                else:
                    if workspace is None or workspace.device != p.device:
                        workspace = Workspace(p.device)
                    _microadam_step_torch(p, grad, work, group, step, workspace)


def _as_float(x: Any) -> float:
    return float(x.item()) if isinstance(x, Tensor) else float(x)


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


def chunk_spans(layout: BlockLayout, bucket_size: int, elements: int | None = None) -> Iterator[ChunkSpan]:
    """Cut a tensor into spans of about ``elements`` (default CHUNK_ELEMENTS); all offsets are Python
    ints (no int32 limit)."""
    n, block_size, k_block = layout.n, layout.block_size, layout.k_block
    chunk = _chunk_length(block_size, bucket_size, elements)
    for start in range(0, n, chunk):
        end = min(start + chunk, n)
        col1 = layout.k_total if end == n else end // block_size * k_block
        yield ChunkSpan(start, end, (start // block_size * k_block, col1),
                        (start // bucket_size, num_buckets(end, bucket_size)), (start // 2, (end + 1) // 2))


class Workspace:
    """What the tensors of one group share during one step on CPU: fp32 buffers reused across chunks and
    tensors (a fresh MiB-sized tensor costs page faults on every allocation, which on CPU is a noticeable
    part of a cache-sized pass), and the small constant tensors that many chunks and tensors ask for
    (built once: a few tiny torch ops each, times hundreds of chunks, add up to ~3% of a step)."""

    def __init__(self, device: torch.device) -> None:
        self.device, self.buffers = device, {}
        self.constants: dict[tuple[Any, ...], Any] = {}

    def empty(self, name: str, numel: int) -> Tensor:
        buffer = self.buffers.get(name)
        if buffer is None or buffer.numel() < numel:
            buffer = self.buffers[name] = torch.empty(numel, dtype=torch.float32, device=self.device)
        return buffer[:numel]

    def zeros(self, name: str, count: int, numel: int) -> Tensor:
        """A zeroed (count, numel) buffer; callers must leave it zeroed."""
        buffer = self.buffers.get(name)
        if buffer is None or buffer.shape[1] < numel:
            buffer = self.buffers[name] = torch.zeros(count, numel, dtype=torch.float32, device=self.device)
        return buffer[:, :numel]

    def block_starts(self, n: int, block_size: int, k_init: float) -> Tensor:
        """``block_starts`` of an ``n``-entry span (callers must not modify it)."""
        key = ("block_starts", n, block_size, k_init)
        if key not in self.constants:
            self.constants[key] = block_starts(block_layout(n, block_size, k_init), self.device)
        return self.constants[key]

    def window_weights(self, step: int, m: int, betas: tuple[float, float]) -> tuple[Tensor, Tensor]:
        key = ("window_weights", step, m, betas)
        if key not in self.constants:
            self.constants[key] = window_weights(step, m, betas, self.device)
        return self.constants[key]


def _spans_with_block_starts(layout: BlockLayout, k_init: float, bucket_size: int, elements: int | None,
                             workspace: Workspace) -> Iterator[tuple[ChunkSpan, Tensor]]:
    """``chunk_spans`` with, for each span, the offset of the block each of its window columns belongs to."""
    for span in chunk_spans(layout, bucket_size, elements):
        yield span, workspace.block_starts(span.end - span.start, layout.block_size, k_init)


def _microadam_step_torch(p: Tensor, grad: Tensor, state: dict[str, Any], group: dict[str, Any],
                          step: int, workspace: Workspace) -> None:
    """One MicroAdam step of one tensor with plain torch ops (the reference path), chunk by chunk."""
    n, m = p.numel(), group["m"]
    block_size, bucket_size, k_init = group["topk_block_size"], group["quant_block_size"], group["k_init"]
    lr, wd = _as_float(group["lr"]), _as_float(group["weight_decay"])
    betas, eps = tuple(_as_float(b) for b in group["betas"]), _as_float(group["eps"])
    layout = block_layout(n, block_size, k_init)
    window_idx, window_val = state["window_indices"], state["window_values"]
    codes, ef_min, ef_max = state["ef_codes"], state["ef_min"], state["ef_max"]
    row = (step - 1) % m
    weights = workspace.window_weights(step, m, betas)

    g_flat = grad.reshape(-1)
    p_flat = p.view(-1) if p.is_contiguous() else p.detach().reshape(-1).clone()
    chunk = min(n, _chunk_length(block_size, bucket_size))
    accumulator = workspace.empty("accumulator", chunk + 1)
    work = workspace.empty("work", quantize_scratch_size(chunk))
    for span, span_starts in _spans_with_block_starts(layout, k_init, bucket_size, None, workspace):
        start, end, (col0, col1) = span.start, span.end, span.columns
        (b0, b1), (c0, c1) = span.buckets, span.code_bytes
        # (4) error feedback: a = g + Q^-1(e)
        a = dequantize_4bit(codes[c0:c1], ef_min[b0:b1], ef_max[b0:b1], end - start, bucket_size, out=accumulator)
        a.add_(g_flat[start:end])
        # (5) block Top-K and (9) the newest window row
        rel = block_topk_fast(a, block_size, k_init)
        pos = rel + span_starts
        window_idx[row, col0:col1] = rel.to(torch.int16)
        window_val[row, col0:col1] = a.index_select(0, pos)
        # (6) drop what was selected, (7, 8) quantise the rest into the new error feedback
        a.index_fill_(0, pos, 0.0)
        lo, hi = bucket_ranges(a, bucket_size)
        ef_min[b0:b1], ef_max[b0:b1] = lo, hi
        quantize_4bit(a, lo, hi, bucket_size, out=codes[c0:c1], scratch=work)
    # (10, 11) moments from the window (the row just written included), decoupled weight decay, update
    moments = workspace.zeros("moments", 2, min(n, _chunk_length(block_size, bucket_size, WINDOW_CHUNK_ELEMENTS)))
    for span, span_starts in _spans_with_block_starts(layout, k_init, bucket_size, WINDOW_CHUNK_ELEMENTS,
                                                   workspace):
        (col0, col1) = span.columns
        positions = torch.add(window_idx[:, col0:col1], span_starts)  # int16 + int64: one int64 pass
        apply_window_update_(p_flat[span.start:span.end], positions, window_val[:, col0:col1], weights, eps, lr, wd,
                             moments)
    if p_flat.data_ptr() != p.data_ptr():
        p.copy_(p_flat.view_as(p))

