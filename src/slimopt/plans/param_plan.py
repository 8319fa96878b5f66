"""Parameter plans: what each named tensor *is*, and which rule of an optimizer updates it.

Three of slimopt's methods need to know a tensor's part in the Transformer before they can update it:
Adam-mini cuts every tensor into Hessian blocks (heads, rows, whole tensor), SinkGD and SWAN send
hidden matrices to a stateless update and everything else to AdamW. That is one concept built once:

1. **Roles** (``classify(name, shape)``, a pure function): names *and* shapes decide each tensor's
   role, one of :data:`ROLES`::

       embedding  token / position / type embeddings (rows are tokens), T5 relative_attention_bias
       head       output heads: lm_head, classifier, score, qa_outputs, BERT cls.*, top-level output
       query, key, value   separate attention projections
       qkv        fused projections: GPT-2 c_attn, qkv_proj, Wqkv, W_pack, in_proj_weight, query_key_value
       attn_out   attention output: o_proj, out_proj, c_proj under attn, BERT attention.output.dense
       mlp        feed-forward: gate/up/down_proj, fc1/fc2, c_fc, wi/wo, BERT intermediate/output.dense
       norm       1-D norm scales (q_norm/k_norm too); their biases are ``bias``
       bias       every 1-D ``*.bias`` / ``in_proj_bias``
       adapter    LoRA/DoRA tensors (lora_A, lora_B, lora_magnitude_vector): never heads
       other      anything unrecognised: a safe default, and one warning lists all such names

   Naming schemes covered: LLaMA/Mistral/Qwen2/Qwen3/Gemma, GPT-2 (and nanoGPT), BERT/RoBERTa, OPT,
   T5, GPT-NeoX/Falcon, the original LLaMA/torchtitan names (wq, w1, tok_embeddings, output), and PEFT
   wrappers (``base_layer``, ``modules_to_save`` are looked through; ``base_layer`` keeps its role).

2. **Shape facts** (:class:`ParamInfo`): the output dimension (``1`` for the transposed ``Conv1D``
   layout of GPT-2, where a weight is ``(in, out)``), the attention geometry read from ``model.config``
   or keyword arguments (:class:`AttentionShape`: heads, kv heads, head_dim, hidden size) and, for a fused
   QKV tensor, how q, k and v are laid out along the output dimension. Decisions use *global* shapes
   (``p.shape`` of a DTensor is global).

3. **Rule sets** (:class:`RuleSet`): a small table ``role -> rule`` plus a ``layout`` function that
   checks the shape against the rule and returns the rule's facts (number of blocks, block size, any
   extra keys). A shape that contradicts its rule raises ``ValueError`` naming the parameter. Adam-mini's
   partition is one rule set (``slimopt.optim.adam_mini.ADAM_MINI``); SinkGD/SWAN's routing
   (``"stateless" | "adamw"``) is another, written the same way::

       def my_layout(info: ParamInfo, rule: str) -> BlockFacts:
           if rule == "stateless" and len(info.shape) != 2:
               raise ValueError(f"stateless needs a matrix, got shape {info.shape}")
           return BlockFacts(n_blocks=1, block_size=info.numel)

       ROUTING = RuleSet("sinkgd", {"mlp": "stateless", ...}, layout=my_layout, default="adamw")

4. **The plan** (:class:`ParamPlan`): ``ParamPlan.build(model_or_pairs_or_groups, rule_set, overrides=...)`` gives
   one :class:`PlanRow` per tensor, ``plan.table()`` prints them, ``overrides`` maps a name (or an
   ``fnmatch`` pattern) to a role or a rule, and ``plan.param_groups(**defaults)`` returns torch param
   groups whose per-parameter metadata lives *inside the group*, in lists aligned with
   ``group["params"]`` (``param_names``, ``param_roles``, ``param_rules``, ``param_layouts``). FSDP2 or
   Accelerate may swap the parameter objects; the group keeps what the optimizer needs.
"""

