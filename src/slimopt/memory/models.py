"""Published models as data: their named parameter shapes, generated from each published configuration with
Hugging Face's parameter names (``model.layers.0.self_attn.q_proj.weight``, ``transformer.h.0.attn.c_attn
.weight``, ...), so that the same numbers can be checked against real modules (tests build tiny ones and
compare with :func:`slimopt.state_bytes`). Tied weights are listed once, as ``named_parameters`` does.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import Any

__all__ = ["MODELS", "ModelSpec", "NamedShapes", "model_shapes"]

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
    h, f, v = c["hidden_size"], c["intermediate_size"], c["vocab_size"]
    hd = h // c["num_attention_heads"]
    q, kv = c["num_attention_heads"] * hd, c["num_key_value_heads"] * hd
    out: NamedShapes = [("model.embed_tokens.weight", (v, h))]
    for i in range(c["num_hidden_layers"]):
        p = f"model.layers.{i}."
        out += [
            (p + "self_attn.q_proj.weight", (q, h)),
            (p + "self_attn.k_proj.weight", (kv, h)),
            (p + "self_attn.v_proj.weight", (kv, h)),
            (p + "self_attn.o_proj.weight", (h, q)),
            (p + "mlp.gate_proj.weight", (f, h)),
            (p + "mlp.up_proj.weight", (f, h)),
            (p + "mlp.down_proj.weight", (h, f)),
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
    # OPTForCausalLM with word_embed_proj_dim == hidden_size (no project_in/out); lm_head tied
    h, f = c["hidden_size"], c["ffn_dim"]
    out: NamedShapes = [
        ("model.decoder.embed_tokens.weight", (c["vocab_size"], h)),
        ("model.decoder.embed_positions.weight", (c["max_position_embeddings"] + 2, h)),  # OPT's offset 2
        *_layer_norm("model.decoder.final_layer_norm", h),
    ]
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
