"""Optimizers by name: ``create_optimizer(model, "adammini", lr=1e-3)``.

Every entry is imported lazily so that ``import slimopt`` stays cheap. Registering a name here is all
it takes for the conformance suite (tests/test_conformance.py) to test that optimizer.
"""

from __future__ import annotations

import importlib
from dataclasses import dataclass
from typing import Any

import torch

__all__ = ["OptimizerSpec", "create_optimizer", "get_supported_optimizers", "load_optimizer", "spec"]


@dataclass(frozen=True)
class OptimizerSpec:
    name: str
    target: str  # "module:attribute"
    example_lr: float  # a learning rate that trains small models well; the harness's default before a sweep
    summary: str


_SPECS: dict[str, OptimizerSpec] = {
    s.name: s
    for s in [
        OptimizerSpec("adamw", "torch.optim:AdamW", 1e-2, "torch AdamW, the baseline"),
        OptimizerSpec("microadam", "slimopt.optim.microadam:MicroAdam", 1e-2,
                      "MicroAdam: Top-K sparse gradients, 4-bit error feedback, windowed moments"),
        OptimizerSpec("adammini", "slimopt.optim.adam_mini:AdamMini", 1e-2,
                      "Adam-mini: one second moment per Hessian block"),
        OptimizerSpec("sinkgd", "slimopt.optim.sinkgd:SinkGD", 0.02,
                      "SinkGD: stateless Sinkhorn row/column normalisation (AdamW for non-matrices)"),
        OptimizerSpec("swan", "slimopt.optim.swan:SWAN", 0.02,
                      "SWAN: stateless row standardisation + whitening (AdamW for non-matrices)"),
    ]
}


def get_supported_optimizers() -> list[str]:
    """The registered optimizer names, lower case."""
    return sorted(_SPECS)


def spec(name: str) -> OptimizerSpec:
    key = name.lower()
    if key not in _SPECS:
        raise ValueError(f"Unknown optimizer name: {name!r} (supported: {', '.join(get_supported_optimizers())})")
    return _SPECS[key]


def load_optimizer(name: str) -> type[torch.optim.Optimizer]:
    """The optimizer class registered as ``name``."""
    module, attribute = spec(name).target.split(":")
    return getattr(importlib.import_module(module), attribute)


def create_optimizer(model: torch.nn.Module, name: str, lr: float, weight_decay: float = 0.0,
                     **kwargs: Any) -> torch.optim.Optimizer:
    """Build the optimizer ``name`` for ``model``.

    Model-aware optimizers (Adam-mini's partition, SinkGD/SWAN routing) define a ``from_model``
    classmethod that receives the model itself, so they can read parameter names, shapes and
    ``model.config``. The others get ``model.named_parameters()``.
    """
    if not isinstance(model, torch.nn.Module):
        raise TypeError(f"create_optimizer expects a torch.nn.Module, got {type(model).__name__}")
    cls = load_optimizer(name)
    from_model = getattr(cls, "from_model", None)
    if from_model is not None:
        return from_model(model, lr=lr, weight_decay=weight_decay, **kwargs)
    if cls.__module__.startswith("torch."):
        return cls(model.parameters(), lr=lr, weight_decay=weight_decay, **kwargs)
    return cls(list(model.named_parameters()), lr=lr, weight_decay=weight_decay, **kwargs)
