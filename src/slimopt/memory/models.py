"""Published models as data: their named parameter shapes, generated from each published configuration with
Hugging Face's parameter names (``model.layers.0.self_attn.q_proj.weight``, ``transformer.h.0.attn.c_attn
.weight``, ...), so that the same numbers can be checked against real modules (tests build tiny ones and
compare with :func:`slimopt.state_bytes`). Tied weights are listed once, as ``named_parameters`` does.
"""

from __future__ import annotations

import json
import math
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

__all__ = ["FAMILIES", "MODELS", "ModelSpec", "NamedShapes", "UnsupportedConfig", "model_shapes", "resolve_model",
           "spec_from_config"]

NamedShapes = list[tuple[str, tuple[int, ...]]]




@dataclass(frozen=True)
class ModelSpec:
    """A published configuration (HF-style keys, read by :mod:`slimopt.plans.param_plan` for attention geometry)."""

    name: str
    family: str  # "llama", "gpt2", "bert", "opt"
    config: Mapping[str, Any]
    source: str  # where the configuration comes from
    galore_rank: int  # the rank GaLore used (or would use) for this size

    def shapes(self) -> NamedShapes:
        return _GENERATORS[self.family](self.config)


def _llama(c: Mapping[str, Any]) -> NamedShapes:
    """LlamaForCausalLM and the models that share its layout: Mistral (the same), Qwen2 (biases on q, k and
    v), Qwen3 (an RMSNorm over each head of q and k; biases when ``attention_bias``)."""
    h, f, v = c["hidden_size"], c["intermediate_size"], c["vocab_size"]
    hd = c.get("head_dim") or h // c["num_attention_heads"]
    q, kv = c["num_attention_heads"] * hd, c.get("num_key_value_heads", c["num_attention_heads"]) * hd
    model_type = c.get("model_type", "llama")
    qkv_bias = model_type == "qwen2" or bool(c.get("attention_bias", False))
    o_bias = model_type not in ("qwen2", "qwen3") and bool(c.get("attention_bias", False))
    mlp_bias = bool(c.get("mlp_bias", False))

    def linear(name: str, out_features: int, in_features: int, bias: bool) -> NamedShapes:
        return [(name + ".weight", (out_features, in_features))] + ([(name + ".bias", (out_features,))] if bias else [])

    out: NamedShapes = [("model.embed_tokens.weight", (v, h))]
    for i in range(c["num_hidden_layers"]):
        p = f"model.layers.{i}."
        out += [
            *linear(p + "self_attn.q_proj", q, h, qkv_bias),
            *linear(p + "self_attn.k_proj", kv, h, qkv_bias),
            *linear(p + "self_attn.v_proj", kv, h, qkv_bias),
            *linear(p + "self_attn.o_proj", h, q, o_bias),
        ]
        if model_type == "qwen3":
            out += [(p + "self_attn.q_norm.weight", (hd,)), (p + "self_attn.k_norm.weight", (hd,))]
        out += [
            *linear(p + "mlp.gate_proj", f, h, mlp_bias),
            *linear(p + "mlp.up_proj", f, h, mlp_bias),
            *linear(p + "mlp.down_proj", h, f, mlp_bias),
            (p + "input_layernorm.weight", (h,)),
            (p + "post_attention_layernorm.weight", (h,)),
        ]
    out.append(("model.norm.weight", (h,)))
    if not c.get("tie_word_embeddings", False):
        out.append(("lm_head.weight", (v, h)))
    return out


def _gpt2(c: Mapping[str, Any]) -> NamedShapes:
    # GPT-2's Conv1D stores weights as (in, out); lm_head is tied to wte and not listed
    e, v, n_pos = c["n_embd"], c["vocab_size"], c["n_positions"]
    inner = c.get("n_inner") or 4 * e
    out: NamedShapes = [("transformer.wte.weight", (v, e)), ("transformer.wpe.weight", (n_pos, e))]
    for i in range(c["n_layer"]):
        p = f"transformer.h.{i}."
        out += [
            (p + "ln_1.weight", (e,)), (p + "ln_1.bias", (e,)),
            (p + "attn.c_attn.weight", (e, 3 * e)), (p + "attn.c_attn.bias", (3 * e,)),
            (p + "attn.c_proj.weight", (e, e)), (p + "attn.c_proj.bias", (e,)),
            (p + "ln_2.weight", (e,)), (p + "ln_2.bias", (e,)),
            (p + "mlp.c_fc.weight", (e, inner)), (p + "mlp.c_fc.bias", (inner,)),
            (p + "mlp.c_proj.weight", (inner, e)), (p + "mlp.c_proj.bias", (e,)),
        ]
    out += [("transformer.ln_f.weight", (e,)), ("transformer.ln_f.bias", (e,))]
    return out


