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
Triton kernels in ``ops.microadam_triton``: the plain (non-DTensor), contiguous fp32/bf16/fp16 tensors of a
group, per device and dtype, are stepped together by ``MultiTensorStep`` (three launches per step whatever
their number; their finiteness is checked on the device, so "skip" needs no host sync, and their step
counters live on the device); other CUDA tensors, and layouts the fused pass does not take, one by one.
"""

from __future__ import annotations

import math
from collections.abc import Iterator
from typing import Any, NamedTuple

import numpy as np
import torch
from torch import Tensor

from ..core.base import (
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
from ..core.distributed import is_dtensor, local, padded_local, shard_state
from ..ops.microadam_window import BIAS_CORRECTIONS, apply_window_update_, window_weights
from ..ops.quant import bucket_ranges, dequantize_4bit, num_buckets, quantize_4bit, quantize_scratch_size
from ..ops.tables import upload
from ..ops.topk import MAX_BLOCK_SIZE, BlockLayout, block_layout, block_starts, block_topk_fast, k_for
from ..plans.param_plan import ParamInfo

__all__ = ["MicroAdam", "chunk_spans", "state_bytes_formula"]

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


def state_sizes(n: int, m: int, k_init: float, quant_block_size: int, topk_block_size: int) -> tuple[int, int, int]:
    """(window rows, entries per row, quantisation buckets) of a tensor of ``n`` entries."""
    return m, block_layout(n, topk_block_size, k_init).k_total, num_buckets(n, quant_block_size)


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
            grow with t (see ``ops.microadam_window``; beyond the paper). Measured on CPU it was no better
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
        check_choice("backend", h.get("backend", "auto"), ("auto", "torch", "triton"))
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

    @staticmethod
    def _use_triton(p: Tensor, group: dict[str, Any]) -> bool:
        backend = group.get("backend", "auto")
        if backend == "auto":
            if not p.is_cuda:
                return False
            from ..ops.triton_support import triton_available

            return triton_available()
        return backend == "triton"

    # -- the group launches (Triton) ------------------------------------------------------------------
    def _group_batches(self, group: dict[str, Any]) -> _GroupBatches | None:
        """The tensors of ``group`` that ``MultiTensorStep`` steps together, per (device, dtype): built once,
        rebuilt when the group's parameters or layout settings change. None when there are none."""
        backend = group.get("backend", "auto")
        if backend == "torch" or (backend == "auto" and not any(p.is_cuda for p in group["params"])):
            return None
        key = (group["m"], group["k_init"], group["topk_block_size"], group["quant_block_size"],
               group.get("backend", "auto"), group.get("bias_correction", "paper"),
               tuple((id(p), _address(p), p.dtype, p.is_contiguous()) for p in group["params"]))
        cache = self.__dict__.setdefault("_triton_groups", {})  # not in the state dict, not pickled
        entry = cache.get(id(group))
        if entry is not None and entry.group is group and entry.key == key:
            return entry.batches
        batches = _GroupBatches.build(self, group)
        if any(p.is_meta for p in group["params"]):  # load_state_dict's shape probe: nothing to keep
            return batches
        if entry is not None and entry.batches is not None and batches is not None:
            batches.carry_counters(entry.batches)
        cache[id(group)] = _GroupEntry(group, key, batches)
        return batches

    def _batchable(self, p: Tensor, group: dict[str, Any]) -> bool:
        return (p.dtype in (torch.float32, torch.bfloat16, torch.float16) and not p.is_meta and p.numel() > 0
                and p.is_contiguous() and not is_dtensor(p) and self._use_triton(p, group))

    @torch.compiler.disable  # launches Triton kernels and reads tables on the host, as update_group
    def nonfinite_flags(self, group: dict[str, Any]) -> list[GradFlags]:
        """The non-finite check (``SlimOptimizer``): the tensors of the group launches are checked by their first
        launch, on the device, and those launches leave a bad tensor and its state alone by themselves (gated:
        no host sync under "skip"); the others by the default multi-tensor norm."""
        batches = self._group_batches(group)
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
        batches = self._group_batches(group)
        deferred: dict[torch.device, list[_Job]] = {}
        workspaces: dict[torch.device, Workspace] = {}  # buffers and constants, shared by a device's tensors
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
                if self._use_triton(p, group):
                    from ..ops.microadam_triton import microadam_step_triton

                    s = job.state
                    microadam_step_triton(
                        p, grad, s["window_indices"], s["window_values"], s["ef_codes"], s["ef_min"], s["ef_max"],
                        step=step, lr=group["lr"], betas=group["betas"], eps=group["eps"],
                        weight_decay=group["weight_decay"], m=group["m"], k_init=group["k_init"],
                        topk_block_size=group["topk_block_size"], quant_block_size=group["quant_block_size"],
                        bias_correction=group.get("bias_correction", "paper"))
                elif p is param:
                    deferred.setdefault(p.device, []).append(job)
                else:
                    workspace = workspaces.setdefault(p.device, Workspace(p.device))
                    _microadam_step_torch([job], group, workspace)
        if batches is not None:
            for batch in batches.batches:
                batch.step(self.state, group)
        for device, jobs in deferred.items():
            _microadam_step_torch(jobs, group, workspaces.setdefault(device, Workspace(device)))


