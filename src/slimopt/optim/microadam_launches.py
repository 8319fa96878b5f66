"""The host side of MicroAdam's group launches on CUDA: which tensors each ``SparseWindowStep`` steps, and the
bookkeeping that keeps its pointer tables, step counters and hyper-parameters right without a host sync.

``group_batches(optimizer, group)`` splits a param group's plain contiguous fp32/bf16/fp16 CUDA tensors (those
the Triton backend takes) by device and dtype into ``TritonBatch``es, each stepped by one ``SparseWindowStep``
(``ops.sparse_window_triton``: three launches whatever the number of tensors), and keeps them until the group's
parameters or sizes change. A ``TritonBatch`` binds the runner's tables to the state tensors again when they
change (first step, ``load_state_dict``), keeps the step counters on the device (new ones made there, loaded
ones read once, all together), uploads the mask of tensors without a gradient once per pattern, and reads a
tensor hyper-parameter once per value. None of it is state: nothing here is saved or pickled.
"""

from __future__ import annotations

from typing import Any, NamedTuple

import numpy as np
import torch
from torch import Tensor

from ..core.distributed import is_dtensor
from ..ops.tables import upload

__all__ = ["GRAD_DTYPES", "GroupBatches", "TritonBatch", "group_batches", "uses_triton"]

STATE_KEYS = ("window_indices", "window_values", "ef_codes", "ef_min", "ef_max", "step")  # as bound, in order
GRAD_DTYPES = (torch.float32, torch.bfloat16, torch.float16)


def uses_triton(p: Tensor, group: dict[str, Any]) -> bool:
    """Whether ``p`` takes the Triton kernels under the group's ``backend`` (auto: CUDA tensors, Triton there)."""
    backend = group.get("backend", "auto")
    if backend == "auto":
        if not p.is_cuda:
            return False
        from ..ops.triton_support import triton_available

        return triton_available()
    return backend == "triton"


def _batchable(p: Tensor, group: dict[str, Any]) -> bool:
    return (p.dtype in GRAD_DTYPES and not p.is_meta and p.numel() > 0 and p.is_contiguous() and not is_dtensor(p)
            and uses_triton(p, group))


def group_batches(optimizer: Any, group: dict[str, Any]) -> GroupBatches | None:
    """The tensors of ``group`` that ``SparseWindowStep`` steps together, per (device, dtype): built once,
    rebuilt when the group's parameters or sizes change (kept on ``optimizer``, not in its state dict). None when
    there are none."""
    backend = group.get("backend", "auto")
    if backend == "torch" or (backend == "auto" and not any(p.is_cuda for p in group["params"])):
        return None
    key = (group["m"], group["k_init"], group["topk_block_size"], group["quant_block_size"],
           group.get("backend", "auto"), group.get("bias_correction", "paper"),
           tuple((id(p), _address(p), p.dtype, p.is_contiguous()) for p in group["params"]))
    cache = optimizer.__dict__.setdefault("_triton_groups", {})  # not in the state dict, not pickled
    entry = cache.get(id(group))
    if entry is not None and entry.group is group and entry.key == key:
        return entry.batches
    batches = GroupBatches.build(group)
    if any(p.is_meta for p in group["params"]):  # load_state_dict's shape probe: nothing to keep
        return batches
    if entry is not None and entry.batches is not None and batches is not None:
        batches.carry_counters(entry.batches)
    cache[id(group)] = _CacheEntry(group, key, batches)
    return batches


class TritonBatch:
    """The tensors of one group, device and dtype that one ``SparseWindowStep`` steps. Remembers which state
    tensors its tables point at and binds them again when they change (first step, load_state_dict). Their
    step counters live on the device (the kernels advance them): new ones are made there (``new_counter``),
    loaded ones are moved there when bound (``sync_state``)."""

    def __init__(self, params: list[Tensor], indices: list[int], group: dict[str, Any]) -> None:
        from ..ops.sparse_window_triton import SparseWindowStep

        self.params, self.indices = params, indices
        self.runner = SparseWindowStep([p.numel() for p in params], params[0].device, params[0].dtype,
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
            if state is not None and (bound is None or any(state.get(k) is not t for k, t in zip(STATE_KEYS, bound))):
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
            if state is None or any(k not in state for k in STATE_KEYS):
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
            for key in STATE_KEYS[:-1]:
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
        bound_states = [None if state is None else tuple(state[k] for k in STATE_KEYS) for state in states]
        self.runner.bind(self.params, bound_states, bound)
        self.bound_dicts = [optimizer_state.get(p) or None for p in self.params]
        self.bound_tensors = bound_states
        self.known_steps = {id(t[-1]): t[-1] for t in bound_states if t is not None}

    def grads(self) -> list[Tensor | None]:
        out = []
        for p in self.params:
            g = p.grad
            ok = g is not None and g.layout == torch.strided and not g.is_complex() and g.dtype in GRAD_DTYPES
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
            cached = self._floats[id(x)] = (x, x._version, float(x))
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


class GroupBatches:
    """A group's ``TritonBatch``es and where each of its tensors is."""

    def __init__(self, batches: list[TritonBatch]) -> None:
        self.batches = batches
        self.where = {id(p): (batch, i) for batch in batches for i, p in enumerate(batch.params)}

    @staticmethod
    def build(group: dict[str, Any]) -> GroupBatches | None:
        from ..ops.sparse_window_triton import group_sizes_supported

        if not group_sizes_supported(group["topk_block_size"], group["quant_block_size"]):
            return None
        split: dict[tuple[torch.device, torch.dtype], tuple[list[Tensor], list[int]]] = {}
        for index, p in enumerate(group["params"]):
            if _batchable(p, group):
                params, indices = split.setdefault((p.device, p.dtype), ([], []))
                params.append(p)
                indices.append(index)
        if not split:
            return None
        return GroupBatches([TritonBatch(params, indices, group) for params, indices in split.values()])

    def takes(self, p: Tensor, grad: Tensor) -> bool:
        """Whether ``p`` is stepped by the group launches at this step (its gradient's dtype permitting)."""
        return id(p) in self.where and grad.dtype in GRAD_DTYPES

    def new_counter(self, p: Tensor) -> Tensor:
        """A step counter of 0 on ``p``'s device for ``p`` (of a batch), which gets its state now."""
        return self.where[id(p)][0].new_counter()

    def stepped_alone(self, p: Tensor) -> None:
        """``p`` (of a batch) takes the one-tensor path at this step: its counter may pass the batch's bound."""
        found = self.where.get(id(p))
        if found is not None:
            found[0].runner.bound += 1

    def carry_counters(self, previous: GroupBatches) -> None:
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


class _CacheEntry(NamedTuple):
    group: dict[str, Any]
    key: tuple[Any, ...]
    batches: GroupBatches | None
