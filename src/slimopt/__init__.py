"""slimopt: memory-efficient optimizers for training large language models."""

from __future__ import annotations

from importlib import import_module
from typing import Any

from . import _moved
from .core.base import SlimOptimizer
from .memory import state_bytes, state_bytes_by_key
from .registry import create_optimizer, get_supported_optimizers, load_optimizer

__version__ = "0.1.0"

_moved.install()  # the import paths of 0.1 (slimopt.microadam, slimopt.plan, ...) keep working

# The optimizer classes are imported on first use so that `import slimopt` stays light.
_LAZY = {
    "MicroAdam": "slimopt.optim.microadam",
    "AdamMini": "slimopt.optim.adam_mini",
    "SinkGD": "slimopt.optim.sinkgd",
    "SWAN": "slimopt.optim.swan",
}

__all__ = [
    "SlimOptimizer",
    "create_optimizer",
    "get_supported_optimizers",
    "load_optimizer",
    "state_bytes",
    "state_bytes_by_key",
    *_LAZY,
]


def __getattr__(name: str) -> Any:
    if name in _LAZY:
        return getattr(import_module(_LAZY[name]), name)
    raise AttributeError(f"module 'slimopt' has no attribute {name!r}")
