"""Checking a state dict before it is loaded, and loading it without changing its dtypes.

``SlimOptimizer.load_state_dict`` calls these: ``validate_state_dict`` raises ``ValueError`` naming the problem
(another optimizer, another model or parameter plan, a damaged file) and changes nothing; ``restore_dtypes``
gives back each saved tensor's dtype, which torch's ``Optimizer.load_state_dict`` would have cast to the
parameter's (widening bf16 values and breaking bit-exact resume).
"""

from __future__ import annotations

import copy
from collections import defaultdict
from typing import Any

import torch
from torch import Tensor

__all__ = ["probe_state", "restore_dtypes", "validate_state_dict"]


def validate_state_dict(optimizer: Any, state_dict: Any) -> None:
    """Raise ``ValueError`` unless ``state_dict`` fits this optimizer; never mutates anything.

    Checked: the structure; group and parameter counts; the hyper-parameter keys this class
    defines (a state dict from another optimizer lacks some); parameter names where both sides
    have them (another model); and, per parameter, that the saved state has exactly the keys,
    shapes and dtypes that a step of this optimizer with the saved hyper-parameters would create
    (found by running ``update_group`` on shape-only "meta" copies of the parameters), and no NaN.
    Per-parameter plan metadata (``param_roles``, ``param_layouts``, ...) must
    equal this optimizer's: a state laid out for another partition is not this one's.
    """
    where = f"Cannot load {type(optimizer).__name__} state"
    if not isinstance(state_dict, dict) or not {"state", "param_groups"} <= state_dict.keys():
        raise ValueError(f"{where}: expected a dict with 'state' and 'param_groups', got "
                         f"{_describe(state_dict)}")
    saved_state, saved_groups = state_dict["state"], state_dict["param_groups"]
    if not isinstance(saved_state, dict) or not isinstance(saved_groups, (list, tuple)):
        raise ValueError(f"{where}: 'state' must be a dict and 'param_groups' a list")
    if len(saved_groups) != len(optimizer.param_groups):
        raise ValueError(f"{where}: it has {len(saved_groups)} param groups, this optimizer has "
                         f"{len(optimizer.param_groups)}")
    seen_ids: set[Any] = set()
    for gi, (group, saved) in enumerate(zip(optimizer.param_groups, saved_groups)):
        if not isinstance(saved, dict) or not isinstance(saved.get("params"), (list, tuple)):
            raise ValueError(f"{where}: param_groups[{gi}] is not a dict with a 'params' list")
        if len(saved["params"]) != len(group["params"]):
            raise ValueError(f"{where}: param_groups[{gi}] has {len(saved['params'])} parameters there, "
                             f"{len(group['params'])} here")
        ids = list(saved["params"])
        if len(set(ids)) != len(ids) or seen_ids & set(ids):
            raise ValueError(f"{where}: parameter ids repeat in param_groups[{gi}]")
        seen_ids.update(ids)
        missing = sorted(k for k in optimizer.defaults if k in group and k not in saved)
        if missing:
            raise ValueError(f"{where}: param_groups[{gi}] lacks {', '.join(missing)}; it was saved by "
                             f"another optimizer (its keys: {', '.join(sorted(map(str, saved)))})")
        names, saved_names = group.get("param_names"), saved.get("param_names")
        if names is not None and saved_names is not None and list(names) != list(saved_names):
            i = next((i for i, (a, b) in enumerate(zip(names, saved_names)) if a != b), len(names))
            there = saved_names[i] if i < len(saved_names) else None
            here = names[i] if i < len(names) else None
            raise ValueError(f"{where}: it was saved for another model: parameter {i} of param_groups[{gi}] "
                             f"is {there!r} there, {here!r} here")
        for key in group:  # per-parameter metadata of a parameter plan (slimopt.plans.param_plan)
            if key.startswith("param_") and key != "param_names" and key in saved:
                mine, theirs = list(group[key]), list(saved[key])
                if mine != theirs:
                    i = next((i for i, (a, b) in enumerate(zip(mine, theirs)) if a != b), len(mine))
                    raise ValueError(
                        f"{where}: it was saved for another model or parameter plan: {key}[{i}] of "
                        f"param_groups[{gi}] is {theirs[i] if i < len(theirs) else None!r} there, "
                        f"{mine[i] if i < len(mine) else None!r} here")
    unknown = [k for k in saved_state if k not in seen_ids]
    if unknown:
        raise ValueError(f"{where}: 'state' has entries {unknown[:5]} for parameters no group lists")
    for group, saved in zip(optimizer.param_groups, saved_groups):
        expected = probe_state(optimizer, group, saved)
        for index, pid in enumerate(saved["params"]):
            entry = saved_state.get(pid)
            if entry is None:
                continue
            name = optimizer.param_name(group, index)
            if not isinstance(entry, dict):
                raise ValueError(f"{where}: the state of {name} is {_describe(entry)}, not a dict")
            _check_finite_state(f"{where}: the state of {name}", entry)
            if expected is None or not entry:
                continue
            _check_layout(f"{where}: the state of {name}", entry, expected[index])



