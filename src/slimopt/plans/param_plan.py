"""Parameter plans: what each named tensor *is*, and which rule of an optimizer updates it.

Some methods need to know a tensor's part in the Transformer before they can update it: one cuts every tensor
into Hessian blocks (heads, rows, whole tensor), others send hidden matrices to a matrix update and everything
else to AdamW. That is one concept built once:

1. **Roles** (``plans.roles``, ``plans.module_facts``): what a tensor is, one of :data:`ROLES`. When a module is
   given, its module *types* and shapes decide first (:func:`module_facts`); then the *names* refine this for
   known architectures (``classify(name, shape)``, a pure function), and where names recognise a tensor, they win.

2. **Shape facts** (:class:`ParamInfo`): the output dimension (``1`` for the transposed ``Conv1D``
   storage of GPT-2, where a weight is ``(in, out)``), the attention geometry read from ``model.config``
   or keyword arguments (``plans.attention.AttentionShape``: heads, kv heads, head_dim, hidden size) and, for a
   fused QKV tensor, the order of q, k and v along the output dimension. Decisions use *global* shapes
   (``p.shape`` of a DTensor is global).

3. **Rule sets** (:class:`RuleSet`): a small table ``role -> rule`` plus a ``facts`` function that
   checks the shape against the rule and returns the rule's facts (number of blocks, block size, any
   extra keys). A shape that contradicts its rule raises ``ValueError`` naming the parameter. Each optimizer that
   needs one writes its rule set beside its class (``slimopt.optim``), e.g.::

       def my_facts(info: ParamInfo, rule: str) -> BlockFacts:
           if rule == "stateless" and len(info.shape) != 2:
               raise ValueError(f"stateless needs a matrix, got shape {info.shape}")
           return BlockFacts(n_blocks=1, block_size=info.numel)

       ROUTING = RuleSet("routing", {"mlp": "stateless", ...}, facts=my_facts, default="adamw")

4. **The plan** (:class:`ParamPlan`, this module): ``ParamPlan.build(model_or_pairs_or_groups, rule_set,
   overrides=...)`` gives one :class:`PlanRow` per tensor, ``plan.table()`` prints them, ``overrides`` maps a name
   (or an ``fnmatch`` pattern) to a role or a rule, and ``plan.param_groups(**defaults)`` returns torch param
   groups whose per-parameter metadata lives *inside the group*, in lists aligned with ``group["params"]``
   (``param_names``, ``param_roles``, ``param_rules``, and ``param_layouts``: each tensor's facts dict, the key
   the state dicts of slimopt 0.1 hold). FSDP2 or Accelerate may swap the parameter objects; the group keeps
   what the optimizer needs.
"""

from __future__ import annotations

import fnmatch
import textwrap
import warnings
from collections.abc import Callable, Iterator, Mapping
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import Tensor

from .attention import AttentionShape, gpt2_family, qkv_order, stored_transposed, with_module_geometry
from .module_facts import ModuleFacts, combine_roles, module_classes, module_facts
from .roles import HIDDEN_ROLES, ROLE_FALLBACK, ROLES, classify

__all__ = [
    "BlockFacts",
    "ParamInfo",
    "ParamPlan",
    "PlanRow",
    "ROLES_ONLY",
    "RuleSet",
    "named_tensors",
    "param_infos",
    # defined in plans.roles, plans.attention and plans.module_facts, and importable from here as before
    "HIDDEN_ROLES",
    "ROLES",
    "ROLE_FALLBACK",
    "AttentionShape",
    "ModuleFacts",
    "classify",
    "module_facts",
]


# --------------------------------------------------------------------------------------------------
# shape facts and rule sets


@dataclass(frozen=True)
class ParamInfo:
    """What a rule set's ``facts`` function sees about one tensor."""

    name: str
    shape: tuple[int, ...]
    role: str
    out_dim: int  # the dimension that indexes output neurons / tokens (1 for GPT-2 Conv1D weights)
    attention: AttentionShape
    qkv_order: str | None = None  # "concat" ([q|k|v]) or "grouped" (per kv group [q.. k v], NeoX/Falcon)

    @property
    def numel(self) -> int:
        n = 1
        for s in self.shape:
            n *= s
        return n


