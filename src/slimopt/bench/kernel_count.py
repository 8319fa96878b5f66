"""Kernel launches of one optimizer step: CUDA kernels from the profiler on a GPU, aten ops dispatched below
Python on CPU (every one of which is at least one kernel on a GPU; Triton kernels run by the CPU interpreter
count once). The CPU count is deterministic and tracks the GPU's: what the step-time benchmark and the GPU
suite report beside the times."""

from __future__ import annotations

from typing import Any

import torch
from torch.utils._python_dispatch import TorchDispatchMode

__all__ = ["count_launches"]

_NOT_LAUNCHES = (torch.ops.aten.detach.default, torch.ops.prim.device.default)


class _CountOps(TorchDispatchMode):
    def __init__(self) -> None:
        super().__init__()
        self.count = 0

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        if func not in _NOT_LAUNCHES:
            self.count += 1
        return func(*args, **(kwargs or {}))


def count_launches(optimizer: Any, device: torch.device | str = "cpu") -> int:
    """Launches of one ``optimizer.step()`` (the gradients must be set; the step is taken)."""
    if torch.device(device).type == "cuda":
        from torch.profiler import ProfilerActivity, profile

        with profile(activities=[ProfilerActivity.CUDA]) as prof:
            optimizer.step()
            torch.cuda.synchronize()
        return sum(1 for e in prof.events() if e.device_type == torch.autograd.DeviceType.CUDA)
    with _CountOps() as counter:
        optimizer.step()
    return counter.count
