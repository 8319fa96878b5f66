"""Work buffers a step reuses on one device: scratch, not state (never saved, not in ``state_bytes``).

A fresh MiB-sized temporary per matrix or chunk costs page faults on every allocation, which on a CPU is a
noticeable part of a memory-bound, cache-sized pass. So a ``Scratch`` keeps each buffer, by name, at the largest
size asked for and hands out its first elements; ``views`` keeps the views a step makes of a buffer (each view is
a dispatched op, and fixed addresses from step to step are what a CUDA graph needs) until that buffer grows;
``constant`` keeps the small tensors that many chunks and tensors ask for (a few tiny torch ops each, times
hundreds of chunks, add up).
"""

from __future__ import annotations

from collections.abc import Callable, Hashable
from typing import Any

import torch
from torch import Tensor

__all__ = ["Scratch"]


class Scratch:
    """Named work buffers and kept constants on ``device``. What it hands out is valid until a later call grows
    the same buffer; callers must not keep it across such calls."""

    def __init__(self, device: torch.device | str) -> None:
        self.device = torch.device(device)
        self._buffers: dict[str, Tensor] = {}
        self._views: dict[tuple[str, Hashable], Any] = {}
        self._constants: dict[Hashable, Any] = {}

    def empty(self, name: str, numel: int, dtype: torch.dtype = torch.float32) -> Tensor:
        """The first ``numel`` elements of the 1-D buffer ``name`` (uninitialised), grown to ``numel`` if shorter
        (which drops the ``views`` of the old one)."""
        buffer = self._buffers.get(name)
        if buffer is None or buffer.numel() < numel:
            buffer = self._buffers[name] = torch.empty(numel, dtype=dtype, device=self.device)
            for key in [k for k in self._views if k[0] == name]:
                del self._views[key]
        return buffer[:numel]

    def zeros(self, name: str, rows: int, numel: int) -> Tensor:
        """The first ``numel`` columns of the zeroed fp32 buffer ``name`` of ``rows`` rows; callers must leave it
        zeroed."""
        buffer = self._buffers.get(name)
        if buffer is None or buffer.shape[1] < numel:
            buffer = self._buffers[name] = torch.zeros(rows, numel, dtype=torch.float32, device=self.device)
        return buffer[:, :numel]

    def like(self, t: Tensor, name: str = "flat") -> Tensor:
        """An fp32 buffer shaped like ``t``: the first elements of the buffer ``name``."""
        return self.empty(name, t.numel()).view(t.shape)

    def views(self, key: Hashable, numel: int, build: Callable[[Tensor], Any], name: str = "flat") -> Any:
        """``build(flat)`` for the first ``numel`` fp32 elements ``flat`` of the buffer ``name``, made once per
        ``key`` and kept until that buffer grows."""
        flat = self.empty(name, numel)
        entry = self._views.get((name, key))
        if entry is None:
            entry = self._views[(name, key)] = build(flat)
        return entry

    def constant(self, key: Hashable, build: Callable[[], Any]) -> Any:
        """``build()``, made once per ``key`` (callers must not modify it)."""
        if key not in self._constants:
            self._constants[key] = build()
        return self._constants[key]