def _linear(name: str, out_features: int, in_features: int) -> NamedShapes:
    return [(name + ".weight", (out_features, in_features)), (name + ".bias", (out_features,))]


def _layer_norm(name: str, size: int) -> NamedShapes:
    return [(name + ".weight", (size,)), (name + ".bias", (size,))]


def _bert(c: Mapping[str, Any]) -> NamedShapes:
    # BertForSequenceClassification: encoder + pooler + classifier (num_labels classes)
    h, f = c["hidden_size"], c["intermediate_size"]
    out: NamedShapes = [
        ("bert.embeddings.word_embeddings.weight", (c["vocab_size"], h)),
        ("bert.embeddings.position_embeddings.weight", (c["max_position_embeddings"], h)),
        ("bert.embeddings.token_type_embeddings.weight", (c["type_vocab_size"], h)),
        *_layer_norm("bert.embeddings.LayerNorm", h),
    ]
    for i in range(c["num_hidden_layers"]):
        p = f"bert.encoder.layer.{i}."
        out += [
            *_linear(p + "attention.self.query", h, h),
            *_linear(p + "attention.self.key", h, h),
            *_linear(p + "attention.self.value", h, h),
            *_linear(p + "attention.output.dense", h, h),
            *_layer_norm(p + "attention.output.LayerNorm", h),
            *_linear(p + "intermediate.dense", f, h),
            *_linear(p + "output.dense", h, f),
            *_layer_norm(p + "output.LayerNorm", h),
        ]
    out += [*_linear("bert.pooler.dense", h, h), *_linear("classifier", c["num_labels"], h)]
    return out


def _opt(c: Mapping[str, Any]) -> NamedShapes:
    # OPTForCausalLM, lm_head tied; a word_embed_proj_dim other than hidden_size adds project_in/out (350m),
    # and the final norm exists only with do_layer_norm_before (and not _remove_final_layer_norm)
    h, f = c["hidden_size"], c["ffn_dim"]
    e = c.get("word_embed_proj_dim") or h
    out: NamedShapes = [
        ("model.decoder.embed_tokens.weight", (c["vocab_size"], e)),
        ("model.decoder.embed_positions.weight", (c["max_position_embeddings"] + 2, h)),  # OPT's offset 2
    ]
    if e != h:
        out += [("model.decoder.project_out.weight", (e, h)), ("model.decoder.project_in.weight", (h, e))]
    if c.get("do_layer_norm_before", True) and not c.get("_remove_final_layer_norm", False):
        out += _layer_norm("model.decoder.final_layer_norm", h)
    for i in range(c["num_hidden_layers"]):
        p = f"model.decoder.layers.{i}."
        out += [
            *_linear(p + "self_attn.k_proj", h, h),
            *_linear(p + "self_attn.v_proj", h, h),
            *_linear(p + "self_attn.q_proj", h, h),
            *_linear(p + "self_attn.out_proj", h, h),
            *_layer_norm(p + "self_attn_layer_norm", h),
            *_linear(p + "fc1", f, h),
            *_linear(p + "fc2", h, f),
            *_layer_norm(p + "final_layer_norm", h),
        ]
    return out


_GENERATORS: dict[str, Callable[[Mapping[str, Any]], NamedShapes]] = {
    "llama": _llama, "gpt2": _gpt2, "bert": _bert, "opt": _opt}


def _llama_cfg(hidden: int, ffn: int, layers: int, heads: int, kv_heads: int | None = None) -> dict[str, Any]:
    return {"model_type": "llama", "vocab_size": 32000, "hidden_size": hidden, "intermediate_size": ffn,
            "num_hidden_layers": layers, "num_attention_heads": heads,
            "num_key_value_heads": kv_heads or heads, "tie_word_embeddings": False}


