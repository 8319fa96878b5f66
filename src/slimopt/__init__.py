"""slimopt: memory-efficient optimizers for training large language models."""

from __future__ import annotations

from typing import Any

from .core.base import SlimOptimizer
from .memory import state_bytes, state_bytes_by_key
from .registry import SPECS, create_optimizer, get_supported_optimizers, import_target, load_optimizer

__version__ = "0.2.0"


def _lazy_classes() -> dict[str, str]:
    """Class name -> ``"module:Class"`` of every registered optimizer not from torch itself (torch's AdamW stays
    ``torch.optim.AdamW``), read from the registry when asked, so a class registered later is there too. The
    classes are imported on first use, so that ``import slimopt`` stays light."""
    return {spec.target.partition(":")[2]: spec.target for spec in SPECS.values()
            if not spec.target.startswith("torch.")}


__all__ = [
    "SlimOptimizer",
    "create_optimizer",
    "get_supported_optimizers",
    "load_optimizer",
    "state_bytes",
    "state_bytes_by_key",
    *_lazy_classes(),
]


def __getattr__(name: str) -> Any:
    target = _lazy_classes().get(name)
    if target is None:
        raise AttributeError(f"module 'slimopt' has no attribute {name!r}")
    return import_target(target)


def __dir__() -> list[str]:
    return sorted({*globals(), *_lazy_classes()})