from __future__ import annotations

import fnmatch
import re
import warnings
from collections.abc import Callable, Iterable, Iterator, Mapping
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import Tensor

__all__ = [
    "ROLES",
    "ROLES_ONLY",
    "AttentionShape",
    "BlockFacts",
    "ParamInfo",
    "ParamPlan",
    "PlanRow",
    "RuleSet",
    "classify",
    "named_tensors",
    "param_infos",
]

ROLES = ("embedding", "head", "query", "key", "value", "qkv", "attn_out", "mlp", "norm", "bias", "adapter",
         "other")

# --------------------------------------------------------------------------------------------------
# attention geometry


def _config_value(config: Any, *keys: str) -> Any:
    """First non-None attribute (or dict key) of ``config`` or its ``text_config`` (Gemma 3, VLMs)."""
    for source in (config, _get(config, "text_config")):
        if source is None:
            continue
        for key in keys:
            value = _get(source, key)
            if value is not None:
                return value
    return None


def _get(obj: Any, key: str) -> Any:
    if obj is None:
        return None
    if isinstance(obj, Mapping):
        return obj.get(key)
    try:
        return getattr(obj, key, None)
    except Exception:  # some configs raise on unknown attributes
        return None


@dataclass(frozen=True)
class AttentionShape:
    """Heads, kv heads, head_dim and hidden size; any may be unknown (``None``)."""

    num_heads: int | None = None
    num_kv_heads: int | None = None
    head_dim: int | None = None
    hidden_size: int | None = None

    @classmethod
    def from_config(cls, config: Any = None, *, num_heads: int | None = None, num_kv_heads: int | None = None,
                    head_dim: int | None = None, hidden_size: int | None = None) -> AttentionShape:
        """Read a HF-style config (object or dict); keyword arguments win over the config.

        ``head_dim`` is read when the config has it (Gemma, Qwen3: it differs from hidden/heads) and is
        derived as ``hidden_size // num_heads`` otherwise. ``num_kv_heads`` defaults to ``num_heads``.
        """
        heads = num_heads or _config_value(config, "num_attention_heads", "n_head", "num_heads", "n_heads")
        kv = num_kv_heads or _config_value(config, "num_key_value_heads", "num_kv_heads", "n_kv_heads",
                                           "multi_query_group_num")
        if kv is None and heads is not None and _config_value(config, "multi_query") is True:
            kv = 1
        hidden = hidden_size or _config_value(config, "hidden_size", "n_embd", "d_model", "dim")
        hd = head_dim or _config_value(config, "head_dim", "d_kv", "kv_channels")
        if hd is None and heads and hidden and hidden % heads == 0:
            hd = hidden // heads
        if kv is None:
            kv = heads
        facts = (("num_heads", heads), ("num_kv_heads", kv), ("head_dim", hd), ("hidden_size", hidden))
        for arg, value in facts:
            if value is not None and (isinstance(value, bool) or not isinstance(value, int) or value < 1):
                raise ValueError(f"Invalid {arg}: {value!r} (must be an integer >= 1)")
        if heads and kv and heads % kv != 0:
            raise ValueError(f"num_heads={heads} is not a multiple of num_kv_heads={kv}")
        return cls(heads, kv, hd, hidden)

    @property
    def known(self) -> bool:
        return self.num_heads is not None and self.head_dim is not None


# --------------------------------------------------------------------------------------------------
# roles from names and shapes

_PEFT_WRAPPERS = {"base_layer", "original_module"}
_ATTN_CONTEXT = {"attn", "self_attn", "attention", "selfattention", "encdecattention", "self_attention",
                 "cross_attn", "crossattention", "cross_attention", "encoder_attn", "self", "mixer"}
_MLP_CONTEXT = {"mlp", "feed_forward", "ffn", "densereludense", "intermediate", "experts", "block_sparse_moe",
                "shared_expert", "shared_experts", "moe"}
