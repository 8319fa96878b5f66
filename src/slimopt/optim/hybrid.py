"""Hybrid routing for SinkGD and SWAN: hidden matrices take the matrix update, the rest AdamW.

Both papers apply their normalised, stateless update only to the linear weights of attention (q, k, v,
o) and of the MLP; token embeddings, the output head, norm gains and biases are trained with Adam
(applying SinkGD to the embeddings as well is known to fail badly). This module holds

* ``routing_rules(conv_as_matrix)``: that split as a rule set over the shared parameter plan
  (``slimopt.plans.param_plan``: roles from names and shapes -> rule ``"stateless"`` or ``"adamw"``);
* ``MatrixAdamWHybrid``: the bookkeeping SinkGD and SWAN share. It routes every tensor to one
  of two kinds of param group, runs the AdamW fallback (``slimopt.ops.adamw``) on ``"adamw"`` groups,
  and hands each matrix of a ``"stateless"`` group to the subclass's ``update_matrix`` (the rule keeps the
  papers' name; a subclass may keep per-matrix state, ``matrix_state``);
* ``routed_state_bytes``: the state bytes of one tensor under that routing, which SinkGD's and SWAN's
  formulas share.

How a tensor is routed, in order of precedence:

1. a group marked ``"update": "stateless" | "adamw"`` (or ``"use_adamw": True | False``): all its tensors;
2. a group built by a plan (``param_rules`` lists, e.g. from ``from_model``): each tensor's rule;
3. otherwise (``"update": "auto"``, the default): tensors with names are classified by the plan's rules
   (so ``SinkGD(model.named_parameters())`` routes like the papers); nameless tensors by shape only:
   matrices stateless, everything else AdamW. With bare ``model.parameters()`` an embedding is a matrix
   too: pass names, use ``create_optimizer``/``from_model``, or mark the groups.

An ``"auto"`` group that holds both kinds is split into two torch param groups (stateless first), so
each has its own ``lr`` that schedulers scale. AdamW tensors use ``adamw_lr`` / ``adamw_weight_decay``
(group key, else constructor argument) and, when neither is set, the group's ``lr`` / ``weight_decay``
(the papers' convention: one global lr, multiplied by ``scale`` on the stateless matrices).

A step in few launches, and no host sync in the update:

* the matrices of a group are bucketed by shape (``bucket_key``) and each bucket is handed to the
  method's ``update_matrices``, which SinkGD and SWAN implement with stacked kernels (one launch per
  operation for up to ``stack_numel`` elements; see ``slimopt.ops.normalize``). ``update_matrix`` is
  the per-matrix reference they are tested against, and SinkGD's path for a matrix sharded by FSDP2
  (whose column sums take collectives; SWAN stacks the gathered gradients of sharded matrices);
* the AdamW tensors of a group and device go through one fused multi-tensor kernel
  (``slimopt.ops.adamw.adamw_multi``), their step counters through one multi-tensor add; a counter lives
  on its parameter's accelerator (as torch's fused AdamW keeps it), on the CPU for CPU parameters;
* the non-finite policy is the base class's (``SlimOptimizer``); this class's hook needs no check at all for a
  "skip" matrix group: a matrix whose gradient or update is non-finite is left unchanged by the matrix update
  itself, branch-free, and the AdamW tensors of a "skip" group and device skip the step together when any of
  their gradients is non-finite (its flags, on the device, become fused AdamW's ``found_inf``; telling them
  apart would need the flags on the host or a launch per tensor). With every group on "skip" (the default), a
  step has no host sync and can be captured in a CUDA graph (with a tensor lr on the device). A "raise" group's
  flags are read back once per step (it must raise before anything changes).
"""

from __future__ import annotations

import math
import warnings
import weakref
from collections.abc import Callable, Iterator, Mapping
from typing import Any, NamedTuple

import torch
from torch import Tensor