@dataclass(frozen=True)
class BlockFacts:
    """A rule's facts for one tensor: how many blocks, of what size, plus rule-specific extras."""

    n_blocks: int
    block_size: int  # elements per block (a rule with blocks of several sizes reports the largest)
    extra: dict[str, Any] = field(default_factory=dict)
    rule: str | None = None  # set when the rule set had to fall back to another rule ...
    note: str | None = None  # ... and why (the plan gathers all notes into one warning)


@dataclass(frozen=True)
class RuleSet:
    """A rule set = ``rules`` (role -> rule) + ``facts(info, rule)`` that checks shapes and gives the rule's facts.

    ``facts`` raises ``ValueError`` when the shape contradicts the rule (the plan adds the name).
    ``extra_rules`` are rules that no role maps to by default but an override may pick.
    """

    name: str
    rules: Mapping[str, str]
    facts: Callable[[ParamInfo, str], BlockFacts]
    default: str = "other"
    extra_rules: tuple[str, ...] = ()

    def rule_for(self, role: str) -> str:
        """The rule of ``role``; a role without a rule here is looked up as its :data:`ROLE_FALLBACK`
        (``hidden``, ``conv`` -> ``mlp``), then the default."""
        if role in self.rules:
            return self.rules[role]
        fallback = ROLE_FALLBACK.get(role)
        return self.rules.get(fallback, self.default) if fallback else self.default

    @property
    def known_rules(self) -> set[str]:
        return {*self.rules.values(), self.default, *self.extra_rules}


@dataclass(frozen=True)
class PlanRow:
    name: str
    shape: tuple[int, ...]
    role: str
    rule: str
    n_blocks: int
    block_size: int
    out_dim: int
    extra: dict[str, Any] = field(default_factory=dict)
    source: str = "auto"  # "auto" or "override"
    basis: str = ""  # what decided the role: "name", a module type ("Linear", "Linear: last, 64 -> 10"), ...
    module: str = ""  # the owning module's class name, when a module was given

    @property
    def numel(self) -> int:
        return _numel(self.shape)

    def facts_dict(self) -> dict[str, Any]:
        """The JSON-able facts an optimizer keeps in its param group for this tensor."""
        return {"rule": self.rule, "role": self.role, "out_dim": self.out_dim, "n_blocks": self.n_blocks,
                "block_size": self.block_size, **self.extra}


# --------------------------------------------------------------------------------------------------
# sources: a model, (name, tensor) pairs, or param groups with names

_NEEDS_NAMES = "a plan needs named tensors: a module, (name, tensor) pairs or groups with param_names"


def named_tensors(source: Any) -> tuple[list[tuple[str, Tensor]], list[dict[str, Any]] | None]:
    """``(name, tensor)`` pairs from a module (trainable only), pairs, or groups with ``param_names``.

    Returns the pairs and, when ``source`` was a list of groups, those groups (for ``param_groups``).
    """
    if isinstance(source, torch.nn.Module):
        return [(n, p) for n, p in source.named_parameters() if p.requires_grad], None
    if isinstance(source, Tensor):
        raise TypeError(_NEEDS_NAMES)
    items = list(source)
    if items and all(isinstance(g, dict) for g in items):
        pairs = []
        for gi, g in enumerate(items):
            params = g["params"]
            params = [params] if isinstance(params, Tensor) else list(params)
            if "param_names" in g:
                names = list(g["param_names"])
                if len(names) != len(params):
                    raise ValueError(f"param group {gi}: {len(names)} param_names for {len(params)} params")
                pairs.extend(zip(names, params))
            elif params and all(isinstance(x, tuple) and len(x) == 2 for x in params):
                pairs.extend(params)
            else:
                raise ValueError(f"param group {gi} has no 'param_names': a plan needs every tensor's name")
        return pairs, items
    if not all(isinstance(x, tuple) and len(x) == 2 and isinstance(x[0], str) for x in items):
        raise TypeError(_NEEDS_NAMES)
    return items, None


