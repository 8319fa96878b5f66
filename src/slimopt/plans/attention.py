"""Attention geometry and how projections are stored, read from ``model.config``, keyword arguments and names.

* ``AttentionShape``: heads, kv heads, head_dim, hidden size (``from_config`` reads HF-style configs, dicts too;
  ``with_module_geometry`` fills what the config leaves unknown from an attention module's own attributes);
* ``stored_transposed``: whether a 2-D weight is stored ``(in, out)``, GPT-2's ``Conv1D`` (decided once per model
  by ``gpt2_family``: nanoGPT uses the same names for ``nn.Linear`` weights stored ``(out, in)``);
* ``qkv_order``: how a fused projection's output neurons hold q, k and v.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

from torch import Tensor

from .roles import name_components

__all__ = ["AttentionShape", "config_value", "gpt2_family", "qkv_order", "stored_transposed", "with_module_geometry"]


def config_value(config: Any, *keys: str) -> Any:
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
        heads = num_heads or config_value(config, "num_attention_heads", "n_head", "num_heads", "n_heads")
        kv = num_kv_heads or config_value(config, "num_key_value_heads", "num_kv_heads", "n_kv_heads",
                                           "multi_query_group_num")
        if kv is None and heads is not None and config_value(config, "multi_query") is True:
            kv = 1
        hidden = hidden_size or config_value(config, "hidden_size", "n_embd", "d_model", "dim")
        hd = head_dim or config_value(config, "head_dim", "d_kv", "kv_channels")
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


def with_module_geometry(attention: AttentionShape, own: AttentionShape | None) -> AttentionShape:
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


def stored_transposed(name: str, shape: tuple[int, ...], module_type: str | None, gpt2: bool | None) -> bool:
    """Whether a weight is stored ``(in, out)``: GPT-2's ``Conv1D`` is; nanoGPT's same names are ``nn.Linear``
    ``(out, in)`` (``gpt2``: ``gpt2_family``'s answer for the model, used when the module type is unknown)."""
    if len(shape) != 2:
        return False
    if module_type is not None:
        return module_type == "Conv1D"
    proj = name_components(name)[-2] if len(name_components(name)) > 1 else ""
    if proj not in ("c_attn", "c_fc", "c_proj", "q_attn"):
        return False
    return bool(gpt2)


def gpt2_family(pairs: list[tuple[str, Tensor]], config: Any) -> bool | None:
    """Whether c_attn/c_fc/c_proj are stored transposed, decided once for the whole model.

    The config's ``model_type`` settles it; otherwise a non-square ``c_attn`` (``(E, 3E)`` vs
    ``(3E, E)``) or ``c_fc`` shows the storage, which then applies to the square ``c_proj`` too.
    """
    model_type = config_value(config, "model_type")
    if model_type is not None:
        return model_type in ("gpt2", "gpt_bigcode", "imagegpt", "decision_transformer")
    for name, p in pairs:
        comps = name_components(name)
        shape = tuple(p.shape)
        if len(comps) > 1 and comps[-2] in ("c_attn", "c_fc") and len(shape) == 2 and shape[0] != shape[1]:
            return shape[1] > shape[0]
    return None


def qkv_order(name: str, config: Any) -> str:
    """How a fused projection's output neurons hold q, k and v: ``"concat"`` ([q | k | v]) or ``"grouped"`` (per
    kv group [q_1 .. q_g, k, v]: GPT-NeoX, Bloom, Falcon)."""
    comps = name_components(name)
    proj = comps[-2] if len(comps) > 1 else comps[-1]
    if proj == "query_key_value" and config_value(config, "model_type") not in ("chatglm",):
        return "grouped"  # GPT-NeoX, Bloom, Falcon: per kv group [q_1..q_g, k, v], each head_dim rows
    return "concat"