_STATE_KEYS = ("window_indices", "window_values", "ef_codes", "ef_min", "ef_max", "step")
_GRAD_DTYPES = (torch.float32, torch.bfloat16, torch.float16)


class _TritonBatch:
    """The tensors of one group, device and dtype that one ``MultiTensorStep`` steps. Remembers which state
    tensors its tables point at and binds them again when they change (first step, load_state_dict). Their
    step counters live on the device (the kernels advance them): new ones are made there (``new_counter``),
    loaded ones are moved there when bound (``sync_state``)."""

    def __init__(self, params: list[Tensor], indices: list[int], group: dict[str, Any]) -> None:
        from ..ops.microadam_triton import MultiTensorStep

        self.params, self.indices = params, indices
        self.runner = MultiTensorStep([p.numel() for p in params], params[0].device, params[0].dtype,
                                      m=group["m"], k_init=group["k_init"],
                                      topk_block_size=group["topk_block_size"],
                                      quant_block_size=group["quant_block_size"],
                                      bias_correction=group.get("bias_correction", "paper"))
        self.bound_dicts: list[Any] = [None] * len(params)
        self.bound_tensors: list[tuple[Tensor, ...] | None] = [None] * len(params)
        self.known_steps: dict[int, Tensor] = {}  # step counters whose values are <= runner.bound
        self.present: list[bool] = [False] * len(params)
        self._floats: dict[int, tuple[Tensor, int, float]] = {}
        self._present_masks: dict[tuple[bool, ...], Tensor] = {}

    def _stale(self, optimizer_state: Any) -> bool:
        for i, p in enumerate(self.params):
            state = optimizer_state.get(p) or None
            if state is not self.bound_dicts[i]:
                return True
            bound = self.bound_tensors[i]
            if state is not None and (bound is None or any(state.get(k) is not t for k, t in zip(_STATE_KEYS, bound))):
                return True
        return False

    def new_counter(self) -> Tensor:
        """A step counter of 0 for a tensor that gets its state now: made on the device (a fill: no host copy)
        and known to lie below the runner's bound (no read-back when it is bound)."""
        counter = torch.zeros((), dtype=torch.float32, device=self.runner.device)
        self.known_steps[id(counter)] = counter
        return counter

    def sync_state(self, optimizer_state: Any) -> None:
        """Bind the runner's tables to the current state tensors if they are not the ones bound.

        Step counters must be 0-d fp32 tensors on the device (the kernels advance them). Those this batch made
        (``new_counter``) or bound before are known to lie below the runner's bound. Any other (a loaded state
        dict's) is read once, all together: counters on the host (tensors or numbers, as torch's optimizers
        keep them) are stacked on the host, read there, and uploaded in one pinned non-blocking copy (no
        blocking copy per tensor); counters already on the device take one read-back for all of them."""
        if not self._stale(optimizer_state):
            return
        known = self.known_steps
        device = self.runner.device
        states: list[dict[str, Tensor] | None] = []
        host: list[tuple[dict[str, Any], Tensor]] = []  # counters to upload
        foreign: list[Tensor] = []  # counters on the device that this batch did not make: read once
        for p in self.params:
            state = optimizer_state.get(p) or None
            if state is None or any(k not in state for k in _STATE_KEYS):
                states.append(None)
                continue
            step = state["step"]
            if not isinstance(step, Tensor):
                host.append((state, torch.tensor(float(step), dtype=torch.float32)))
            elif step.device != device and step.device.type == "cpu":
                host.append((state, step.detach().reshape(()).to(torch.float32)))
            elif known.get(id(step)) is not step:
                if step.device != device or step.dtype != torch.float32 or step.dim():  # device to device
                    state["step"] = step = step.detach().to(device=device, dtype=torch.float32).reshape(())
                foreign.append(step)
            for key in _STATE_KEYS[:-1]:
                t = state[key]
                if t.device != p.device or not t.is_contiguous():
                    state[key] = t.to(p.device).contiguous()
            states.append(state)
        bound = 0
        if host:
            values = torch.stack([value for _, value in host])  # host tensors: no device involved
            bound = int(values.max().item())
            if device.type != "cpu":
                values = values.pin_memory().to(device, non_blocking=True)  # one copy for all of them
            for i, (state, _) in enumerate(host):
                state["step"] = values[i]
        if foreign:
            bound = max(bound, int(torch.stack(foreign).max().item()))  # one read for all of them
        bound_states = [None if state is None else tuple(state[k] for k in _STATE_KEYS) for state in states]
        self.runner.bind(self.params, bound_states, bound)
        self.bound_dicts = [optimizer_state.get(p) or None for p in self.params]
        self.bound_tensors = bound_states
        self.known_steps = {id(t[-1]): t[-1] for t in bound_states if t is not None}

    def grads(self) -> list[Tensor | None]:
        out = []
        for p in self.params:
            g = p.grad
            ok = g is not None and g.layout == torch.strided and not g.is_complex() and g.dtype in _GRAD_DTYPES
            out.append(g if ok else None)
        return out

    def check(self, optimizer_state: Any) -> Tensor | None:
        """Launch the check of this step's gradients; their flags on the device (None: no gradient)."""
        self.sync_state(optimizer_state)  # the check launch reads the step counters
        grads = self.grads()
        self.present = [g is not None for g in grads]
        if not any(self.present):
            self.runner.discard_check()
            return None
        return self.runner.check(grads)

    def skipped(self, ok: Tensor) -> Tensor:
        """The tensors a "skip" step leaves alone, from ``check``'s flags (0: no gradient or a NaN/inf): those
        with a gradient and a flag of 0 (bool, on the device; the mask of present ones is uploaded without a
        sync, once per pattern)."""
        bad = ok.eq(0)
        if all(self.present):
            return bad
        key = tuple(self.present)
        mask = self._present_masks.get(key)
        if mask is None:
            mask = self._present_masks[key] = upload(np.array(key, dtype=np.bool_), self.runner.device)
        return bad.logical_and_(mask)

    def _float(self, x: Any) -> float:
        """A hyperparameter as a Python float; a tensor is read once per value (its version), not per step."""
        if not isinstance(x, Tensor):
            return float(x)
        cached = self._floats.get(id(x))
        if cached is None or cached[0] is not x or cached[1] != x._version:
            cached = self._floats[id(x)] = (x, x._version, float(x.item()))
        return cached[2]

    def step(self, optimizer_state: Any, group: dict[str, Any]) -> None:
        self.sync_state(optimizer_state)  # new states of this step's first-time tensors
        grads = self.grads()
        if all(g is None for g in grads):
            self.runner.discard_check()
            return
        lr = group["lr"]
        if not (isinstance(lr, Tensor) and lr.device == self.runner.device and lr.numel() == 1):
            lr = self._float(lr)
        self.runner.step(grads, lr=lr, betas=tuple(self._float(b) for b in group["betas"]),
                         eps=self._float(group["eps"]), weight_decay=self._float(group["weight_decay"]))