_HEAD_MODULES = {"lm_head", "classifier", "score", "qa_outputs", "embed_out"}
_EMBED_EXACT = {"wte", "wpe", "shared", "relative_attention_bias", "emb", "tok_embeddings"}
# Projection names that say what they are on their own ...
_QUERY = {"q_proj", "query", "wq", "to_q", "q_lin", "query_proj"}
_KEY = {"k_proj", "key", "wk", "to_k", "k_lin", "key_proj"}
_VALUE = {"v_proj", "value", "wv", "to_v", "v_lin", "value_proj"}
_QKV = {"c_attn", "qkv", "qkv_proj", "wqkv", "query_key_value", "in_proj", "w_pack", "qkv_linear"}
_ATTN_OUT = {"o_proj", "out_proj", "to_out", "out_lin", "attn_out"}
_MLP = {"fc1", "fc2", "c_fc", "gate_proj", "up_proj", "down_proj", "gate_up_proj", "w1", "w2", "w3", "wi",
        "wi_0", "wi_1", "dense_h_to_4h", "dense_4h_to_h", "lin1", "lin2"}
# ... and names that need an attention context to mean it (T5 SelfAttention.q/k/v/o, Phi self_attn.dense)
_QUERY_IN_ATTN = {"q"}
_KEY_IN_ATTN = {"k"}
_VALUE_IN_ATTN = {"v"}
_ATTN_OUT_IN_ATTN = {"o", "wo", "c_proj", "proj", "dense", "out", "output"}
_LN = re.compile(r"ln(_\w+|\d+)?")


def _components(name: str) -> list[str]:
    """Lower-cased dotted components with PEFT wrappers looked through."""
    comps = name.lower().split(".")
    out: list[str] = []
    skip_next = False
    for c in comps:
        if skip_next:  # the adapter name after modules_to_save
            skip_next = False
            continue
        if c == "modules_to_save":
            skip_next = True
            continue
        if c in _PEFT_WRAPPERS:
            continue
        out.append(c)
    return out


def _is_norm(comp: str) -> bool:
    return "norm" in comp or _LN.fullmatch(comp) is not None


def classify(name: str, shape: Iterable[int], config: Any = None) -> str:
    """The role of the tensor ``name`` with (global) ``shape``; one of :data:`ROLES`.

    A pure function of its arguments. ``config`` is accepted for symmetry with :meth:`ParamPlan.build`;
    roles do not depend on it (the shape facts do).
    """
    del config  # roles come from names and ranks; geometry is checked by the rule set
    ndim = len(tuple(shape))
    comps = _components(name)
    leaf = comps[-1]
    if leaf in ("weight", "bias") and len(comps) > 1:
        module, leaf_kind = comps[:-1], leaf
    elif leaf.endswith("_weight") or leaf.endswith("_bias"):  # nn.MultiheadAttention.in_proj_weight
        module, leaf_kind = [*comps[:-1], leaf.rsplit("_", 1)[0]], leaf.rsplit("_", 1)[1]
    else:  # a bare nn.Parameter such as cls_token or pos_embed
        module, leaf_kind = comps, "weight"
    proj = module[-1]
    context = module[:-1]

    if any(c.startswith(("lora_", "ia3_", "hada_", "lokr_")) for c in comps):
        return "adapter" if ndim >= 2 else "norm"  # DoRA's lora_magnitude_vector is a 1-D scale
    if leaf_kind == "bias":
        return "bias" if ndim == 1 else "other"
    if any(_is_norm(c) for c in module):
        return "norm" if ndim == 1 else "other"
    if ndim < 2:
        return "other"

    if module[0] == "cls":  # BERT pre-training heads; their transform.dense is a hidden layer
        return "mlp" if "transform" in module else "head"
    if any(c in _HEAD_MODULES for c in module) or module == ["output"]:
        return "head"
    if any(c in _EMBED_EXACT or "embed" in c for c in module):
        return "embedding"

    nearest = next((c for c in reversed(context) if c in _ATTN_CONTEXT or c in _MLP_CONTEXT
                    or c in ("output", "intermediate", "pooler")), None)
    in_attn = nearest in _ATTN_CONTEXT or (nearest == "output" and any(c in _ATTN_CONTEXT for c in context))
    if proj in _QKV:
        return "qkv"
    if proj in _QUERY or (in_attn and proj in _QUERY_IN_ATTN):
        return "query"
    if proj in _KEY or (in_attn and proj in _KEY_IN_ATTN):
        return "key"
    if proj in _VALUE or (in_attn and proj in _VALUE_IN_ATTN):
        return "value"
    if proj in _ATTN_OUT or (in_attn and proj in _ATTN_OUT_IN_ATTN):
        return "attn_out"
    if proj in _MLP or nearest in _MLP_CONTEXT or (nearest in ("output", "intermediate", "pooler")
                                                     and proj == "dense"):
        return "mlp"
    return "other"


