"""Triton is optional (CPU-only installs, macOS): the one place that imports it and says whether it is there.

Kernel modules decorate their kernels under ``if triton is not None``. Triton reads TRITON_INTERPRET when a
kernel is decorated, so tests that run kernels on CPU set it before importing those modules.
"""

from __future__ import annotations

try:
    import triton
    import triton.language as tl
except ImportError:  # pragma: no cover - triton is optional
    triton = None
    tl = None

__all__ = ["tl", "triton", "triton_available"]


def triton_available() -> bool:
    return triton is not None
