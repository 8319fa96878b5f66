"""Roles from module types and shapes, when a module is given (``module_facts``), and how they combine with the
roles names give (``combine_roles``).

``nn.Embedding`` -> embedding; ``nn.Linear`` and GPT-2's ``Conv1D`` -> a hidden matrix (``hidden``), except the
model's output layer (a Linear tied to an embedding, mapping to the vocabulary, or the last Linear when it maps
out of the model's input width: a classifier) -> head; ``nn.MultiheadAttention`` -> qkv / attn_out with its own
heads; norm modules (LayerNorm, RMSNorm, BatchNorm, GroupNorm, any class whose name ends in ``Norm``) -> norm;
convolutions (3-D+ weights) -> ``conv``. Then names refine this for known architectures (``roles.classify``), and
where names recognise a tensor, they win.
"""

from __future__ import annotations

import re
from dataclasses import dataclass

import torch
from torch import Tensor

from .attention import AttentionShape
from .roles import HIDDEN_ROLES

__all__ = ["ModuleFacts", "combine_roles", "module_classes", "module_facts"]


def module_classes(model: torch.nn.Module) -> dict[str, str]:
    """The class name of the module that owns each parameter of ``model`` (by the parameter's full name)."""
    types = {}
    for mname, module in model.named_modules():
        for pname, _ in module.named_parameters(recurse=False):
            types[f"{mname}.{pname}" if mname else pname] = type(module).__name__
    return types


_NORM_TYPE = re.compile(r"norm(\d*d)?$", re.IGNORECASE)  # LayerNorm, RMSNorm, BatchNorm2d, GroupNorm, T5LayerNorm
_HEADS_ATTRS = ("num_heads", "num_attention_heads", "n_heads", "n_head", "nhead")
_KV_HEADS_ATTRS = ("num_kv_heads", "num_key_value_heads", "n_kv_heads")
_HEAD_DIM_ATTRS = ("head_dim", "attention_head_size", "head_size")
_MHA_ROLES = {"in_proj_weight": "qkv", "q_proj_weight": "query", "k_proj_weight": "key", "v_proj_weight": "value",
              "in_proj_bias": "bias", "bias_k": "bias", "bias_v": "bias"}


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


def combine_roles(name_role: str, facts: ModuleFacts | None) -> tuple[str, str]:
    """(role, basis): names win where they recognise the tensor, module types decide the rest; an
    embedding module stays an embedding whatever its name suggests."""
    if facts is None or facts.role is None:
        return name_role, ("name" if name_role != "other" else "")
    if name_role in ("other", facts.role):
        return facts.role, facts.why
    if facts.role == "embedding" and name_role in HIDDEN_ROLES:
        return "embedding", facts.why
    return name_role, "name"
