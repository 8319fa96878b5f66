"""Small host tables (pointer tables, index tables, per-tensor sizes) put on a device without a host sync.

A kernel that steps many tensors in one launch reads their addresses and sizes from int64 tables built on the
host. ``torch.tensor(data, device="cuda")`` copies from pageable memory and waits for the copy (a host sync
every time a table changes); ``upload`` stages the table in pinned memory and copies it without blocking. The
caching host allocator keeps the pinned block alive until the copy has run, so the host array may be dropped
at once.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
import torch
from torch import Tensor

__all__ = ["AddressTable", "upload"]


def upload(array: np.ndarray, device: torch.device | str) -> Tensor:
    """``array`` as a tensor on ``device``: the same object kind (a fresh copy) on the CPU, a pinned non-blocking
    copy on an accelerator (no host sync)."""
    # as_tensor (not from_numpy, which no TorchFunctionMode sees): shares the fresh copy's memory all the same,
    # and tools that follow tables from host data to the device (shared/tools/gpu_step_estimate.py) see it
    host = torch.as_tensor(np.ascontiguousarray(array).copy())
    if torch.device(device).type == "cpu":
        return host
    return host.pin_memory().to(device, non_blocking=True)


class AddressTable:
    """The addresses of a list of tensors as an int64 table on ``device`` (what a kernel that steps many tensors
    in one launch reads its pointers from), uploaded again only when they change.

    ``table(tensors)`` compares the tensors' ``data_ptr()`` tuple with the last call's: a gradient freed and
    reallocated at the same address (the caching allocator's usual case) costs nothing, a new address one
    non-blocking upload. The caller keeps the layouts (shapes, strides, dtypes) the kernel assumes fixed."""

    def __init__(self, device: torch.device | str) -> None:
        self.device = torch.device(device)
        self._key: tuple[int, ...] | None = None
        self._table: Tensor | None = None

    def __call__(self, tensors: Sequence[Tensor]) -> Tensor:
        key = tuple(t.data_ptr() for t in tensors)
        if key != self._key or self._table is None:
            self._key, self._table = key, upload(np.array(key, dtype=np.int64), self.device)
        return self._table
