"""Small host tables (pointer tables, index tables, per-tensor sizes) put on a device without a host sync.

A kernel that steps many tensors in one launch reads their addresses and sizes from int64 tables built on the
host. ``torch.tensor(data, device="cuda")`` copies from pageable memory and waits for the copy (a host sync
every time a table changes); ``upload`` stages the table in pinned memory and copies it without blocking. The
caching host allocator keeps the pinned block alive until the copy has run, so the host array may be dropped
at once.
"""

from __future__ import annotations

import numpy as np
import torch
from torch import Tensor

__all__ = ["upload"]


def upload(array: np.ndarray, device: torch.device | str) -> Tensor:
    """``array`` as a tensor on ``device``: the same object kind (a fresh copy) on the CPU, a pinned non-blocking
    copy on an accelerator (no host sync)."""
    host = torch.from_numpy(np.ascontiguousarray(array).copy())
    if torch.device(device).type == "cpu":
        return host
    return host.pin_memory().to(device, non_blocking=True)
