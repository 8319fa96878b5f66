"""Bookkeeping shared by every slimopt optimizer.

Each method's module keeps only its algorithm: a ``SlimOptimizer`` subclass whose ``update_group``
reads like the paper's algorithm box and calls pure tensor functions from ``slimopt.ops``. Everything
else lives here, once:

* hyper-parameter validation that names the argument and the value (``ValueError``);
* ``(name, tensor)`` pairs accepted anywhere torch accepts tensors; names are kept in the param group
  under ``"param_names"`` (torch's own key), never in a dict keyed by ``id(p)``, so Accelerate or FSDP2
  swapping the parameter objects loses nothing;
* ``step(closure)`` with torch.optim semantics, lazy state, a per-parameter step counter;
* sparse and complex gradients rejected with the parameter's name;
* a non-finite policy (``nonfinite="raise" | "skip"``, a group setting): a gradient with NaN or inf either
  raises naming the parameter, or is skipped so that the tensor and all of its state stay untouched;
* ``load_state_dict`` that keeps every state tensor's saved dtype (torch casts floating state to the
  parameter dtype, which would silently widen bf16 values and break bit-exact resume).
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Iterator
from typing import Any

import torch
from torch import Tensor
from torch.optim import Optimizer

from .distributed import finite_flags

__all__ = [
    "SlimOptimizer",
    "as_param_groups",
    "check_betas",
    "check_choice",
    "check_lr",
    "check_nonnegative",
    "check_positive",
    "check_positive_int",
    "check_range",
]


# --------------------------------------------------------------------------------------------------
# validation: every error names the argument and the value it got


def _scalar(name: str, value: Any) -> float:
    if isinstance(value, Tensor):
        if value.numel() != 1:
            raise ValueError(f"{name} must be a scalar or a one-element tensor, got shape {tuple(value.shape)}")
        return float(value.detach().reshape(()).item())
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise ValueError(f"{name} must be a number, got {value!r}")
    return float(value)


def check_lr(lr: float | Tensor, name: str = "lr") -> None:
    value = _scalar(name, lr)
    if not value >= 0.0:  # also rejects NaN
        raise ValueError(f"Invalid {name}: {value} (must be >= 0)")


def check_nonnegative(name: str, value: float) -> None:
    v = _scalar(name, value)
    if not v >= 0.0:
        raise ValueError(f"Invalid {name}: {v} (must be >= 0)")


def check_positive(name: str, value: float) -> None:
    v = _scalar(name, value)
    if not v > 0.0:
        raise ValueError(f"Invalid {name}: {v} (must be > 0)")


def check_range(name: str, value: float, low: float, high: float, *, low_open: bool = False,
                high_open: bool = False) -> None:
    v = _scalar(name, value)
    ok_low = v > low if low_open else v >= low
    ok_high = v < high if high_open else v <= high
    if not (ok_low and ok_high):
        interval = f"{'(' if low_open else '['}{low}, {high}{')' if high_open else ']'}"
        raise ValueError(f"Invalid {name}: {v} (must be in {interval})")


def check_betas(betas: tuple[float, float], name: str = "betas") -> None:
    if not isinstance(betas, (tuple, list)) or len(betas) != 2:
        raise ValueError(f"Invalid {name}: {betas!r} (must be a pair (beta1, beta2))")
    for i, beta in enumerate(betas):
        check_range(f"{name}[{i}]", beta, 0.0, 1.0, high_open=True)


def check_positive_int(name: str, value: int) -> None:
    if isinstance(value, bool) or not isinstance(value, int) or value < 1:
        raise ValueError(f"Invalid {name}: {value!r} (must be an integer >= 1)")


def check_choice(name: str, value: Any, choices: Iterable[Any]) -> None:
    choices = tuple(choices)
    if value not in choices:
        raise ValueError(f"Invalid {name}: {value!r} (must be one of {', '.join(map(repr, choices))})")


# --------------------------------------------------------------------------------------------------
# parameters and their names


def _is_named(item: Any) -> bool:
    return isinstance(item, tuple) and len(item) == 2 and isinstance(item[0], str)


def _named_group(items: list[Any], extra: dict[str, Any]) -> dict[str, Any]:
    named = [_is_named(x) for x in items]
    if any(named) and not all(named):
        raise ValueError("params mixes (name, tensor) pairs and bare tensors in one group")
    group = dict(extra)
    if items and all(named):
        group["params"] = [p for _, p in items]
        group["param_names"] = [n for n, _ in items]
    else:
        group["params"] = list(items)
    return group


def as_param_groups(params: Any) -> list[dict[str, Any]]:
    """Normalise what users pass as ``params`` into a list of dict groups.

    Accepts an iterable of tensors, of ``(name, tensor)`` pairs (``model.named_parameters()``), or of
    dicts whose ``"params"`` are either. Names end up in ``group["param_names"]`` aligned with
    ``group["params"]``; this also works on torch versions whose ``Optimizer`` predates named params.
    """
    if isinstance(params, Tensor):
        raise TypeError("params must be an iterable of tensors, (name, tensor) pairs or dicts, got a Tensor")
    items = list(params)
    if not items:
        raise ValueError("optimizer got an empty parameter list")
    if all(isinstance(x, dict) for x in items):
        groups = []
        for g in items:
            extra = {k: v for k, v in g.items() if k != "params"}
            p = g["params"]
            p = [p] if isinstance(p, Tensor) else list(p)
            if "param_names" in extra:
                groups.append({**extra, "params": p})
            else:
                groups.append(_named_group(p, extra))
        return groups
    if any(isinstance(x, dict) for x in items):
        raise ValueError("params mixes dict param groups with tensors")
    return [_named_group(items, {})]


# --------------------------------------------------------------------------------------------------
# the base class


NONFINITE_POLICIES = ("raise", "skip")


class SlimOptimizer(Optimizer):
    """A ``torch.optim.Optimizer`` with slimopt's shared conventions.

    Subclasses implement ``update_group(group)`` and call ``self.grads(group)`` to iterate over the
    parameters that have a gradient, and ``self.advance_step(state)`` to count steps per tensor.
    Their constructors accept ``nonfinite="raise" | "skip"`` and put it in ``defaults``.
    """

    def __init__(self, params: Any, defaults: dict[str, Any]) -> None:
        defaults = {"nonfinite": "raise", **defaults}
        check_choice("nonfinite", defaults["nonfinite"], NONFINITE_POLICIES)
        super().__init__(as_param_groups(params), defaults)

    def add_param_group(self, param_group: dict[str, Any]) -> None:
        if "nonfinite" in param_group:
            check_choice("nonfinite", param_group["nonfinite"], NONFINITE_POLICIES)
        super().add_param_group(param_group)

    # -- hooks for subclasses -------------------------------------------------------------------
    def update_group(self, group: dict[str, Any]) -> None:  # pragma: no cover - abstract
        raise NotImplementedError

    # -- the step -----------------------------------------------------------------------------------
    @torch.no_grad()
    def step(self, closure: Callable[[], Any] | None = None) -> Any:
        loss = None
        if closure is not None:
            with torch.enable_grad():
                loss = closure()
        self._skipped = self._check_finite()
        for group in self.param_groups:
            self.update_group(group)
        return loss

    def _check_finite(self) -> set[tuple[int, int]]:
        """Find non-finite gradients before anything is updated, with one device sync for all of them.

        A NaN in a "raise" group raises here, naming the parameter, with the optimizer untouched; in a
        "skip" group the tensor is left out of this step (returned as (group, index) pairs).
        """
        where, grads = [], []
        for gi, group in enumerate(self.param_groups):
            for index, p in enumerate(group["params"]):
                grad = p.grad
                if grad is not None and grad.layout == torch.strided and not grad.is_complex():
                    where.append((gi, index))
                    grads.append(grad)
        # one sync per device; ranks holding shards of one tensor agree (slimopt.distributed)
        bad = [w for w, ok in zip(where, finite_flags(grads)) if not ok]
        if not bad:
            return set()
        for gi, index in bad:
            group = self.param_groups[gi]
            if group.get("nonfinite", "raise") != "skip":
                raise FloatingPointError(
                    f"{type(self).__name__}: non-finite gradient (NaN or inf) for parameter "
                    f"{self.param_name(group, index)}; nothing was updated. Pass nonfinite='skip' to skip such "
                    "tensors instead"
                )
        return set(bad)

    # -- helpers ------------------------------------------------------------------------------------
    def param_name(self, group: dict[str, Any], index: int) -> str:
        names = group.get("param_names")
        if names is not None:
            return str(names[index])
        group_index = next(i for i, g in enumerate(self.param_groups) if g is group)
        shape = tuple(group["params"][index].shape)
        return f"param_groups[{group_index}]['params'][{index}] (shape {shape})"

    def grads(self, group: dict[str, Any]) -> Iterator[tuple[int, Tensor, Tensor]]:
        """Yield ``(index, param, grad)`` for every parameter of ``group`` that has a gradient to apply
        (not ``None``, not skipped by the non-finite policy in this step)."""
        skipped = getattr(self, "_skipped", None)
        group_index = next((i for i, g in enumerate(self.param_groups) if g is group), -1) if skipped else -1
        for index, p in enumerate(group["params"]):
            grad = p.grad
            if grad is None:
                continue
            if grad.is_sparse or grad.layout != torch.strided:
                raise RuntimeError(
                    f"{type(self).__name__} does not support sparse gradients "
                    f"(parameter {self.param_name(group, index)})"
                )
            if grad.is_complex() or p.is_complex():
                raise RuntimeError(
                    f"{type(self).__name__} does not support complex parameters or gradients "
                    f"(parameter {self.param_name(group, index)})"
                )
            if skipped and (group_index, index) in skipped:
                continue
            yield index, p, grad

    @staticmethod
    def advance_step(state: dict[str, Any]) -> Tensor:
        """Increment and return this tensor's own step counter (a 0-d float32 CPU tensor, as torch)."""
        step = state.get("step")
        if step is None:
            step = state["step"] = torch.zeros((), dtype=torch.float32)
        step += 1
        return step

    # -- state dict ---------------------------------------------------------------------------------
    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        """Load state, keeping each saved tensor's dtype bit-exactly (torch would cast it)."""
        saved_ids = [i for g in state_dict["param_groups"] for i in g["params"]]
        params = [p for g in self.param_groups for p in g["params"]]
        super().load_state_dict(state_dict)
        saved_state = state_dict["state"]
        for saved_id, p in zip(saved_ids, params):
            if saved_id in saved_state and p in self.state:
                self.state[p] = _restore_dtypes(saved_state[saved_id], self.state[p])


def _restore_dtypes(saved: Any, loaded: Any) -> Any:
    """Return ``loaded`` with every tensor cast back to the dtype it had in ``saved``, never aliased."""
    if isinstance(saved, Tensor) and isinstance(loaded, Tensor):
        if loaded is saved or loaded.dtype != saved.dtype:
            return saved.to(device=loaded.device, copy=True)
        return loaded
    if isinstance(saved, dict) and isinstance(loaded, dict):
        return {k: _restore_dtypes(saved[k], v) if k in saved else v for k, v in loaded.items()}
    if isinstance(saved, (list, tuple)) and isinstance(loaded, (list, tuple)):
        return type(loaded)(_restore_dtypes(s, v) for s, v in zip(saved, loaded))
    return loaded