def _classified(pairs: list[tuple[str, Tensor]], config: Any, module_types: Mapping[str, str],
                attention: AttentionShape, overrides: Mapping[str, str], used: set[str],
                facts: Mapping[str, ModuleFacts] | None = None
                ) -> Iterator[tuple[ParamInfo, str | None, str, str]]:
    """``(info, rule from an override or None, "auto" | "override", basis)`` per tensor; tied weights once
    (the first name wins, as ``named_parameters``). Adds the override keys that matched to ``used``.
    ``facts``: what module types say (:func:`module_facts`), when a module was given."""
    facts = facts or {}
    gpt2 = gpt2_family(pairs, config)
    seen: set[int] = set()
    for name, p in pairs:
        if id(p) in seen:
            continue
        seen.add(id(p))
        shape = tuple(int(s) for s in p.shape)  # global shape, also for a DTensor
        own = facts.get(name)
        role, basis = combine_roles(classify(name, shape, config), own)
        rule = None
        kind = "auto"
        for key, value in overrides.items():
            if key == name or fnmatch.fnmatchcase(name, key):
                used.add(key)
                kind = basis = "override"
                if value in ROLES:
                    role = value
                else:
                    rule = value
        transposed = stored_transposed(name, shape, module_types.get(name), gpt2)
        geometry = with_module_geometry(attention, own.attention if own else None)
        info = ParamInfo(name=name, shape=shape, role=role, out_dim=1 if transposed else 0, attention=geometry,
                         qkv_order=qkv_order(name, config) if role == "qkv" else None)
        yield info, rule, kind, basis


def param_infos(source: Any, *, config: Any = None, num_heads: int | None = None, num_kv_heads: int | None = None,
                head_dim: int | None = None, hidden_size: int | None = None) -> list[ParamInfo]:
    """The shape facts of every tensor of ``source`` (a module, named pairs or named groups), no rule set
    applied: what the analytic memory formulas read. Meta tensors work (nothing is allocated)."""
    pairs, _, config, module_types, facts, attention = _read_source(
        source, config, num_heads=num_heads, num_kv_heads=num_kv_heads, head_dim=head_dim, hidden_size=hidden_size)
    return [info for info, *_ in _classified(pairs, config, module_types, attention, {}, set(), facts)]


def _read_source(source: Any, config: Any, **geometry: int | None) -> tuple[Any, ...]:
    """(pairs, groups, config, module types, module facts, attention shape) of a plan's source: a module
    gives its config (unless one is passed), module types and facts; keyword geometry wins over the config."""
    module_types: dict[str, str] = {}
    facts: dict[str, ModuleFacts] = {}
    if isinstance(source, torch.nn.Module):
        if config is None:
            config = getattr(source, "config", None)
        module_types = module_classes(source)
        facts = module_facts(source)
    pairs, groups = named_tensors(source)
    return pairs, groups, config, module_types, facts, AttentionShape.from_config(config, **geometry)


# --------------------------------------------------------------------------------------------------
# the plan