from ..core.base import (
    GradFlags,
    SlimOptimizer,
    check_betas,
    check_choice,
    check_lr,
    check_nonnegative,
    placeholder_names,
)
from ..core.scratch import Scratch
from ..ops.adamw import adamw_multi
from ..ops.weight_decay import decay_factor
from ..plans.param_plan import HIDDEN_ROLES, BlockFacts, ParamInfo, ParamPlan, RuleSet
from .adamw import adamw_state_bytes

__all__ = ["ADAMW", "STATELESS", "MatrixAdamWHybrid", "MatrixView", "matrix_dims", "routed_state_bytes",
           "routing_facts", "routing_rules"]

STATELESS = "stateless"  # the rule of the matrix update (the papers' name; param groups and overrides hold it)
ADAMW = "adamw"
_UPDATES = ("auto", STATELESS, ADAMW)


# --------------------------------------------------------------------------------------------------
# the rule set


def routing_facts(info: ParamInfo, rule: str, conv_as_matrix: bool = False) -> BlockFacts:
    """Check ``rule`` against the tensor's shape; a stateless tensor gets its ``matrix`` view (rows, cols).

    Rows are the output dimension (``out_dim``; GPT-2's Conv1D stores ``(in, out)``). A tensor of 3 or more
    dimensions is a ``(out, in*kh*kw)`` matrix when ``conv_as_matrix``; otherwise it falls back to AdamW.
    """
    shape, numel = info.shape, info.numel
    if rule not in (STATELESS, ADAMW):
        raise ValueError(f"unknown routing rule {rule!r} (must be {STATELESS!r} or {ADAMW!r})")
    conv = conv_as_matrix and len(shape) > 2 and info.role not in ("embedding", "head")
    if rule == ADAMW and not conv:
        return BlockFacts(1, numel)
    if len(shape) == 2:
        rows = shape[info.out_dim]
        return BlockFacts(1, numel, {"matrix": [rows, numel // rows if rows else 0]})
    if conv:
        return BlockFacts(1, numel, {"matrix": [shape[0], numel // shape[0] if shape[0] else 0]}, rule=STATELESS)
    if len(shape) > 2:
        return BlockFacts(1, numel, rule=ADAMW,
                      note=f"a {len(shape)}-D tensor takes AdamW (pass conv_as_matrix=True for (out, rest))")
    raise ValueError(f"the stateless update needs a matrix, got a {len(shape)}-D tensor")


def routing_rules(conv_as_matrix: bool = False) -> RuleSet:
    """Role -> ``"stateless"`` for the hidden weights the papers update with it (attention, MLP, other hidden
    matrices and convolutions: ``HIDDEN_ROLES``), ``"adamw"`` for everything else."""
    return RuleSet(
        "sinkgd/swan routing",
        {role: STATELESS for role in sorted(HIDDEN_ROLES)},
        facts=lambda info, rule: routing_facts(info, rule, conv_as_matrix),
        default=ADAMW,
        extra_rules=(STATELESS, ADAMW),
    )


def routed_state_bytes(t: ParamInfo, *, param_bytes: int, conv_as_matrix: bool, matrix_bytes: int = 0) -> int:
    """State bytes of one tensor under the routing: ``matrix_bytes`` for a matrix it sends to the matrix update
    (none for a stateless method), AdamW's m and v in the parameter dtype + the step for the rest."""
    rules = routing_rules(conv_as_matrix)
    rule = rules.rule_for(t.role)
    if (rules.facts(t, rule).rule or rule) == STATELESS:
        return matrix_bytes
    return adamw_state_bytes(t, param_bytes=param_bytes)


def matrix_dims(group: dict[str, Any], index: int, shape: tuple[int, ...]) -> tuple[int, int, bool] | None:
    """(rows, cols, transposed) of the matrix view of a stateless tensor (rows = output dimension), or None
    for a tensor on AdamW. ``transposed``: the view is the stored tensor's transpose (GPT-2's Conv1D)."""
    if group.get("update") != STATELESS:
        return None
    facts = group.get("param_layouts")  # per tensor its plan facts (the key old state dicts hold)
    matrix = facts[index].get("matrix") if facts is not None else None
    transposed = matrix is not None and len(shape) == 2 and matrix[0] != shape[0]
    rows, cols = (shape[1], shape[0]) if transposed else (shape[0], math.prod(shape[1:]))
    return rows, cols, transposed


def _shape_rule(p: Tensor, conv_as_matrix: bool) -> str:
    return STATELESS if p.ndim == 2 or (conv_as_matrix and p.ndim > 2) else ADAMW


# --------------------------------------------------------------------------------------------------
# the shared optimizer


def _is_named(x: Any) -> bool:
    return isinstance(x, tuple) and len(x) == 2 and isinstance(x[0], str)


class MatrixView(NamedTuple):
    """One hidden matrix as the matrix update sees it."""

    param: Tensor  # (rows, cols) view of the parameter, the same object every step
    grad: Tensor  # the same view of its gradient
    state: dict[str, Any] | None  # the tensor's state (``optimizer.state[p]``); None if the method keeps none
    index: int  # its position in the param group


def _as_matrix(t: Tensor, out_dim: int) -> Tensor:
    """(out, rest) view; never a copy for a parameter (``view`` raises rather than update a copy)."""
    if t.ndim == 2:
        return t.t() if out_dim == 1 else t
    return t.view(t.shape[0], -1)


def _step_device(p: Tensor) -> torch.device:
    """Where a tensor's AdamW step counter lives: on its accelerator (as torch's fused AdamW keeps it: no
    copy per step, capturable), on the CPU for CPU (and shape-only "meta") tensors."""
    return p.device if p.device.type not in ("cpu", "meta") else torch.device("cpu")


class MatrixAdamWHybrid(SlimOptimizer):
    """A matrix update for hidden matrices + AdamW for the rest; subclasses implement ``update_matrix``
    (one matrix) or ``update_matrices`` (a bucket of same-shaped matrices at once), and keep per-matrix state
    when they set ``matrix_state``."""

    matrix_state = False  # True: the matrix update keeps per-tensor state (momentum, projectors) in ``state``
    # The most elements a stacked matrix update puts in one stack, per device type (default: other
    # types); a matrix larger than that is a stack of its own. It bounds the fp32 scratch (a method
    # keeps two or three stacks: 2^26 elements are 256 MB each, whatever the model's size) and sets how
    # many matrices share a launch. CPU: 2^21 (8 MB), so that the Sinkhorn products re-read a stack from
    # the last-level cache (measured on step42m, 2 threads: 1.4-2.8 ns per element at <= 8 MB stacks,
    # ~5 ns at 16 MB; smaller stacks cost more launches, which a busy CPU makes expensive).
    stack_numel: dict[str, int] = {"cpu": 1 << 21}
    default_stack_numel = 1 << 26

    def __init__(self, params: Any, defaults: dict[str, Any], *, adamw_lr: float | None,
                 adamw_betas: tuple[float, float], adamw_eps: float, adamw_weight_decay: float | None,
                 conv_as_matrix: bool) -> None:
        check_lr(defaults["lr"])
        check_nonnegative("weight_decay", defaults["weight_decay"])
        if adamw_lr is not None:
            check_lr(adamw_lr, "adamw_lr")
        check_betas(adamw_betas, "adamw_betas")
        check_nonnegative("adamw_eps", adamw_eps)
        if adamw_weight_decay is not None:
            check_nonnegative("adamw_weight_decay", adamw_weight_decay)
        self._conv_as_matrix = bool(conv_as_matrix)
        defaults = {**defaults, "update": "auto", "adamw_lr": adamw_lr, "adamw_betas": tuple(adamw_betas),
                    "adamw_eps": adamw_eps, "adamw_weight_decay": adamw_weight_decay,
                    "conv_as_matrix": self._conv_as_matrix}
        self.plan: ParamPlan | None = None
        self._views: dict[int, tuple[weakref.ref[Tensor], Tensor]] = {}  # id(p) -> (p, its matrix view)
        super().__init__(params, defaults)

    # -- construction from a model ------------------------------------------------------------------
    @classmethod
    def from_model(cls, model: torch.nn.Module, lr: float | Tensor | None = None, weight_decay: float = 0.0, *,
                   overrides: Mapping[str, str] | None = None, print_plan: bool = False,
                   conv_as_matrix: bool = False, **kwargs: Any) -> MatrixAdamWHybrid:
        """Route ``model``'s trainable tensors by name and shape (``slimopt.plans.param_plan``) and build the optimizer.

        ``overrides`` maps a name or ``fnmatch`` pattern to a role or to ``"stateless"``/``"adamw"``;
        ``print_plan`` prints the routing table. The plan is kept as ``optimizer.plan``.
        """
        # the tensors that need a look are reported once: in the printed table, else in a warning
        plan = ParamPlan.build(model, routing_rules(conv_as_matrix), overrides=overrides, warn=not print_plan)
        if lr is not None:
            kwargs["lr"] = lr
        opt = cls(plan.param_groups(), weight_decay=weight_decay, conv_as_matrix=conv_as_matrix, **kwargs)
        opt.plan = plan
        if print_plan:
            print(opt.routing_table())
        return opt

    # -- param groups: every group is either all-stateless or all-AdamW --------------------------------
    def add_param_group(self, param_group: dict[str, Any]) -> None:
        group = dict(param_group)
        params = group.pop("params")
        params = [params] if isinstance(params, Tensor) else list(params)
        names = group.pop("param_names", None)
        if params and all(_is_named(x) for x in params):
            names, params = [n for n, _ in params], [p for _, p in params]
        if names is None and self.param_groups and "param_names" in self.param_groups[0]:
            names = placeholder_names(len(self.param_groups), len(params))
        update = self._update_of(group)
        conv = self._conv_as_matrix
        if update != "auto":
            rules = [update] * len(params)
        elif "param_rules" in group:
            rules = list(group["param_rules"])
        elif names is not None:
            planned = ParamPlan.build(list(zip(names, params)), routing_rules(conv), warn=False).rules()
            rules = [planned.get(n) or _shape_rule(p, conv) for n, p in zip(names, params)]
        else:
            rules = [_shape_rule(p, conv) for p in params]
        for rule in rules:
            check_choice("param rule", rule, (STATELESS, ADAMW))
        per_param = {k: v for k, v in group.items()
                     if k.startswith("param_") and isinstance(v, list) and len(v) == len(params)}
        shared = {k: v for k, v in group.items() if k not in per_param}
        kinds = [r for r in (STATELESS, ADAMW) if r in rules] or [STATELESS if update == "auto" else update]
        for kind in kinds:
            keep = [i for i, r in enumerate(rules) if r == kind]
            sub = dict(shared)
            sub["params"] = [params[i] for i in keep]
            if names is not None:
                sub["param_names"] = [names[i] for i in keep]
            for key, values in per_param.items():
                sub[key] = [values[i] for i in keep]
            sub["update"] = kind
            if kind == ADAMW:
                self._resolve_adamw(sub)
            else:
                self._check_stateless(sub)
            super().add_param_group(sub)

    def _update_of(self, group: dict[str, Any]) -> str:
        use_adamw = group.pop("use_adamw", None)
        update = group.get("update", "auto")
        check_choice("update", update, _UPDATES)
        if use_adamw is not None:
            marked = ADAMW if use_adamw else STATELESS
            if update not in ("auto", marked):
                raise ValueError(f"param group says update={update!r} but use_adamw={use_adamw!r}")
            update = marked
        return update

    def _resolve_adamw(self, group: dict[str, Any]) -> None:
        """AdamW tensors: ``adamw_lr``/``adamw_weight_decay`` (group, then constructor), else lr/wd."""
        for key in ("lr", "weight_decay"):
            own = group.get(f"adamw_{key}", self.defaults.get(f"adamw_{key}"))
            if own is not None:
                group[key] = own
        if "betas" in group:  # a user-marked AdamW group may say betas/eps the usual way
            group["adamw_betas"] = tuple(group.pop("betas"))
        if "eps" in group and "adamw_eps" not in group:
            group["adamw_eps"] = group.pop("eps")
        if "lr" in group:
            check_lr(group["lr"])
        if "weight_decay" in group:
            check_nonnegative("weight_decay", group["weight_decay"])
        if "adamw_betas" in group:
            check_betas(group["adamw_betas"], "adamw_betas")

    def _check_stateless(self, group: dict[str, Any]) -> None:
        if "lr" in group:
            check_lr(group["lr"])
        if "weight_decay" in group:
            check_nonnegative("weight_decay", group["weight_decay"])

    # -- the step -------------------------------------------------------------------------------------
    def update_group(self, group: dict[str, Any]) -> None:
        if group["update"] == ADAMW:
            self._adamw_step(group)
            return
        # same-shaped matrices (the layers' q/k/v/o, gate/up, down) form one bucket, in a fixed order that
        # every rank shares (global shapes), so that a method can update a bucket with batched ops
        buckets: dict[tuple[Any, ...], list[MatrixView]] = {}
        for index, p, grad in self.grads(group):
            view = self._matrix_view(group, index, p, grad)
            buckets.setdefault(self.bucket_key(view), []).append(view)
        for views in buckets.values():
            self.update_matrices(views, group)

    def bucket_key(self, view: MatrixView) -> tuple[Any, ...]:
        """Which matrices ``update_matrices`` gets together: by default the same (rows, cols), dtype and
        device. A method that handles a tall matrix as its transpose may key on the sorted shape."""
        return tuple(view.param.shape), view.param.dtype, str(view.param.device)

    def _matrix_view(self, group: dict[str, Any], index: int, p: Tensor, grad: Tensor) -> MatrixView:
        """The (rows, cols) view of ``p`` (rows: output neurons) and of its gradient, with the tensor's state.

        The parameter's view is made once and kept (``self._views``): the same tensor object every step,
        so a method may key per-matrix buffers on it. GPT-2's Conv1D stores (in, out): the view is the
        transpose; a 3-D+ weight under ``conv_as_matrix`` is (out, in*kh*kw).
        """
        facts = group.get("param_layouts")
        out_dim = facts[index].get("out_dim", 0) if facts is not None else 0
        if p.ndim < 2:
            raise RuntimeError(f"{type(self).__name__}: the stateless update needs a matrix, but "
                               f"{self.param_name(group, index)} has shape {tuple(p.shape)}; mark its "
                               "group update='adamw'")
        owner, view = self._views.get(id(p), (None, None))
        if owner is None or owner() is not p:  # first step, or a new tensor (FSDP2 swapped it) at that id
            view = _as_matrix(p, out_dim)
            self._views[id(p)] = (weakref.ref(p), view)
        state = self.state[p] if self.matrix_state else None  # a stateless method leaves optimizer.state empty
        return MatrixView(view, _as_matrix(grad, out_dim), state, index)

    def update_matrices(self, views: list[MatrixView], group: dict[str, Any]) -> None:
        """Update same-shaped matrices, in place. The default updates one at a time; a method overrides
        this to batch them (one launch for the whole bucket)."""
        for view in views:
            self.update_matrix(view.param, view.grad, group, view.state)

    def update_matrix(self, param: Tensor, grad: Tensor, group: dict[str, Any], state: dict[str, Any] | None
                      ) -> None:
        """Apply the method's update to one (rows, cols) matrix view, in place. ``state``: the tensor's own
        state dict when the class sets ``matrix_state`` (a momentum, a projector live there), else None."""
        raise NotImplementedError  # pragma: no cover - abstract

    def scratch(self, like: Tensor) -> Tensor:
        """An fp32 work buffer shaped like ``like``, valid until the next call.

        One flat buffer per device (``core.scratch.Scratch``), the size of the largest request seen, reused by
        every matrix and every step: a fresh multi-MB temporary per matrix costs page faults that outweigh the
        arithmetic of a memory-bound update on CPU. It is scratch, not state (not saved, not in ``state_bytes``).
        """
        return self._scratch_on(like.device).like(like)

    def workspace(self, device: torch.device, key: tuple[Any, ...], numel: int, build: Callable[[Tensor], Any]
                  ) -> Any:
        """Views into the scratch buffer, made once per ``key`` by ``build(flat)`` (``flat``: ``numel``
        fp32 elements) and kept: a step then makes no views (each one is a dispatched op) and the
        addresses stay fixed from step to step (what a CUDA graph needs). Valid until the next call that
        grows the buffer; the same buffer serves ``scratch``."""
        return self._scratch_on(device).views(key, numel, build)

    def _scratch_on(self, device: torch.device) -> Scratch:
        scratches = self.__dict__.setdefault("_scratches", {})  # not in the state dict, not pickled
        found = scratches.get(device)
        if found is None:
            found = scratches[device] = Scratch(device)
        return found

    @staticmethod
    def decay_factor(group: dict[str, Any]) -> float | Tensor | None:
        """The matrices' weight-decay factor 1 - lr * scale * weight_decay (``ops.weight_decay``; None without
        decay); a 0-d tensor for a tensor lr."""
        weight_decay = group["weight_decay"]
        if weight_decay == 0:
            return None
        return decay_factor(group["lr"], weight_decay, group["scale"])

    def decay_where(self, param: Tensor, group: dict[str, Any], ok: Tensor) -> None:
        """The per-matrix reference's weight decay: ``param *= decay_factor`` where ``ok``, else unchanged (no host
        sync)."""
        factor = self.decay_factor(group)
        if factor is not None:
            param.mul_(torch.where(ok, factor, 1.0))

    def stack_chunks(self, views: list[MatrixView], numel_each: int) -> Iterator[list[MatrixView]]:
        """``views`` in consecutive chunks of at most ``stack_numel`` elements (at least one matrix each),
        of near-equal sizes (so that a bucket needs at most two shapes of work buffers)."""
        device = views[0].param.device
        cap = self.stack_numel.get(device.type, self.default_stack_numel)
        per = max(1, cap // max(1, numel_each))
        count = -(-len(views) // per)
        size = -(-len(views) // count)
        for start in range(0, len(views), size):
            yield views[start:start + size]

    def _adamw_step(self, group: dict[str, Any]) -> None:
        """One fused multi-tensor AdamW launch per device (``adamw_multi``), one multi-tensor add of the
        step counters, nothing read back to the host (a "skip" group's flag goes in as ``found_inf``)."""
        per_device: dict[torch.device, tuple[list[Tensor], ...]] = {}
        for _, p, grad in self.grads(group):
            state = self.state[p]
            where = _step_device(p)
            if not state:
                state["exp_avg"] = torch.zeros_like(p, memory_format=torch.preserve_format)
                state["exp_avg_sq"] = torch.zeros_like(p, memory_format=torch.preserve_format)
                state["step"] = torch.zeros((), dtype=torch.float32, device=where)
            elif state["step"].device != where:  # loaded from a state dict (torch keeps it on the CPU)
                state["step"] = state["step"].to(device=where, dtype=torch.float32)
            lists = per_device.setdefault(p.device, ([], [], [], [], []))
            for target, value in zip(lists, (p, grad, state["exp_avg"], state["exp_avg_sq"], state["step"])):
                target.append(value)
        beta1, beta2 = group["adamw_betas"]
        found: dict[torch.device, Tensor] = {}  # "skip": any gradient of the group on that device non-finite
        for flags in self.device_flags(group):
            device = flags.bad.device
            seen = flags.bad.any()
            found[device] = seen if device not in found else found[device].logical_or_(seen)
        for device, (params, grads, exp_avgs, exp_avg_sqs, steps) in per_device.items():
            found_inf = found[device].to(torch.float32) if device in found else None
            if found_inf is None:
                torch._foreach_add_(steps, 1)
            else:  # a skipped step leaves the counters as they were
                torch._foreach_add_(steps, [1 - found_inf] * len(steps))
            adamw_multi(params, grads, exp_avgs, exp_avg_sqs, steps, lr=group["lr"], beta1=beta1,
                        beta2=beta2, eps=group["adamw_eps"], weight_decay=group["weight_decay"],
                        found_inf=found_inf)

    # -- the non-finite check -------------------------------------------------------------------------
    def nonfinite_flags(self, group: dict[str, Any]) -> list[GradFlags]:
        """The non-finite check (``SlimOptimizer``): a "skip" matrix group needs none (the matrix update leaves a
        matrix whose update comes out non-finite unchanged, per matrix, on the device); a "skip" AdamW group's
        flags stay on the device, where they become fused AdamW's ``found_inf`` (its tensors on that device skip
        the step together: telling them apart would need the flags on the host or a launch per tensor). A
        "raise" group's flags are read back by the base class (the one host sync of such a step). Not called for a
        "skip" matrix group (``checks_nonfinite``)."""
        return self.default_flags(group, self.checked_indices(group), gated=group.get("nonfinite", "skip") == "skip")

    def checks_nonfinite(self, group: dict[str, Any]) -> bool:
        return not (group.get("nonfinite", "skip") == "skip" and group.get("update") == STATELESS)

    def grads_checked(self, group: dict[str, Any]) -> bool:
        """Whether every gradient this step hands to ``update_matrices`` for ``group`` was checked finite on the
        host (a "raise" group's): else a non-finite one may come, which the update must leave alone itself."""
        return group.get("nonfinite", "skip") == "raise"

    # -- reporting --------------------------------------------------------------------------------------
    def routing_table(self) -> str:
        """One line per tensor: name, shape, role and what decided it (when planned), update rule and its
        group's lr; then the totals and the plan's report of tensors that need a look."""
        plan_rows = {r.name: r for r in self.plan} if self.plan is not None else {}
        rows = [("parameter", "shape", "role", "from", "update", "lr")]
        totals = {STATELESS: 0, ADAMW: 0}
        for gi, group in enumerate(self.param_groups):
            names = group.get("param_names") or placeholder_names(gi, len(group["params"]))
            for name, p in zip(names, group["params"]):
                row = plan_rows.get(name)
                rows.append((name, "x".join(map(str, p.shape)) or "()", row.role if row else "-",
                             (row.basis or "-") if row else "-", group["update"], f"{float(group['lr']):g}"))
                totals[group["update"]] += p.numel()
        widths = [max(len(r[i]) for r in rows) for i in range(len(rows[0]))]
        lines = ["  ".join(c.ljust(w) for c, w in zip(r, widths)).rstrip() for r in rows]
        lines.insert(1, "  ".join("-" * w for w in widths))
        lines.append(f"{totals[STATELESS]} elements stateless, {totals[ADAMW]} elements on AdamW")
        if self.plan is not None and self.plan.notes:
            lines.append(self.plan.report())
        return "\n".join(lines)


_RENAMED = {"HybridStatelessOptimizer": "MatrixAdamWHybrid", "routing_layout": "routing_facts"}


def __getattr__(name: str) -> Any:
    """The names of slimopt 0.1, with a ``FutureWarning``."""
    if name in _RENAMED:
        warnings.warn(f"slimopt.optim.hybrid.{name} is now {_RENAMED[name]}", FutureWarning, stacklevel=2)
        return globals()[_RENAMED[name]]
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
