"""Measured optimizer-state memory: the exact bytes an optimizer holds in ``optimizer.state`` (the analytic
counterpart, per tensor from shapes alone, is :mod:`slimopt.memory.formulas`)."""

from __future__ import annotations

from collections.abc import Iterator
from typing import Any

import torch
from torch import Tensor

__all__ = ["state_bytes", "state_bytes_by_key"]


def _tensors(obj: Any) -> Iterator[tuple[str, Tensor]]:
    if isinstance(obj, Tensor):
        yield "", obj
    elif isinstance(obj, dict):
        for key, value in obj.items():
            for sub, t in _tensors(value):
                yield (str(key) if not sub else f"{key}.{sub}"), t
    elif isinstance(obj, (list, tuple)):
        for value in obj:
            yield from _tensors(value)


def _local(t: Tensor) -> Tensor:
    to_local = getattr(t, "to_local", None)  # DTensor: count this rank's shard only
    return to_local() if callable(to_local) else t


def state_bytes_by_key(optimizer: torch.optim.Optimizer) -> dict[str, int]:
    """Bytes of optimizer state per state key (``exp_avg``, ``window_values``, ...).

    A storage shared by several tensors is counted once, under the first key that holds it.
    """
    seen: set[tuple[str, int]] = set()
    totals: dict[str, int] = {}
    for per_param in optimizer.state.values():
        for key, t in _tensors(per_param):
            storage = _local(t).untyped_storage()
            ident = (str(t.device), storage.data_ptr())
            if storage.nbytes() == 0 or ident in seen:
                continue
            seen.add(ident)
            totals[key] = totals.get(key, 0) + storage.nbytes()
    return totals


def state_bytes(optimizer: torch.optim.Optimizer) -> int:
    """Exact bytes of every tensor held in ``optimizer.state`` (shared storage counted once)."""
    return sum(state_bytes_by_key(optimizer).values())