# --------------------------------------------------------------------------------------------------
# shape facts and rule sets


@dataclass(frozen=True)
class ParamInfo:
    """What a rule set's ``layout`` sees about one tensor."""

    name: str
    shape: tuple[int, ...]
    role: str
    out_dim: int  # the dimension that indexes output neurons / tokens (1 for GPT-2 Conv1D weights)
    attention: AttentionShape
    qkv_layout: str | None = None  # "concat" ([q|k|v]) or "grouped" (per kv group [q.. k v], NeoX/Falcon)

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
    """A rule set = ``rules`` (role -> rule) + ``layout(info, rule)`` that checks shapes and gives facts.

    ``layout`` raises ``ValueError`` when the shape contradicts the rule (the plan adds the name).
    ``extra_rules`` are rules that no role maps to by default but an override may pick.
    """

    name: str
    rules: Mapping[str, str]
    layout: Callable[[ParamInfo, str], BlockFacts]
    default: str = "other"
    extra_rules: tuple[str, ...] = ()

    def rule_for(self, role: str) -> str:
        return self.rules.get(role, self.default)

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

    @property
    def numel(self) -> int:
        return _numel(self.shape)

    def layout_dict(self) -> dict[str, Any]:
        """The JSON-able facts an optimizer keeps in its param group for this tensor."""
        return {"rule": self.rule, "role": self.role, "out_dim": self.out_dim, "n_blocks": self.n_blocks,
                "block_size": self.block_size, **self.extra}


# --------------------------------------------------------------------------------------------------
# sources: a model, (name, tensor) pairs, or param groups with names


def _module_types(model: torch.nn.Module) -> dict[str, str]:
    types = {}
    for mname, module in model.named_modules():
        for pname, _ in module.named_parameters(recurse=False):
            types[f"{mname}.{pname}" if mname else pname] = type(module).__name__
    return types


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


def _is_conv1d_layout(name: str, shape: tuple[int, ...], module_type: str | None,
                      gpt2_family: bool | None) -> bool:
    """GPT-2's ``Conv1D`` stores ``(in, out)``; nanoGPT's same names are ``nn.Linear`` ``(out, in)``."""
    if len(shape) != 2:
        return False
    if module_type is not None:
        return module_type == "Conv1D"
    proj = _components(name)[-2] if len(_components(name)) > 1 else ""
    if proj not in ("c_attn", "c_fc", "c_proj", "q_attn"):
        return False
    return bool(gpt2_family)


def _gpt2_family(pairs: list[tuple[str, Tensor]], config: Any) -> bool | None:
    """Whether c_attn/c_fc/c_proj use the transposed layout, decided once for the whole model.

    The config's ``model_type`` settles it; otherwise a non-square ``c_attn`` (``(E, 3E)`` vs
    ``(3E, E)``) or ``c_fc`` shows the layout, which then applies to the square ``c_proj`` too.
    """
    model_type = _config_value(config, "model_type")
    if model_type is not None:
        return model_type in ("gpt2", "gpt_bigcode", "imagegpt", "decision_transformer")
    for name, p in pairs:
        comps = _components(name)
        shape = tuple(p.shape)
        if len(comps) > 1 and comps[-2] in ("c_attn", "c_fc") and len(shape) == 2 and shape[0] != shape[1]:
            return shape[1] > shape[0]
    return None


