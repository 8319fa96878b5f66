"""Small host tables (pointer tables, index tables, per-tensor sizes) put on a device without a host sync.

A kernel that steps many tensors in one launch reads their addresses and sizes from int64 tables built on the
host. ``torch.tensor(data, device="cuda")`` copies from pageable memory and waits for the copy (a host sync
every time a table changes); ``upload`` stages the table in pinned memory and copies it without blocking. The
caching host allocator keeps the pinned block alive until the copy has run, so the host array may be dropped
at once.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import numpy as np
import torch
from torch import Tensor

__all__ = ["AddressTable", "ValueTable", "upload"]


def upload(array: np.ndarray, device: torch.device | str) -> Tensor:
    """``array`` as a tensor on ``device``: the same object kind (a fresh copy) on the CPU, a pinned non-blocking
    copy on an accelerator (no host sync)."""
    # as_tensor, not from_numpy: the same zero-copy wrap of the fresh array, but visible to TorchFunctionModes
    # (from_numpy is not), which is how tools that cost a step find its tables
    host = torch.as_tensor(np.ascontiguousarray(array).copy())
    kind = torch.device(device).type
    if kind == "cpu":
        return host
    if kind == "meta":  # shapes only (a step probed on meta tensors): nothing to copy, no memory to pin
        return host.to(device)
    return host.pin_memory().to(device, non_blocking=True)


class AddressTable:
    """The addresses (``data_ptr``) of lists of tensors as one int64 device table: a row per tensor, a column per
    list (``table(params, exp_avgs)`` is ``(n, 2)``; a ``None`` entry is address 0). Uploaded (``upload``: no host
    sync) when it is first asked for and again only when an address changes, so a kernel over many tensors reads
    their addresses from a table that is built once per layout and re-sent only when a tensor moves (gradients
    that are freed and allocated again between steps usually come back at the same addresses).

    Give each kernel only the tables it needs: a table is a promise that the kernel reaches every tensor in it.
    The caller keeps the tensors alive while a launch that reads the table may still run."""

    def __init__(self, device: torch.device | str) -> None:
        self.device = torch.device(device)
        self._key: tuple[int, ...] | None = None
        self._table: Tensor | None = None

    def __call__(self, *columns: Sequence[Tensor | None]) -> Tensor:
        rows = len(columns[0]) if columns else 0
        if any(len(column) != rows for column in columns):
            raise ValueError(f"AddressTable: columns of {[len(c) for c in columns]} tensors; they must be equal")
        key = tuple(0 if t is None else t.data_ptr() for column in columns for t in column)
        if key != self._key or self._table is None:
            array = np.array(key, dtype=np.int64).reshape(len(columns), rows).T
            self._table, self._key = upload(array, self.device), key
        return self._table


class ValueTable:
    """A small host table of numbers (per-tensor sizes, offsets, factors) on a device, uploaded again only when
    its values change (``upload``: no host sync)."""

    def __init__(self, device: torch.device | str, dtype: np.dtype | type = np.float64) -> None:
        self.device = torch.device(device)
        self.dtype = np.dtype(dtype)
        self._key: tuple[Any, ...] | None = None
        self._table: Tensor | None = None

    def __call__(self, values: Sequence[Any]) -> Tensor:
        key = tuple(values)
        if key != self._key or self._table is None:
            self._table, self._key = upload(np.array(key, dtype=self.dtype), self.device), key
        return self._table
