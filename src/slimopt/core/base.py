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
* a non-finite policy (``nonfinite="skip" | "raise"``, a group setting), written once: a gradient with NaN or
  inf is skipped so that the tensor and all of its state stay untouched (the default; decided on the device
  where the method can, so a GPU step has no host sync), or raises naming the parameter (a sync per step);
* ``load_state_dict`` that keeps every state tensor's saved dtype (torch casts floating state to the
  parameter dtype, which would silently widen bf16 values and break bit-exact resume).
"""

from __future__ import annotations

import math
from collections.abc import Callable, Iterable, Iterator
from typing import Any, NamedTuple

import torch
from torch import Tensor
from torch.optim import Optimizer

from .distributed import exactly_finite, local, nonfinite_flags
from .state_dict import restore_dtypes, validate_state_dict

__all__ = [
    "NONFINITE_POLICIES",
    "STEP_BYTES",
    "GradFlags",
    "SlimOptimizer",
    "as_param_groups",
    "check_betas",
    "check_choice",
    "check_lr",
    "check_nonnegative",
    "check_positive",
    "check_positive_int",
    "check_range",
    "placeholder_names",
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


BACKENDS = ("auto", "torch", "triton")  # an optimizer's kernels: Triton for CUDA tensors, torch ops, or Triton


def check_backend(backend: str) -> None:
    """``backend`` is one of ``BACKENDS``, and "triton" only where Triton is installed."""
    check_choice("backend", backend, BACKENDS)
    from ..ops.triton_support import triton_available  # here: `import slimopt` does not import Triton

    if backend == "triton" and not triton_available():
        raise ValueError("Invalid backend: 'triton' needs Triton, which is not installed (pip install triton); "
                         "or backend='auto'")


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


def placeholder_names(group_index: int, count: int) -> list[str]:
    """Names for tensors that came without one, by position: ``param_groups[1].params[0]``."""
    return [f"param_groups[{group_index}].params[{i}]" for i in range(count)]


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


NONFINITE_POLICIES = ("skip", "raise")
STEP_BYTES = 4  # every tensor with state keeps a float32 step counter, as torch's AdamW does


class GradFlags(NamedTuple):
    """The non-finite check of some of a param group's gradients (one device), as a hook returns it."""

    indices: list[int]  # positions in the group's ``params``
    # On the gradients' device, one per index: bool, True where the gradient has a NaN or an inf; or (not gated)
    # float, non-finite there (a sum of squares, read as it is: no launch to turn it into a bool). Not gated, it
    # may also be a single value (shape () or (1,)) for all of them: when set, each is looked at on the host.
    bad: Tensor
    gated: bool  # the update reads ``bad`` on the device and leaves those tensors and their state alone