class ParamPlan:
    """One :class:`PlanRow` per named tensor, under one :class:`RuleSet`."""

    def __init__(self, rows: list[PlanRow], rule_set: RuleSet, attention: AttentionShape,
                 pairs: list[tuple[str, Tensor]] | None = None,
                 groups: list[dict[str, Any]] | None = None) -> None:
        self.rows = rows
        self.rule_set = rule_set
        self.attention = attention
        self._pairs = pairs
        self._groups = groups
        self._by_name = {r.name: r for r in rows}
        self.notes: dict[str, str] = {}  # name -> why the tensor needs a look (not recognised, a fallback)

    # -- construction -----------------------------------------------------------------------------
    @classmethod
    def build(cls, source: Any, rule_set: RuleSet, *, config: Any = None,
              overrides: Mapping[str, str] | None = None, warn: bool = True,
              num_heads: int | None = None, num_kv_heads: int | None = None, head_dim: int | None = None,
              hidden_size: int | None = None) -> ParamPlan:
        """Classify and lay out every tensor of ``source`` (a module, named pairs, or named groups).

        ``config`` defaults to ``source.config`` for a module; keyword geometry wins over it.
        ``overrides`` maps a parameter name or an ``fnmatch`` pattern to a role (from :data:`ROLES`) or to
        a rule of ``rule_set``; an override that matches nothing raises ``ValueError`` (typos must not
        pass silently). Unrecognised tensors and rule fallbacks are reported together, in one warning
        holding a table (:meth:`report`; also kept in ``plan.notes``).
        """
        pairs, groups, config, module_types, facts, attention = _read_source(
            source, config, num_heads=num_heads, num_kv_heads=num_kv_heads, head_dim=head_dim,
            hidden_size=hidden_size)
        overrides = dict(overrides or {})
        for key, value in overrides.items():
            if value not in ROLES and value not in rule_set.known_rules:
                raise ValueError(f"override {key!r} -> {value!r}: not a role ({', '.join(ROLES)}) nor a rule "
                                 f"of {rule_set.name!r} ({', '.join(sorted(rule_set.known_rules))})")
        used: set[str] = set()
        rows: list[PlanRow] = []
        notes: dict[str, str] = {}
        for info, rule, kind, basis in _classified(pairs, config, module_types, attention, overrides, used, facts):
            if info.role == "other" and kind == "auto":
                own = facts.get(info.name)
                notes[info.name] = (f"not recognised ({own.module if own else 'no module type'}, name "
                                    "unknown): role 'other'")
            rule = rule or rule_set.rule_for(info.role)
            try:
                found = rule_set.facts(info, rule)
            except ValueError as err:
                raise ValueError(f"parameter {info.name!r} (shape {info.shape}, role {info.role!r}, rule "
                                 f"{rule!r}): {err}") from err
            if found.note:
                notes[info.name] = f"{notes[info.name]}; {found.note}" if info.name in notes else found.note
            module = facts[info.name].module if info.name in facts else ""
            rows.append(PlanRow(info.name, info.shape, info.role, found.rule or rule, found.n_blocks,
                                found.block_size, info.out_dim, dict(found.extra), kind, basis, module))
        unused = set(overrides) - used
        if unused:
            raise ValueError(f"overrides match no parameter: {', '.join(sorted(unused))}")
        plan = cls(rows, rule_set, attention, pairs, groups)
        plan.notes = notes
        if warn and notes:
            warnings.warn(plan.report(), stacklevel=2)
        return plan


    # -- queries ------------------------------------------------------------------------------------
    def __getitem__(self, name: str) -> PlanRow:
        return self._by_name[name]

    def __iter__(self) -> Iterator[PlanRow]:
        return iter(self.rows)

    def __len__(self) -> int:
        return len(self.rows)

    def roles(self) -> dict[str, str]:
        return {r.name: r.role for r in self.rows}

    def rules(self) -> dict[str, str]:
        return {r.name: r.rule for r in self.rows}

    # -- output ---------------------------------------------------------------------------------------
    def table(self, groups: list[dict[str, Any]] | None = None) -> str:
        """One line per parameter (name, shape, role, what decided it, rule, blocks, block size, facts), then
        a total. ``groups``: an optimizer's ``param_groups`` (with ``param_names``); adds the lr and weight
        decay each tensor gets (none for roles in a group's ``no_decay_roles``)."""
        by_name: dict[str, tuple[str, str]] = {}
        for g in groups or []:
            roles = g.get("param_roles") or [None] * len(g.get("param_names", []))
            for name, role in zip(g.get("param_names", []), roles):
                wd = 0.0 if role in g.get("no_decay_roles", ()) else g.get("weight_decay")
                by_name[name] = (_number(g.get("lr")), _number(wd))
        header = ["parameter", "shape", "role", "from", "rule", "blocks", "block size"]
        if groups is not None:
            header += ["lr", "wd"]
        header.append("facts")
        lines = [header]
        for r in self.rows:
            facts = [f"out_dim={r.out_dim}"] if r.out_dim else []
            facts += [f"{k}={v}" for k, v in r.extra.items() if k != "segments"]
            if "segments" in r.extra:
                facts.append(f"segments={len(r.extra['segments'])}")
            if r.name in self.notes:
                facts.append("(see below)")
            line = [r.name, _shape_text(r.shape), r.role, r.basis or "-", r.rule, str(r.n_blocks), str(r.block_size)]
            if groups is not None:
                line += list(by_name.get(r.name, ("-", "-")))
            lines.append([*line, " ".join(facts)])
        out = _format_rows(lines)
        blocks = sum(r.n_blocks for r in self.rows)
        numel = sum(_numel(r.shape) for r in self.rows)
        per_rule: dict[str, int] = {}
        for r in self.rows:
            per_rule[r.rule] = per_rule.get(r.rule, 0) + r.numel
        out.append(f"{len(self.rows)} tensors, {numel} elements, {blocks} blocks ({self.rule_set.name}); elements "
                   "by rule: " + ", ".join(f"{rule} {n}" for rule, n in per_rule.items()))
        if self.notes:
            out.append(self.report())
        return "\n".join(out)

    def report(self) -> str:
        """The tensors that need a look (not recognised, or a rule that fell back), as one table with what
        each got and how to say what it is; empty when there are none."""
        if not self.notes:
            return ""
        unknown = sum(1 for r in self.rows if r.name in self.notes and r.role == "other")
        lines = [["parameter", "shape", "module", "role", "rule", "why"]]
        for r in self.rows:
            if r.name in self.notes:
                lines.append([r.name, _shape_text(r.shape), r.module or "-", r.role, r.rule, self.notes[r.name]])
        head = (f"slimopt plan ({self.rule_set.name}): {len(lines) - 1} tensor(s) to look at ({unknown} not "
                f"recognised, {len(lines) - 1 - unknown} fallback(s)); what each got:")
        tail = textwrap.fill("Say what a tensor is with overrides={'name or fnmatch pattern': role or rule}; roles: "
                             + ", ".join(ROLES) + f"; rules of {self.rule_set.name}: "
                             + ", ".join(sorted(self.rule_set.known_rules)) + " (docs/plans.md).", width=100)
        return "\n".join([head, *("  " + line for line in _format_rows(lines)), tail])

    def __str__(self) -> str:
        return self.table()

    def param_groups(self, **defaults: Any) -> list[dict[str, Any]]:
        """Torch param groups that carry their per-parameter metadata.

        Built from groups: their structure and options are kept (``defaults`` fill missing keys only).
        Otherwise: one group with ``defaults``. Every group gets lists aligned with ``params``:
        ``param_names``, ``param_roles``, ``param_rules`` and ``param_layouts`` (each tensor's dict of JSON-able
        facts, :meth:`PlanRow.facts_dict`, under the key slimopt 0.1 gave it). Tied duplicates appear once.
        """
        if self._pairs is None:
            raise ValueError("this plan holds no tensors (it was not made by ParamPlan.build)")
        seen: set[int] = set()
        if self._groups is None:
            return [{**defaults, **self._group_lists(self._pairs, seen)}]
        groups = []
        for g in self._groups:
            pairs, _ = named_tensors([g])
            options = {k: v for k, v in g.items() if k not in ("params", "param_names")}
            group = {**defaults, **options, **self._group_lists(pairs, seen)}
            if group["params"]:
                groups.append(group)
        return groups

    def _group_lists(self, pairs: list[tuple[str, Tensor]], seen: set[int]) -> dict[str, Any]:
        lists: dict[str, list[Any]] = {k: [] for k in ("params", "param_names", "param_roles", "param_rules",
                                                       "param_layouts")}
        for name, p in pairs:
            if id(p) in seen:
                continue
            seen.add(id(p))
            row = self._by_name[name]
            lists["params"].append(p)
            lists["param_names"].append(name)
            lists["param_roles"].append(row.role)
            lists["param_rules"].append(row.rule)
            lists["param_layouts"].append(row.facts_dict())
        return lists