def _gpt2_cfg(embd: int, layers: int, heads: int) -> dict[str, Any]:
    return {"model_type": "gpt2", "vocab_size": 50257, "n_positions": 1024, "n_embd": embd, "n_layer": layers,
            "n_head": heads}


def _bert_cfg(hidden: int, layers: int, heads: int, ffn: int) -> dict[str, Any]:
    return {"model_type": "bert", "vocab_size": 30522, "max_position_embeddings": 512, "type_vocab_size": 2,
            "hidden_size": hidden, "num_hidden_layers": layers, "num_attention_heads": heads,
            "intermediate_size": ffn, "num_labels": 3}


_GALORE_C4 = "GaLore C4 configs (configs/llama_*.json)"
MODELS: dict[str, ModelSpec] = {
    m.name: m
    for m in [
        ModelSpec("bert-base", "bert", _bert_cfg(768, 12, 12, 3072),
                  "bert-base-uncased, as BertForSequenceClassification with 3 labels (MNLI)", 256),
        ModelSpec("bert-large", "bert", _bert_cfg(1024, 24, 16, 4096),
                  "bert-large-uncased, as BertForSequenceClassification with 3 labels (MNLI)", 256),
        ModelSpec("opt-1.3b", "opt",
                  {"model_type": "opt", "vocab_size": 50272, "hidden_size": 2048, "ffn_dim": 8192,
                   "num_hidden_layers": 24, "num_attention_heads": 32, "max_position_embeddings": 2048},
                  "facebook/opt-1.3b (OPTForCausalLM, tied head)", 256),
        ModelSpec("gpt2", "gpt2", _gpt2_cfg(768, 12, 12), "gpt2 (124M, tied head)", 256),
        ModelSpec("gpt2-medium", "gpt2", _gpt2_cfg(1024, 24, 16), "gpt2-medium (355M, tied head)", 256),
        ModelSpec("gpt2-large", "gpt2", _gpt2_cfg(1280, 36, 20), "gpt2-large (774M, tied head)", 512),
        ModelSpec("gpt2-xl", "gpt2", _gpt2_cfg(1600, 48, 25), "gpt2-xl (1.5B, tied head)", 512),
        ModelSpec("llama-60m", "llama", _llama_cfg(512, 1376, 8, 8), _GALORE_C4, 128),
        ModelSpec("llama-130m", "llama", _llama_cfg(768, 2048, 12, 12), _GALORE_C4, 256),
        ModelSpec("llama-350m", "llama", _llama_cfg(1024, 2736, 24, 16), _GALORE_C4, 256),
        ModelSpec("llama-1b", "llama", _llama_cfg(2048, 5461, 24, 32), _GALORE_C4, 512),
        ModelSpec("llama2-7b", "llama", _llama_cfg(4096, 11008, 32, 32), "meta-llama/Llama-2-7b-hf", 1024),
        ModelSpec("llama2-13b", "llama", _llama_cfg(5120, 13824, 40, 40), "meta-llama/Llama-2-13b-hf", 1024),
    ]
}


def model_shapes(name: str) -> NamedShapes:
    """The named parameter shapes of published model ``name`` (HF names, tied weights once)."""
    if name not in MODELS:
        raise KeyError(f"unknown model {name!r}; known: {', '.join(MODELS)}")
    return MODELS[name].shapes()


# ---------------------------------------------------------------------------------------------------------
# a model's own config.json (``slimopt plan --model PATH``, ``slimopt memory --model PATH``)


class UnsupportedConfig(ValueError):
    """A config.json whose shapes this module cannot write out; the message names what is missing."""