class SlimOptimizer(Optimizer):
    """A ``torch.optim.Optimizer`` with slimopt's shared conventions.

    Subclasses implement ``update_group(group)`` and call ``self.grads(group)`` to iterate over the
    parameters that have a gradient, and ``self.advance_step(state)`` to count steps per tensor.
    Their constructors accept ``nonfinite="skip" | "raise"`` and put it in ``defaults``.

    The non-finite policy, a group setting, is written here once (``_check_nonfinite``):

    * ``"skip"`` (the default): a tensor whose gradient holds a NaN or an inf is left alone in this step, its
      state included, and the other tensors step. On a GPU the decision stays on the device: the method's
      update reads the flags there (``GradFlags.gated``), so the step never waits for the GPU (no host sync).
      Where an update cannot read them (a method's per-tensor reference path), the flags are read back once
      per step and device. ``nonfinite_skips`` counts the skipped tensor-steps (reading it syncs: read it when
      you log, not every step).
    * ``"raise"``: a NaN or inf raises ``FloatingPointError`` naming the parameter, before anything changes.
      It has to know before the update starts, so **it reads the flags back to the host every step: one
      device sync per step and device**; pick it to debug, not for speed on a GPU.

    A method computes its flags in the hook ``nonfinite_flags(group)`` (default: one multi-tensor l2 norm per
    device and dtype, ``core.distributed.nonfinite_flags``); Adam-mini and MicroAdam derive them from a pass
    over the gradients that their step needs anyway. A method whose update already leaves a tensor with a
    non-finite gradient alone returns no flags for a "skip" group (SinkGD and SWAN's matrices).
    """

    # Group settings added after a release: a saved state dict's groups that lack one take this optimizer's
    # value on load (as torch fills in ``foreach``/``fused`` for older state dicts).
    added_group_keys: tuple[str, ...] = ()

    def __init__(self, params: Any, defaults: dict[str, Any]) -> None:
        defaults = {"nonfinite": "skip", **defaults}
        check_choice("nonfinite", defaults["nonfinite"], NONFINITE_POLICIES)
        super().__init__(as_param_groups(params), defaults)

    def add_param_group(self, param_group: dict[str, Any]) -> None:
        if "nonfinite" in param_group:
            check_choice("nonfinite", param_group["nonfinite"], NONFINITE_POLICIES)
        param_group = as_param_groups([param_group])[0] if param_group.get("params") is not None else param_group
        if "param_names" not in param_group and any("param_names" in g for g in self.param_groups):
            # torch refuses to mix named and unnamed groups: name the new tensors by position
            param_group["param_names"] = placeholder_names(len(self.param_groups), len(param_group["params"]))
        super().add_param_group(param_group)

    # -- hooks for subclasses -------------------------------------------------------------------
    def update_group(self, group: dict[str, Any]) -> None:  # pragma: no cover - abstract
        raise NotImplementedError

    def checks_nonfinite(self, group: dict[str, Any]) -> bool:
        """Whether the step checks ``group``'s gradients (False: a "skip" group whose update leaves a tensor
        with a non-finite gradient alone by itself; ``nonfinite_flags`` is then not called for it). Sharded
        gradients that are checked cost one flag in an all-reduce each (``slimopt.comm``)."""
        return True

    def nonfinite_flags(self, group: dict[str, Any]) -> list[GradFlags]:
        """Launch the non-finite check of ``group``'s gradients; nothing is read back here.

        The default: :func:`checked_indices` split by device and dtype, one multi-tensor norm each, not gated
        (the update does not read the flags: the base reads them and ``grads`` leaves the bad tensors out). A
        method that can decide on the device returns ``gated=True`` flags for the tensors whose update reads
        them (and must then leave those tensors alone itself), and may derive the flags from a pass over the
        gradients it needs anyway. For a "raise" group the flags are read back whatever ``gated`` says.
        """
        return self.default_flags(group, self.checked_indices(group))

    # -- the step -----------------------------------------------------------------------------------
    @torch.no_grad()
    def step(self, closure: Callable[[], Any] | None = None) -> Any:
        loss = None
        if closure is not None:
            with torch.enable_grad():
                loss = closure()
        self._check_nonfinite()
        for group in self.param_groups:
            self.update_group(group)
        return loss

    def checked_indices(self, group: dict[str, Any]) -> list[int]:
        """Positions of ``group``'s tensors whose gradient the non-finite check looks at (dense, real,
        non-empty; sparse and complex ones are refused by name in ``grads``)."""
        out = []
        for index, p in enumerate(group["params"]):
            grad = p.grad
            if grad is not None and grad.layout == torch.strided and not grad.is_complex() and grad.numel():
                out.append(index)
        return out

    def default_flags(self, group: dict[str, Any], indices: list[int], gated: bool = False) -> list[GradFlags]:
        """:func:`core.distributed.nonfinite_flags` of the gradients at ``indices``, per device and dtype."""
        subsets: dict[tuple[torch.device, torch.dtype], list[int]] = {}
        for index in indices:
            grad = group["params"][index].grad
            subsets.setdefault((local(grad).device, grad.dtype), []).append(index)
        return [GradFlags(idx, nonfinite_flags([group["params"][i].grad for i in idx]), gated)
                for idx in subsets.values()]

    def _check_nonfinite(self) -> None:
        """The non-finite policy of every group, before anything is updated (see the class docstring).

        Flags that must reach the host (a "raise" group's, and those no update reads) are read back together,
        one ``tolist`` per device, and a flagged gradient is looked at again exactly (a norm can overflow on
        finite values). Gated flags stay on the device for the update (``device_flags``), and are added to the
        skip counter there; a gated norm that overflowed on finite values skips its tensor (its square would
        overflow a second moment anyway).
        """
        self._skipped: set[tuple[int, int]] = set()
        self._gated: dict[int, list[GradFlags]] = {}
        to_host: dict[torch.device, list[tuple[int, GradFlags]]] = {}
        for gi, group in enumerate(self.param_groups):
            if not self.checks_nonfinite(group):
                continue
            raising = group.get("nonfinite", "skip") == "raise"
            for flags in self.nonfinite_flags(group):
                if not flags.indices:
                    continue
                if raising or not flags.gated:
                    to_host.setdefault(flags.bad.device, []).append((gi, flags))
                else:
                    self._gated.setdefault(gi, []).append(flags)
                    self._count_skips(flags.bad)
        bad: list[tuple[int, int]] = []
        for items in to_host.values():  # one read per device
            if len(items) == 1:
                values = items[0][1].bad.tolist()
            else:
                parts = [f.bad.reshape(-1) for _, f in items]
                if len({p.dtype == torch.bool for p in parts}) > 1:  # cat would turn True into 1.0, a finite value
                    parts = [torch.where(p, math.inf, 0.0) if p.dtype == torch.bool else p for p in parts]
                values = torch.cat(parts).tolist()
            values = values if isinstance(values, list) else [values]
            for gi, flags in items:
                n = flags.bad.numel()
                got = [b if isinstance(b, bool) else not math.isfinite(b) for b in values[:n]]
                bad += [(gi, i) for i, b in zip(flags.indices, got * len(flags.indices) if n == 1 else got) if b]
                values = values[n:]
        if not bad:
            return
        bad.sort()
        grads = [self.param_groups[gi]["params"][i].grad for gi, i in bad]
        # a flagged norm may only have overflowed on finite values: look again, exactly (this path syncs anyway)
        really = [w for w, ok in zip(bad, exactly_finite(grads)) if not ok]
        for gi, index in really:
            group = self.param_groups[gi]
            if group.get("nonfinite", "skip") == "raise":
                raise FloatingPointError(
                    f"{type(self).__name__}: non-finite gradient (NaN or inf) for parameter "
                    f"{self.param_name(group, index)}; nothing was updated. Pass nonfinite='skip' to skip such "
                    "tensors instead (the default)")
        self._skipped = set(really)
        self._count_skips(len(self._skipped))

    def device_flags(self, group: dict[str, Any]) -> list[GradFlags]:
        """This step's gated flags of ``group`` (empty when none stayed on the device)."""
        return getattr(self, "_gated", {}).get(self._group_index(group), [])

    def _count_skips(self, bad: Tensor | int) -> None:
        counts = self.__dict__.setdefault("_skip_counts", {})
        if isinstance(bad, int):
            counts["host"] = counts.get("host", 0) + bad
            return
        device = bad.device
        total = bad.sum()
        counts[device] = total if device not in counts else counts[device].add_(total)

    @property
    def nonfinite_skips(self) -> int:
        """Tensor-steps skipped so far because a gradient held a NaN or an inf ("skip" groups). Reading it
        waits for the device (a host sync): read it when you log."""
        return sum(int(v) for v in self.__dict__.get("_skip_counts", {}).values())

    # -- helpers ------------------------------------------------------------------------------------
    def _group_index(self, group: dict[str, Any]) -> int:
        """``group``'s position in ``param_groups`` (-1: not one of them); the policy's records are by position."""
        return next((i for i, g in enumerate(self.param_groups) if g is group), -1)

    def param_name(self, group: dict[str, Any], index: int) -> str:
        names = group.get("param_names")
        if names is not None:
            return str(names[index])
        shape = tuple(group["params"][index].shape)
        return f"param_groups[{self._group_index(group)}]['params'][{index}] (shape {shape})"

    def grads(self, group: dict[str, Any]) -> Iterator[tuple[int, Tensor, Tensor]]:
        """Yield ``(index, param, grad)`` for every parameter of ``group`` that has a gradient to apply
        (not ``None``, not skipped by the non-finite policy in this step)."""
        skipped = getattr(self, "_skipped", None)
        group_index = self._group_index(group) if skipped else -1
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
        """Load state, keeping each saved tensor's dtype bit-exactly (torch would cast it).

        The state dict is checked first against what this optimizer would create for its own parameters
        (``core.state_dict.validate_state_dict``); a state dict from another optimizer, another model or a
        damaged file raises ``ValueError`` and leaves the optimizer exactly as it was.
        """
        state_dict = self._with_added_group_keys(state_dict)
        validate_state_dict(self, state_dict)
        saved_ids = [i for g in state_dict["param_groups"] for i in g["params"]]
        params = [p for g in self.param_groups for p in g["params"]]
        super().load_state_dict(state_dict)
        saved_state = state_dict["state"]
        for saved_id, p in zip(saved_ids, params):
            if saved_id in saved_state and p in self.state:
                self.state[p] = restore_dtypes(saved_state[saved_id], self.state[p])

    def _with_added_group_keys(self, state_dict: Any) -> Any:
        """``state_dict`` with each of ``added_group_keys`` that a saved group lacks taken from this optimizer's
        group (a malformed state dict is left for ``validate_state_dict`` to name)."""
        groups = state_dict.get("param_groups") if isinstance(state_dict, dict) else None
        if not self.added_group_keys or not isinstance(groups, (list, tuple)) or len(groups) != len(self.param_groups):
            return state_dict
        filled = []
        for saved, mine in zip(groups, self.param_groups):
            if isinstance(saved, dict):
                saved = {**{k: mine[k] for k in self.added_group_keys if k in mine and k not in saved}, **saved}
            filled.append(saved)
        return {**state_dict, "param_groups": filled}