def _qkv_layout(name: str, config: Any) -> str:
    comps = _components(name)
    proj = comps[-2] if len(comps) > 1 else comps[-1]
    if proj == "query_key_value" and _config_value(config, "model_type") not in ("chatglm",):
        return "grouped"  # GPT-NeoX, Bloom, Falcon: per kv group [q_1..q_g, k, v], each head_dim rows
    return "concat"


def _classified(pairs: list[tuple[str, Tensor]], config: Any, module_types: Mapping[str, str],
                attention: AttentionShape, overrides: Mapping[str, str], used: set[str]
                ) -> Iterator[tuple[ParamInfo, str | None, str]]:
    """``(info, rule from an override or None, "auto" | "override")`` per tensor; tied weights once (the
    first name wins, as ``named_parameters``). Adds the override keys that matched to ``used``."""
    gpt2 = _gpt2_family(pairs, config)
    seen: set[int] = set()
    for name, p in pairs:
        if id(p) in seen:
            continue
        seen.add(id(p))
        shape = tuple(int(s) for s in p.shape)  # global shape, also for a DTensor
        role = classify(name, shape, config)
        rule = None
        kind = "auto"
        for key, value in overrides.items():
            if key == name or fnmatch.fnmatchcase(name, key):
                used.add(key)
                kind = "override"
                if value in ROLES:
                    role = value
                else:
                    rule = value
        transposed = _is_conv1d_layout(name, shape, module_types.get(name), gpt2)
        info = ParamInfo(name=name, shape=shape, role=role, out_dim=1 if transposed else 0, attention=attention,
                         qkv_layout=_qkv_layout(name, config) if role == "qkv" else None)
        yield info, rule, kind