# model_type -> (family of the shape generator, keys it needs, defaults of the transformers config class for
# keys a config.json may leave out)
_LLAMA_NEEDS = ("hidden_size", "intermediate_size", "num_hidden_layers", "num_attention_heads", "vocab_size")
_LLAMA_DEFAULTS = {"tie_word_embeddings": False, "attention_bias": False, "mlp_bias": False}
FAMILIES: dict[str, tuple[str, tuple[str, ...], dict[str, Any]]] = {
    "llama": ("llama", _LLAMA_NEEDS, _LLAMA_DEFAULTS),
    "mistral": ("llama", _LLAMA_NEEDS, _LLAMA_DEFAULTS),
    "qwen2": ("llama", _LLAMA_NEEDS, _LLAMA_DEFAULTS),
    "qwen3": ("llama", _LLAMA_NEEDS, _LLAMA_DEFAULTS),
    "gpt2": ("gpt2", ("n_embd", "n_layer", "n_head", "vocab_size", "n_positions"), {}),
    "bert": ("bert", ("hidden_size", "intermediate_size", "num_hidden_layers", "num_attention_heads", "vocab_size",
                      "max_position_embeddings"), {"type_vocab_size": 2}),
    "opt": ("opt", ("hidden_size", "ffn_dim", "num_hidden_layers", "num_attention_heads", "vocab_size",
                    "max_position_embeddings"), {}),
}


def _galore_rank_for(n_params: int) -> int:
    """GaLore's rank by model size, as the published entries above (60M: 128 ... 7B: 1024)."""
    for limit, rank in ((100e6, 128), (1e9, 256), (3e9, 512)):
        if n_params < limit:
            return rank
    return 1024


def spec_from_config(config: Mapping[str, Any], name: str = "config.json") -> ModelSpec:
    """A :class:`ModelSpec` from a Hugging Face ``config.json`` (as a dict) of a family whose shapes are
    known (:data:`FAMILIES`); raises :class:`UnsupportedConfig` naming the model type or the keys missing."""
    model_type = config.get("model_type")
    if model_type is None:
        raise UnsupportedConfig(f"{name} has no model_type (one of {', '.join(FAMILIES)} is needed to know the "
                                "parameter shapes)")
    if model_type not in FAMILIES:
        raise UnsupportedConfig(f"{name}: model_type {model_type!r} is not one whose parameter shapes slimopt "
                                f"knows ({', '.join(FAMILIES)})")
    family, needs, defaults = FAMILIES[model_type]
    missing = [key for key in needs if config.get(key) is None]
    if missing:
        raise UnsupportedConfig(f"{name}: a {model_type} config needs {', '.join(missing)} (missing)")
    filled = {**defaults, **{k: v for k, v in config.items() if v is not None}}
    if family == "llama":
        filled.setdefault("num_key_value_heads", filled["num_attention_heads"])
    if family == "bert":  # counted as BertForSequenceClassification (the memory table's BERT rows)
        filled.setdefault("num_labels", len(config.get("id2label") or {}) or 2)
    architectures = ", ".join(config.get("architectures") or []) or model_type
    source = f"{name} ({architectures}" + (f", {filled['num_labels']}-label classifier" if family == "bert" else "")
    source += ", tied head)" if family != "llama" or filled.get("tie_word_embeddings") else ")"
    spec = ModelSpec(name, family, filled, source, 256)
    n_params = sum(math.prod(shape) for _, shape in spec.shapes())
    return ModelSpec(name, family, filled, source, _galore_rank_for(n_params))


def resolve_model(value: str) -> ModelSpec:
    """``--model`` of ``slimopt plan`` / ``slimopt memory``: a published model's name, or a ``config.json``
    or a folder holding one. Raises ``KeyError`` (unknown name, missing file) or :class:`UnsupportedConfig`."""
    if value in MODELS:
        return MODELS[value]
    path = Path(value).expanduser()
    if path.is_dir():
        path = path / "config.json"
        if not path.is_file():
            raise KeyError(f"--model {value!r}: the folder has no config.json")
    if not path.is_file():
        raise KeyError(f"--model {value!r}: unknown model: not a published one ({', '.join(MODELS)}), nor a "
                       "config.json or a folder with one")
    try:
        config = json.loads(path.read_text())
    except (OSError, ValueError) as exc:
        raise UnsupportedConfig(f"--model {value!r}: {path} does not parse as JSON: {exc}") from None
    if not isinstance(config, dict):
        raise UnsupportedConfig(f"--model {value!r}: {path} is not a JSON object")
    try:
        return spec_from_config(config, name=str(path))
    except UnsupportedConfig as exc:
        raise UnsupportedConfig(f"--model {value!r}: {exc}") from None