def _shape_text(shape: tuple[int, ...]) -> str:
    return "x".join(map(str, shape)) or "()"


def _number(value: Any) -> str:
    if value is None:
        return "-"
    if isinstance(value, Tensor):
        value = value.item()
    return f"{value:g}" if isinstance(value, (int, float)) else str(value)


def _format_rows(lines: list[list[str]]) -> list[str]:
    """Left-aligned columns, a rule under the header."""
    widths = [max(len(line[i]) for line in lines) for i in range(len(lines[0]))]
    out = []
    for i, line in enumerate(lines):
        out.append("  ".join(cell.ljust(w) for cell, w in zip(line, widths)).rstrip())
        if i == 0:
            out.append("  ".join("-" * w for w in widths))
    return out


def _numel(shape: tuple[int, ...]) -> int:
    n = 1
    for s in shape:
        n *= s
    return n


# --------------------------------------------------------------------------------------------------
# the rule set of roles as they are (each optimizer keeps its own rule set beside its class)


def _one_block(info: ParamInfo, rule: str) -> BlockFacts:
    return BlockFacts(1, info.numel)


ROLES_ONLY = RuleSet("roles", {role: role for role in ROLES}, facts=_one_block, default="other")
"""Rule = role, one block per tensor: for printing what ``classify`` decided."""
