"""Parameter plans: what each named tensor *is*, and which rule of an optimizer updates it.

Three of slimopt's methods need to know a tensor's part in the Transformer before they can update it:
Adam-mini cuts every tensor into Hessian blocks (heads, rows, whole tensor), SinkGD and SWAN send
hidden matrices to a stateless update and everything else to AdamW. That is one concept built once:

1. **Roles**: what a tensor is, one of :data:`ROLES`. When a module is given, its module *types* and
   shapes decide first (:func:`module_facts`): ``nn.Embedding`` -> embedding; ``nn.Linear`` and GPT-2's
   ``Conv1D`` -> a hidden matrix (``hidden``), except the model's output layer (a Linear tied to an
   embedding, mapping to the vocabulary, or the last Linear when it maps out of the model's input
   width: a classifier) -> head; ``nn.MultiheadAttention`` -> qkv / attn_out with its own heads; norm
   modules (LayerNorm, RMSNorm, BatchNorm, GroupNorm, any class whose name ends in ``Norm``) -> norm;
   convolutions (3-D+ weights) -> ``conv``. Then the *names* refine this for known architectures
   (``classify(name, shape)``, a pure function), and where names recognise a tensor, they win::

       embedding  token / position / type embeddings (rows are tokens), T5 relative_attention_bias
       head       output heads: lm_head, classifier, score, qa_outputs, BERT cls.*, top-level output
       query, key, value   separate attention projections
       qkv        fused projections: GPT-2 c_attn, qkv_proj, Wqkv, W_pack, in_proj_weight, query_key_value
       attn_out   attention output: o_proj, out_proj, c_proj under attn, BERT attention.output.dense
       mlp        feed-forward: gate/up/down_proj, fc1/fc2, c_fc, wi/wo, BERT intermediate/output.dense
       hidden     any other hidden matrix (an nn.Linear / Conv1D only its type identifies); rule sets
                  without a rule for it treat it as ``mlp``
       conv       a convolution's weight (3-D and more); treated as ``mlp`` by rule sets without a rule
       norm       1-D norm scales (q_norm/k_norm too); their biases are ``bias``
       bias       every 1-D ``*.bias`` / ``in_proj_bias``
       adapter    LoRA/DoRA tensors (lora_A, lora_B, lora_magnitude_vector): never heads
       other      anything unrecognised: a safe default, and one warning shows all such tensors in a
                  table (with the rule each got and how to say what it is: ``overrides``)

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
import textwrap
import warnings
from collections.abc import Callable, Iterable, Iterator, Mapping
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import Tensor

__all__ = [
    "ROLES",
    "HIDDEN_ROLES",
    "ROLES_ONLY",
    "ROLE_FALLBACK",
    "AttentionShape",
    "ModuleFacts",
    "BlockFacts",
    "ParamInfo",
    "ParamPlan",
    "PlanRow",
    "RuleSet",
    "classify",
    "module_facts",
    "named_tensors",
    "param_infos",
]

ROLES = ("embedding", "head", "query", "key", "value", "qkv", "attn_out", "mlp", "hidden", "conv", "norm", "bias",
         "adapter", "other")
ROLE_FALLBACK = {"hidden": "mlp", "conv": "mlp"}
"""A role a rule set has no rule for is looked up as this one (then the rule set's default)."""
HIDDEN_ROLES = frozenset({"query", "key", "value", "qkv", "attn_out", "mlp", "hidden", "conv"})
"""Roles of hidden weights (attention, feed-forward, other hidden matrices, convolutions)."""
ROLE_HELP = {
    "embedding": "token/position embeddings (rows are tokens)",
    "head": "output layer (logits, classifier)",
    "query": "attention query projection", "key": "attention key projection",
    "value": "attention value projection", "qkv": "fused q, k, v projection",
    "attn_out": "attention output projection", "mlp": "feed-forward matrix",
    "hidden": "other hidden matrix (an nn.Linear)", "conv": "convolution weight",
    "norm": "norm scale (1-D)", "bias": "bias (1-D)", "adapter": "LoRA/DoRA tensor",
    "other": "unrecognised",
}

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


# --------------------------------------------------------------------------------------------------
# roles from module types (a module was given)

_NORM_TYPE = re.compile(r"norm(\d*d)?$", re.IGNORECASE)  # LayerNorm, RMSNorm, BatchNorm2d, GroupNorm, T5LayerNorm
_HEADS_ATTRS = ("num_heads", "num_attention_heads", "n_heads", "n_head", "nhead")
_KV_HEADS_ATTRS = ("num_kv_heads", "num_key_value_heads", "n_kv_heads")
_HEAD_DIM_ATTRS = ("head_dim", "attention_head_size", "head_size")
_MHA_ROLES = {"in_proj_weight": "qkv", "q_proj_weight": "query", "k_proj_weight": "key", "v_proj_weight": "value",
              "in_proj_bias": "bias", "bias_k": "bias", "bias_v": "bias"}
_ATTENTION_ROLES = frozenset({"query", "key", "value", "qkv", "attn_out"})


@dataclass(frozen=True)
class ModuleFacts:
    """What a tensor's module says about it: the module's class, the role its type gives (None: the type
    says nothing), how that was decided (for the plan table) and attention geometry the module carries
    (``nn.MultiheadAttention``, or an attention module with a ``num_heads``-like attribute)."""

    module: str
    role: str | None
    why: str
    attention: AttentionShape | None = None


def _is_linear(module: torch.nn.Module) -> bool:
    return isinstance(module, torch.nn.Linear) or type(module).__name__ == "Conv1D"  # GPT-2's (in, out) Conv1D


def _linear_dims(module: torch.nn.Module) -> tuple[int, int]:
    """(in, out) features of an nn.Linear or a GPT-2 Conv1D (weight (in, out))."""
    w = module.weight
    return (int(w.shape[0]), int(w.shape[1])) if type(module).__name__ == "Conv1D" else (int(w.shape[1]),
                                                                                         int(w.shape[0]))


def _is_norm_module(module: torch.nn.Module) -> bool:
    norms = (torch.nn.LayerNorm, torch.nn.GroupNorm, torch.nn.modules.batchnorm._NormBase,
             getattr(torch.nn, "RMSNorm", torch.nn.LayerNorm))
    return isinstance(module, norms) or _NORM_TYPE.search(type(module).__name__) is not None


def _input_width(module: torch.nn.Module) -> int | None:
    """The width of what the first parameterised module reads (tokens: the embedding's width)."""
    if isinstance(module, (torch.nn.Embedding, torch.nn.EmbeddingBag)):
        return module.embedding_dim
    if _is_linear(module):
        return _linear_dims(module)[0]
    if isinstance(module, torch.nn.modules.conv._ConvNd):
        return module.in_channels
    if isinstance(module, torch.nn.MultiheadAttention):
        return module.embed_dim
    weight = getattr(module, "weight", None)
    if _is_norm_module(module) and isinstance(weight, Tensor) and weight.ndim >= 1:
        return int(weight.shape[-1])
    return None


def _int_attr(module: torch.nn.Module, names: tuple[str, ...]) -> int | None:
    for name in names:
        value = getattr(module, name, None)
        if isinstance(value, int) and not isinstance(value, bool) and value >= 1:
            return value
    return None


def _module_attention(module: torch.nn.Module) -> AttentionShape | None:
    """Heads the module itself says it has: nn.MultiheadAttention's, or ``num_heads``-like attributes."""
    if isinstance(module, torch.nn.MultiheadAttention):
        return AttentionShape(module.num_heads, module.num_heads, module.head_dim, module.embed_dim)
    heads = _int_attr(module, _HEADS_ATTRS)
    if heads is None:
        return None
    kv = _int_attr(module, _KV_HEADS_ATTRS) or heads
    if heads % kv:
        return None
    return AttentionShape(heads, kv, _int_attr(module, _HEAD_DIM_ATTRS), None)


def module_facts(model: torch.nn.Module) -> dict[str, ModuleFacts]:
    """What module types and shapes say about each trainable tensor of ``model`` (names not consulted).

    * ``nn.Embedding``/``EmbeddingBag`` weight: ``embedding``;
    * ``nn.Linear`` / GPT-2 ``Conv1D`` weight: ``hidden`` (a hidden matrix), except the output layer:
      a Linear whose weight is an embedding's (tied), or the *last* Linear (registration order) when it
      maps to the vocabulary (an embedding's ``num_embeddings``) or out of the model's input width (the
      width the first layer of a known type reads: a classifier; a last Linear back to that width is a
      block's hidden layer): ``head``;
    * ``nn.MultiheadAttention``: ``in_proj_weight`` qkv (q/k/v_proj_weight when separate), ``out_proj``
      attn_out, its biases bias; its heads come with it;
    * norm modules (LayerNorm, RMSNorm, BatchNorm*, GroupNorm, InstanceNorm, any class ending in
      ``Norm``): weight ``norm``, bias ``bias``;
    * convolutions (``nn.ConvNd``, ``ConvTransposeNd``): weight ``conv``;
    * any 1-D ``bias``: ``bias``. Anything else: no role from its type (the name may still give one).
    """
    named = [(mname, m) for mname, m in model.named_modules()]
    by_name = dict(named)
    embeddings = [m for _, m in named if isinstance(m, (torch.nn.Embedding, torch.nn.EmbeddingBag))]
    embedding_weights = {id(m.weight) for m in embeddings}
    vocab = {m.num_embeddings for m in embeddings}
    # the width the model reads: that of the first layer (registration order) whose type tells it
    width = next((w for w in (_input_width(m) for _, m in named if any(True for _ in m.parameters(recurse=False)))
                  if w is not None), None)

    def parent(mname: str) -> torch.nn.Module | None:
        return by_name.get(mname.rsplit(".", 1)[0] if "." in mname else "") if mname else None

    linears = [(mname, m) for mname, m in named if _is_linear(m) and isinstance(getattr(m, "weight", None), Tensor)
               and not isinstance(parent(mname), torch.nn.MultiheadAttention)]
    last_linear = linears[-1][0] if linears else None

    def attention_near(mname: str) -> AttentionShape | None:
        parts = mname.split(".") if mname else []
        for depth in range(len(parts), -1, -1):  # the module itself, then its ancestors
            found = _module_attention(by_name.get(".".join(parts[:depth]), torch.nn.Module()))
            if found is not None:
                return found
        return None

    facts: dict[str, ModuleFacts] = {}
    seen: set[int] = set()
    for mname, module in named:
        kind = type(module).__name__
        for pname, p in module.named_parameters(recurse=False):
            if id(p) in seen:  # tied: the first name only, as named_parameters()
                continue
            seen.add(id(p))
            name = f"{mname}.{pname}" if mname else pname
            role, why = None, kind
            if isinstance(module, torch.nn.MultiheadAttention):
                role = _MHA_ROLES.get(pname)
            elif (pname == "bias" or pname.startswith("bias_")) and p.ndim == 1:  # also RNNs' bias_ih_l0
                role = "bias"
            elif isinstance(module, (torch.nn.Embedding, torch.nn.EmbeddingBag)) and pname == "weight":
                role = "embedding"
            elif _is_norm_module(module) and p.ndim == 1:
                role = "norm"
            elif _is_linear(module) and pname == "weight":
                fan_in, fan_out = _linear_dims(module)
                if isinstance(parent(mname), torch.nn.MultiheadAttention):
                    role, why = "attn_out", f"{kind} in MultiheadAttention"
                elif id(p) in embedding_weights:
                    role, why = "head", f"{kind} tied to an embedding"
                elif mname == last_linear and fan_out in vocab:
                    role, why = "head", f"last {kind}, {fan_in}->{fan_out} = vocab"
                elif mname == last_linear and width is not None and fan_out != width:
                    role, why = "head", f"last {kind}, {fan_in}->{fan_out} != input {width}"
                else:
                    role = "hidden"
            elif isinstance(module, torch.nn.modules.conv._ConvNd) and pname == "weight":
                role = "conv"
            attention = attention_near(mname) if p.ndim >= 2 else None
            facts[name] = ModuleFacts(kind, role, why, attention)
    return facts


def _combine(name_role: str, facts: ModuleFacts | None) -> tuple[str, str]:
    """(role, basis): names win where they recognise the tensor, module types decide the rest; an
    embedding module stays an embedding whatever its name suggests."""
    if facts is None or facts.role is None:
        return name_role, ("name" if name_role != "other" else "")
    if name_role in ("other", facts.role):
        return facts.role, facts.why
    if facts.role == "embedding" and name_role in HIDDEN_ROLES:
        return "embedding", facts.why
    return name_role, "name"


def _with_module_geometry(attention: AttentionShape, own: AttentionShape | None) -> AttentionShape:
    """The plan's geometry (config, keywords) with what it leaves unknown filled from the module's."""
    if own is None or attention.known:
        return attention
    heads = attention.num_heads or own.num_heads
    kv = attention.num_kv_heads if attention.num_heads else own.num_kv_heads
    hd = attention.head_dim or own.head_dim
    hidden = attention.hidden_size or own.hidden_size
    if hd is None and heads and hidden and hidden % heads == 0:
        hd = hidden // heads
    return AttentionShape(heads, kv or heads, hd, hidden)


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
                attention: AttentionShape, overrides: Mapping[str, str], used: set[str],
                facts: Mapping[str, ModuleFacts] | None = None
                ) -> Iterator[tuple[ParamInfo, str | None, str, str]]:
    """``(info, rule from an override or None, "auto" | "override", basis)`` per tensor; tied weights once
    (the first name wins, as ``named_parameters``). Adds the override keys that matched to ``used``.
    ``facts``: what module types say (:func:`module_facts`), when a module was given."""
    facts = facts or {}
    gpt2 = _gpt2_family(pairs, config)
    seen: set[int] = set()
    for name, p in pairs:
        if id(p) in seen:
            continue
        seen.add(id(p))
        shape = tuple(int(s) for s in p.shape)  # global shape, also for a DTensor
        own = facts.get(name)
        role, basis = _combine(classify(name, shape, config), own)
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
        transposed = _is_conv1d_layout(name, shape, module_types.get(name), gpt2)
        geometry = _with_module_geometry(attention, own.attention if own else None)
        info = ParamInfo(name=name, shape=shape, role=role, out_dim=1 if transposed else 0, attention=geometry,
                         qkv_layout=_qkv_layout(name, config) if role == "qkv" else None)
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
        module_types = _module_types(source)
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
                layout = rule_set.layout(info, rule)
            except ValueError as err:
                raise ValueError(f"parameter {info.name!r} (shape {info.shape}, role {info.role!r}, rule "
                                 f"{rule!r}): {err}") from err
            if layout.note:
                notes[info.name] = f"{notes[info.name]}; {layout.note}" if info.name in notes else layout.note
            module = facts[info.name].module if info.name in facts else ""
            rows.append(PlanRow(info.name, info.shape, info.role, layout.rule or rule, layout.n_blocks,
                                layout.block_size, info.out_dim, dict(layout.extra), kind, basis, module))
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


ROLES_ONLY = RuleSet("roles", {role: role for role in ROLES}, layout=_one_block, default="other")
"""Rule = role, one block per tensor: for printing what ``classify`` decided."""