class _GroupBatches:
    """A group's ``_TritonBatch``es and where each of its tensors is."""

    def __init__(self, batches: list[_TritonBatch]) -> None:
        self.batches = batches
        self.where = {id(p): (batch, i) for batch in batches for i, p in enumerate(batch.params)}

    @staticmethod
    def build(optimizer: MicroAdam, group: dict[str, Any]) -> _GroupBatches | None:
        from ..ops.microadam_triton import group_layout_supported

        if not group_layout_supported(group["topk_block_size"], group["quant_block_size"]):
            return None
        split: dict[tuple[torch.device, torch.dtype], tuple[list[Tensor], list[int]]] = {}
        for index, p in enumerate(group["params"]):
            if optimizer._batchable(p, group):
                params, indices = split.setdefault((p.device, p.dtype), ([], []))
                params.append(p)
                indices.append(index)
        if not split:
            return None
        return _GroupBatches([_TritonBatch(params, indices, group) for params, indices in split.values()])

    def takes(self, p: Tensor, grad: Tensor) -> bool:
        """Whether ``p`` is stepped by the group launches at this step (its gradient's dtype permitting)."""
        return id(p) in self.where and grad.dtype in _GRAD_DTYPES

    def new_counter(self, p: Tensor) -> Tensor:
        """A step counter of 0 on ``p``'s device for ``p`` (of a batch), which gets its state now."""
        return self.where[id(p)][0].new_counter()

    def stepped_alone(self, p: Tensor) -> None:
        """``p`` (of a batch) takes the one-tensor path at this step: its counter may pass the batch's bound."""
        found = self.where.get(id(p))
        if found is not None:
            found[0].runner.bound += 1

    def carry_counters(self, previous: _GroupBatches) -> None:
        """The step counters a previous build knew stay below its bounds: no read-back needed for them."""
        bound = max(batch.runner.bound for batch in previous.batches)
        known = {key: t for batch in previous.batches for key, t in batch.known_steps.items()}
        for batch in self.batches:
            batch.runner.bound = max(batch.runner.bound, bound)
            batch.known_steps = dict(known)


