"""Import paths of slimopt 0.1 that moved when the package was laid out by layers.

``import slimopt.microadam`` and ``from slimopt.plan import Plan`` keep working: the old name gives a
module that forwards every attribute to the new module (or, for a renamed one, to its new home) and says
once, with a ``FutureWarning``, where it lives now. An attribute that no longer exists raises an
``AttributeError`` naming the new module.
"""

from __future__ import annotations

import importlib
import importlib.abc
import importlib.machinery
import sys
import types
import warnings
from typing import Any

# old module -> (new module, {old attribute: "new.module:attribute"})
MOVED: dict[str, tuple[str, dict[str, str]]] = {
    "slimopt.microadam": ("slimopt.optim.microadam", {}),
    "slimopt.adam_mini": ("slimopt.optim.adam_mini", {}),
    "slimopt.sinkgd": ("slimopt.optim.sinkgd", {}),
    "slimopt.swan": ("slimopt.optim.swan", {}),
    "slimopt.routing": ("slimopt.optim.hybrid", {}),
    "slimopt.optimizer": ("slimopt.core.base", {}),
    "slimopt.distributed": ("slimopt.core.distributed", {"comm_bytes_per_step": "slimopt.comm:comm_bytes_per_step"}),
    "slimopt.plan": ("slimopt.plans.param_plan", {
        "Plan": "slimopt.plans.param_plan:ParamPlan",
        "Layout": "slimopt.plans.param_plan:BlockFacts",
        "ADAM_MINI": "slimopt.optim.adam_mini:ADAM_MINI",
        "adam_mini_layout": "slimopt.optim.adam_mini:adam_mini_layout",
    }),
    "slimopt.planner": ("slimopt.memory.fit", {"Plan": "slimopt.memory.fit:FitPlan"}),
    "slimopt.memory_model": ("slimopt.memory.formulas", {
        "MODELS": "slimopt.memory.models:MODELS",
        "ModelSpec": "slimopt.memory.models:ModelSpec",
        "model_shapes": "slimopt.memory.models:model_shapes",
    }),
    "slimopt.data": ("slimopt.bench.fetch", {}),
}


def _resolve(target: str) -> Any:
    module, _, attribute = target.partition(":")
    return getattr(importlib.import_module(module), attribute)


class _Forwarder(types.ModuleType):
    """An old module name: attributes come from the new module, renamed ones from their new home."""

    def __init__(self, old: str) -> None:
        super().__init__(old)
        self._new, self._renamed = MOVED[old]
        self._warned = False
        self.__file__ = f"moved to {self._new}"  # shown by "cannot import name ... from ... (moved to ...)"

    def __getattr__(self, name: str) -> Any:
        if name.startswith("__"):
            raise AttributeError(name)
        if not self._warned:
            self._warned = True
            warnings.warn(f"{self.__name__} moved to {self._new}; import it from there", FutureWarning, stacklevel=2)
        if name in self._renamed:
            return _resolve(self._renamed[name])
        new = importlib.import_module(self._new)
        try:
            return getattr(new, name)
        except AttributeError:
            raise AttributeError(f"{self.__name__} moved to {self._new}, which has no {name!r}") from None

    def __dir__(self) -> list[str]:
        return sorted({*dir(importlib.import_module(self._new)), *self._renamed})


class _Loader(importlib.abc.Loader):
    def create_module(self, spec: importlib.machinery.ModuleSpec) -> types.ModuleType:
        return _Forwarder(spec.name)

    def exec_module(self, module: types.ModuleType) -> None:
        pass


class _Finder(importlib.abc.MetaPathFinder):
    def find_spec(self, fullname: str, path: Any = None, target: Any = None) -> importlib.machinery.ModuleSpec | None:
        if fullname in MOVED:
            return importlib.machinery.ModuleSpec(fullname, _Loader())
        return None


def install() -> None:
    if not any(isinstance(f, _Finder) for f in sys.meta_path):
        sys.meta_path.append(_Finder())