def probe_state(optimizer: Any, group: dict[str, Any], saved: dict[str, Any]) -> list[Any] | None:
    """The state one step would create for each parameter of ``group`` under the saved
    hyper-parameters, as shapes and dtypes, computed on "meta" tensors (no memory, no data).

    One probe per distinct (shape, dtype, per-parameter metadata): a transformer has a handful.
    Per-parameter metadata are the group's ``param_*`` lists aligned with ``params`` (see
    ``slimopt.plans.param_plan``). Returns None when this optimizer's step cannot run on meta tensors; the
    layout checks are then skipped for this group (the structural checks still apply).
    """
    params = group["params"]
    hyper = copy.deepcopy({k: v for k, v in saved.items() if k != "params"})
    aligned = [k for k, v in hyper.items()
               if k.startswith("param_") and isinstance(v, (list, tuple)) and len(v) == len(params)]
    probe = object.__new__(type(optimizer))  # copy.copy would go through Optimizer.__getstate__
    probe.__dict__.update(optimizer.__dict__)
    probe._skipped, probe._gated = set(), {}
    layouts: dict[str, Any] = {}
    result = []
    for index, p in enumerate(params):
        per_param = {k: hyper[k][index] for k in aligned}
        key = repr((tuple(p.shape), p.dtype, p.requires_grad,
                    {k: v for k, v in per_param.items() if k != "param_names"}))
        if key not in layouts:
            meta = torch.empty_like(p, device="meta")
            meta.grad = torch.zeros_like(meta)
            probe_group = {**hyper, **{k: [v] for k, v in per_param.items()}, "params": [meta]}
            probe.state = defaultdict(dict)
            probe.param_groups = [probe_group]
            try:
                with torch.no_grad():
                    probe.update_group(probe_group)
            except Exception:  # a step that needs values (``.item()`` on data) cannot run on meta
                return None
            layouts[key] = _layout(probe.state.get(meta, {}))
        result.append(layouts[key])
    return result


def _describe(obj: Any) -> str:
    if isinstance(obj, Tensor):
        return f"a tensor of shape {tuple(obj.shape)} and dtype {obj.dtype}"
    return f"a {type(obj).__name__}"


def _layout(state: Any) -> Any:
    """Shapes and dtypes of a state entry, with the values left out."""
    if isinstance(state, Tensor):
        return ("tensor", tuple(state.shape), state.dtype)
    if isinstance(state, dict):
        return {k: _layout(v) for k, v in state.items()}
    if isinstance(state, (list, tuple)):
        return [_layout(v) for v in state]
    return ("value", type(state).__name__)


def _check_layout(where: str, saved: Any, expected: Any, key: str = "") -> None:
    got = _layout(saved)
    if isinstance(expected, dict) and isinstance(got, dict):
        if set(got) != set(expected):
            raise ValueError(f"{where} has keys {sorted(map(str, got))}, this optimizer keeps "
                             f"{sorted(map(str, expected))}")
        for k in expected:
            _check_layout(where, saved[k], expected[k], f"{key}.{k}" if key else str(k))
        return
    if isinstance(expected, list) and isinstance(got, list) and len(got) == len(expected):
        for i, (s, e) in enumerate(zip(saved, expected)):
            _check_layout(where, s, e, f"{key}[{i}]")
        return
    if got != expected:
        raise ValueError(f"{where}: {key or 'value'} is {_show(got)}, this optimizer keeps {_show(expected)}")


def _show(layout: Any) -> str:
    if isinstance(layout, tuple) and layout[0] == "tensor":
        return f"a tensor of shape {layout[1]} and dtype {layout[2]}"
    if isinstance(layout, tuple):
        return f"a {layout[1]}"
    return f"a {type(layout).__name__}"


def _check_finite_state(where: str, state: Any, key: str = "") -> None:
    """Optimizer state never holds NaN (non-finite gradients are refused or skipped), so a saved one
    that does is damaged. Inf is let through: a second moment can overflow under huge finite gradients."""
    if isinstance(state, Tensor):
        if state.is_floating_point() and state.numel() and bool(torch.isnan(state).any()):
            raise ValueError(f"{where}: {key} holds NaN values (a damaged checkpoint?)")
    elif isinstance(state, dict):
        for k, v in state.items():
            _check_finite_state(where, v, f"{key}.{k}" if key else str(k))
    elif isinstance(state, (list, tuple)):
        for i, v in enumerate(state):
            _check_finite_state(where, v, f"{key}[{i}]")


def restore_dtypes(saved: Any, loaded: Any) -> Any:
    """Return ``loaded`` with every tensor cast back to the dtype it had in ``saved``, never aliased."""
    if isinstance(saved, Tensor) and isinstance(loaded, Tensor):
        if loaded is saved or loaded.dtype != saved.dtype:
            return saved.to(device=loaded.device, copy=True)
        return loaded
    if isinstance(saved, dict) and isinstance(loaded, dict):
        return {k: restore_dtypes(saved[k], v) if k in saved else v for k, v in loaded.items()}
    if isinstance(saved, (list, tuple)) and isinstance(loaded, (list, tuple)):
        return type(loaded)(restore_dtypes(s, v) for s, v in zip(saved, loaded))
    return loaded