def _address(p: Tensor) -> int:
    try:
        return p.data_ptr()
    except RuntimeError:  # no storage (a DTensor, a fake tensor)
        return 0


class _GroupEntry(NamedTuple):
    group: dict[str, Any]
    key: tuple[Any, ...]
    batches: _GroupBatches | None


class _Job(NamedTuple):
    """One tensor's step: its parameter, gradient, (rank-local) state and own step count."""

    p: Tensor
    grad: Tensor
    state: dict[str, Tensor]
    step: int


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

    def empty(self, name: str, numel: int, dtype: torch.dtype = torch.float32) -> Tensor:
        buffer = self.buffers.get(name)
        if buffer is None or buffer.numel() < numel:
            buffer = self.buffers[name] = torch.empty(numel, dtype=dtype, device=self.device)
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

    def window_weights(self, step: int, m: int, betas: tuple[float, float], bias_correction: str = "paper"
                       ) -> tuple[Tensor, Tensor]:
        key = ("window_weights", step, m, betas, bias_correction)
        if key not in self.constants:
            self.constants[key] = window_weights(step, m, betas, self.device, bias_correction)
        return self.constants[key]


def _spans_with_block_starts(layout: BlockLayout, k_init: float, bucket_size: int, elements: int | None,
                             workspace: Workspace) -> Iterator[tuple[ChunkSpan, Tensor]]:
    """``chunk_spans`` with, for each span, the offset of the block each of its window columns belongs to."""
    for span in chunk_spans(layout, bucket_size, elements):
        yield span, workspace.block_starts(span.end - span.start, layout.block_size, k_init)