def param_infos(source: Any, *, config: Any = None, num_heads: int | None = None, num_kv_heads: int | None = None,
                head_dim: int | None = None, hidden_size: int | None = None) -> list[ParamInfo]:
    """The shape facts of every tensor of ``source`` (a module, named pairs or named groups), no rule set
    applied: what the analytic memory formulas read. Meta tensors work (nothing is allocated)."""
    module_types: dict[str, str] = {}
    if isinstance(source, torch.nn.Module):
        if config is None:
            config = getattr(source, "config", None)
        module_types = _module_types(source)
    pairs, _ = named_tensors(source)
    attention = AttentionShape.from_config(config, num_heads=num_heads, num_kv_heads=num_kv_heads,
                                           head_dim=head_dim, hidden_size=hidden_size)
    return [info for info, _, _ in _classified(pairs, config, module_types, attention, {}, set())]


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
        pass silently). Unrecognised tensors and rule fallbacks are reported in one warning each.
        """
        module_types: dict[str, str] = {}
        if isinstance(source, torch.nn.Module):
            if config is None:
                config = getattr(source, "config", None)
            module_types = _module_types(source)
        pairs, groups = named_tensors(source)
        attention = AttentionShape.from_config(config, num_heads=num_heads, num_kv_heads=num_kv_heads,
                                               head_dim=head_dim, hidden_size=hidden_size)
        overrides = dict(overrides or {})
        for key, value in overrides.items():
            if value not in ROLES and value not in rule_set.known_rules:
                raise ValueError(f"override {key!r} -> {value!r}: not a role ({', '.join(ROLES)}) nor a rule "
                                 f"of {rule_set.name!r} ({', '.join(sorted(rule_set.known_rules))})")
        used: set[str] = set()
        rows: list[PlanRow] = []
        unknown: list[str] = []
        notes: list[str] = []
        for info, rule, kind in _classified(pairs, config, module_types, attention, overrides, used):
            if info.role == "other" and kind == "auto":
                unknown.append(info.name)
            rule = rule or rule_set.rule_for(info.role)
            try:
                facts = rule_set.layout(info, rule)
            except ValueError as err:
                raise ValueError(f"parameter {info.name!r} (shape {info.shape}, role {info.role!r}, rule "
                                 f"{rule!r}): {err}") from err
            if facts.note:
                notes.append(f"{info.name}: {facts.note}")
            rows.append(PlanRow(info.name, info.shape, info.role, facts.rule or rule, facts.n_blocks,
                                facts.block_size, info.out_dim, dict(facts.extra), kind))
        unused = set(overrides) - used
        if unused:
            raise ValueError(f"overrides match no parameter: {', '.join(sorted(unused))}")
        if warn and unknown:
            warnings.warn(
                f"slimopt plan ({rule_set.name}): {len(unknown)} tensor(s) not recognised, given role "
                f"'other' (rule {rule_set.rule_for('other')!r}): {', '.join(unknown)}. "
                "Pass overrides={name: role} to say what they are.", stacklevel=2)
        if warn and notes:
            warnings.warn(f"slimopt plan ({rule_set.name}): {len(notes)} fallback(s): {'; '.join(notes)}",
                          stacklevel=2)
        return cls(rows, rule_set, attention, pairs, groups)

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
    def table(self) -> str:
        """One line per parameter (name, shape, role, rule, blocks, block size, facts), then a total."""
        header = ("parameter", "shape", "role", "rule", "blocks", "block size", "facts")
        lines = [header]
        for r in self.rows:
            facts = [f"out_dim={r.out_dim}"] if r.out_dim else []
            facts += [f"{k}={v}" for k, v in r.extra.items() if k != "segments"]
            if "segments" in r.extra:
                facts.append(f"segments={len(r.extra['segments'])}")
            if r.source != "auto":
                facts.append(r.source)
            lines.append((r.name, "x".join(map(str, r.shape)) or "()", r.role, r.rule, str(r.n_blocks),
                          str(r.block_size), " ".join(facts)))
        widths = [max(len(line[i]) for line in lines) for i in range(len(header))]
        out = []
        for i, line in enumerate(lines):
            out.append("  ".join(cell.ljust(w) for cell, w in zip(line, widths)).rstrip())
            if i == 0:
                out.append("  ".join("-" * w for w in widths))
        blocks = sum(r.n_blocks for r in self.rows)
        numel = sum(_numel(r.shape) for r in self.rows)
        out.append(f"{len(self.rows)} tensors, {numel} elements, {blocks} blocks ({self.rule_set.name})")
        return "\n".join(out)

    def __str__(self) -> str:
        return self.table()

    def param_groups(self, **defaults: Any) -> list[dict[str, Any]]:
        """Torch param groups that carry their per-parameter metadata.

        Built from groups: their structure and options are kept (``defaults`` fill missing keys only).
        Otherwise: one group with ``defaults``. Every group gets lists aligned with ``params``:
        ``param_names``, ``param_roles``, ``param_rules`` and ``param_layouts`` (dicts of JSON-able
        facts, :meth:`PlanRow.layout_dict`). Tied duplicates appear once.
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
            lists["param_layouts"].append(row.layout_dict())
        return lists


def _numel(shape: tuple[int, ...]) -> int:
    n = 1
    for s in shape:
        n *= s
    return n


# --------------------------------------------------------------------------------------------------
# the rule set of roles as they are (each optimizer keeps its own rule set beside its class)


def _one_block(info: ParamInfo, rule: str) -> BlockFacts:
    return BlockFacts(1, info.numel)


ROLES_ONLY = RuleSet("roles", {role: role for role in ROLES}, layout=_one_block, default="other")
"""Rule = role, one block per tensor: for printing what ``classify`` decided."""