class _TensorStep(NamedTuple):
    """What the torch path needs of one tensor during a step."""

    p: Tensor
    p_flat: Tensor  # p as 1-D: p's own storage, or a copy written back at the end
    g_flat: Tensor
    state: dict[str, Tensor]
    layout: BlockLayout
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
    cut into Top-K blocks of L, which ranks each as its tensor's own layout does (k = ceil(k_init * L)).
    """
    limit = _chunk_length(block_size, bucket_size)
    unit = math.lcm(block_size, bucket_size, 2)
    pending: list[_Segment] = []
    pending_block, filled = block_size, 0
    for tensor in tensors:
        for span in chunk_spans(tensor.layout, bucket_size):
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


def _microadam_step_torch(jobs: list[_Job], group: dict[str, Any], workspace: Workspace) -> None:
    """One MicroAdam step of ``jobs`` (tensors on one device) with plain torch ops (the reference path):
    the compression pass chunk by chunk, then each tensor's update from its window."""
    m = group["m"]
    block_size, bucket_size, k_init = group["topk_block_size"], group["quant_block_size"], group["k_init"]
    lr, wd = _as_float(group["lr"]), _as_float(group["weight_decay"])
    betas, eps = tuple(_as_float(b) for b in group["betas"]), _as_float(group["eps"])
    tensors = []
    for job in jobs:
        p = job.p
        p_flat = p.view(-1) if p.is_contiguous() else p.detach().reshape(-1).clone()
        tensors.append(_TensorStep(p, p_flat, job.grad.reshape(-1), job.state,
                                   block_layout(p.numel(), block_size, k_init), (job.step - 1) % m,
                                   workspace.window_weights(job.step, m, betas,
                                                            group.get("bias_correction", "paper"))))
    for chunk_block, segments in _pack_chunks(tensors, block_size, bucket_size):
        _compress_chunk(segments, chunk_block, bucket_size, k_init, workspace)
        # each tensor's update right after its window is complete, while its state is still in cache
        for tensor, span, _ in segments:
            if span.end == tensor.layout.n:
                _update_from_window(tensor, bucket_size, k_init, (eps, lr, wd), workspace)
                if tensor.p_flat.data_ptr() != tensor.p.data_ptr():
                    tensor.p.copy_(tensor.p_flat.view_as(tensor.p))


def _compress_chunk(segments: list[_Segment], block_size: int, bucket_size: int, k_init: float,
                    workspace: Workspace) -> None:
    """Lines 4-9 of the algorithm for the segments of one chunk, cut into Top-K blocks of ``block_size``:
    new window rows and error feedback."""
    last = segments[-1]
    n = last.offset + last.span.end - last.span.start
    accumulator = workspace.empty("accumulator", n + 1)  # + 1: an odd tensor's codes fill a whole byte
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
    pos = rel + workspace.block_starts(n, block_size, k_init)
    rel16, selected = rel.to(torch.int16), a.index_select(0, pos)
    k_block = k_for(block_size, k_init)
    for tensor, span, offset in segments:
        (col0, col1), first = span.columns, offset // block_size * k_block
        tensor.state["window_indices"][tensor.row, col0:col1] = rel16[first:first + col1 - col0]
        tensor.state["window_values"][tensor.row, col0:col1] = selected[first:first + col1 - col0]
    # (6) drop what was selected, (7, 8) quantise the rest into the new error feedback
    a.index_fill_(0, pos, 0.0)
    lo, hi = bucket_ranges(a, bucket_size)
    work = workspace.empty("work", quantize_scratch_size(n))
    packed = len(segments) > 1
    if packed:  # codes through a buffer, then apart
        out = workspace.empty("codes", (n + 1) // 2, torch.uint8)
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
                        workspace: Workspace) -> None:
    """Lines 10-11 and the update: moments from the window (the row just written included), decoupled
    weight decay, p <- p - lr * m_hat / (sqrt(v_hat) + eps), span by span."""
    eps, lr, wd = hyper
    layout, state = tensor.layout, tensor.state
    window_idx, window_val = state["window_indices"], state["window_values"]
    span_length = _chunk_length(layout.block_size, bucket_size, WINDOW_CHUNK_ELEMENTS)
    moments = workspace.zeros("moments", 2, min(layout.n, span_length))
    for span, span_starts in _spans_with_block_starts(layout, k_init, bucket_size, WINDOW_CHUNK_ELEMENTS,
                                                   workspace):
        (col0, col1) = span.columns
        positions = torch.add(window_idx[:, col0:col1], span_starts)  # int16 + int64: one int64 pass
        apply_window_update_(tensor.p_flat[span.start:span.end], positions, window_val[:, col0:col1],
                             tensor.weights, eps, lr, wd, moments)
