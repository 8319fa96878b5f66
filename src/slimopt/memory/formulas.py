"""Analytic optimizer-state memory of published models: ``slimopt memory --model NAME [--json]``.

A model is data: the list of its named parameter shapes, generated from its published configuration with
Hugging Face's parameter names (``model.layers.0.self_attn.q_proj.weight``, ``transformer.h.0.attn.c_attn
.weight``, ...), so that the same numbers can be checked against real modules (tests build tiny ones and
compare with :func:`slimopt.state_bytes`). Tied weights are listed once, as ``named_parameters`` does.

Every tensor is first classified by :mod:`slimopt.plans.param_plan` (its role, and its Adam-mini blocks), then each
optimizer's rule in :data:`OPTIMIZER_STATE` (the ONE table of formulas, reused by the planner) gives its
state bytes. All optimizers also keep a 4-byte float32 step counter per tensor, as torch's AdamW and
slimopt's base class do (``step_bytes``); it is negligible for real models but makes small checks exact.

==============  ==================================================================================
adamw-fp32      m and v in fp32: 8 B/param
adamw-bf16      m and v in bf16: 4 B/param
adamw-8bit      m and v in 8 bits: 2 B/param (the papers' counting; ``scale_block`` adds one fp32
                scale per block and state, as block-wise 8-bit Adam stores)
microadam       per tensor (official layout): window of m rows of k int16 indices + k bf16 values
                (4·m·k B, k from block-wise Top-K with ceil), 4-bit error feedback (d/2 B), bf16 min and
                max per quantisation bucket (4·(d/B_q + 1) B); ~ 0.5 + 4·m·k_init + 4/B_q B/param
adam-mini       m in fp32 + one fp32 v per Hessian block (Adam-mini v1.1: tokens for embeddings and
                head, heads for q/k, output neurons for v/o/MLP, one per norm, elementwise for biases)
sinkgd, swan    stateless for the hidden matrices (q, k, v, o, MLP); AdamW fp32 state for embeddings,
                output head, norms, biases
galore          per hidden matrix (a x b), rank r: projector min(a,b)·r + Adam m, v on the projected
                gradient 2·max(a,b)·r elements (GaLore, Zhao et al. 2024, Table 1: mr + 2nr); AdamW
                for the rest
==============  ==================================================================================

Units: GB = 1e9 bytes, GiB = 2^30 bytes; both are printed.
"""

from __future__ import annotations

import argparse
import inspect
import json
import math
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass, field
from typing import Any

__all__ = [
    "MODELS",
    "OPTIMIZER_STATE",
    "PUBLISHED",
    "ModelSpec",
    "StateRule",
    "TensorFacts",
    "analytic_state_bytes",
    "model_shapes",
    "state_table",
    "tensor_facts",
    "tensor_state_bytes",
    "add_arguments",
    "run",
]

GB = 1e9
GiB = 2**30

# roles (from slimopt.plans.param_plan.classify) of the hidden matrices that SinkGD/SWAN update statelessly and GaLore
# projects; everything else (embeddings, head, norms, biases, unrecognised) gets AdamW there
MATRIX_ROLES = frozenset({"query", "key", "value", "qkv", "attn_out", "mlp"})

NamedShapes = list[tuple[str, tuple[int, ...]]]


# ---------------------------------------------------------------------------------------------------------
# models as data


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


# ---------------------------------------------------------------------------------------------------------
# per-tensor facts (role and Adam-mini blocks, from slimopt.plans.param_plan)


@dataclass(frozen=True)
class TensorFacts:
    name: str
    shape: tuple[int, ...]
    role: str  # slimopt.plans.param_plan role
    adam_mini_blocks: int  # second-moment values Adam-mini keeps for this tensor

    @property
    def numel(self) -> int:
        return math.prod(self.shape)


def _named_shapes(source: Any) -> NamedShapes:
    """(name, shape) pairs from pairs of (name, shape) or (name, tensor), or a module (trainable params)."""
    if hasattr(source, "named_parameters"):
        return [(n, tuple(p.shape)) for n, p in source.named_parameters() if p.requires_grad]
    return [(n, tuple(int(s) for s in getattr(x, "shape", x))) for n, x in source]


def tensor_facts(named_shapes: Any, config: Mapping[str, Any] | Any = None) -> list[TensorFacts]:
    """Classify every tensor with :mod:`slimopt.plans.param_plan` (meta tensors: nothing is allocated)."""
    import torch

    from ..plans.param_plan import ADAM_MINI, ParamPlan

    if config is None and hasattr(named_shapes, "config"):
        config = named_shapes.config
    pairs = [(n, torch.empty(s, device="meta")) for n, s in _named_shapes(named_shapes)]
    plan = ParamPlan.build(pairs, ADAM_MINI, config=config, warn=False)
    return [TensorFacts(r.name, tuple(r.shape), r.role, r.n_blocks) for r in plan.rows]


# ---------------------------------------------------------------------------------------------------------
# the formulas: ONE table, name -> rule


@dataclass(frozen=True)
class StateRule:
    """State bytes of one tensor under one optimizer: ``bytes(facts, **options)``."""

    name: str
    summary: str
    bytes: Callable[..., int]
    defaults: dict[str, Any] = field(default_factory=dict)


def _adamw(t: TensorFacts, *, state_bytes: int = 4, step_bytes: int = 4) -> int:
    return 2 * t.numel * state_bytes + step_bytes


def _adamw_8bit(t: TensorFacts, *, scale_block: int | None = None, step_bytes: int = 4) -> int:
    scales = 2 * math.ceil(t.numel / scale_block) * 4 if scale_block else 0  # one fp32 scale per block, m and v
    return 2 * t.numel + scales + step_bytes


def microadam_k(numel: int, k_init: float, topk_block_size: int) -> int:
    """Top-K entries kept per window row: ceil(k_init · block) per Top-K block, the last block shorter."""
    block = min(topk_block_size, numel)
    full, rest = divmod(numel, block)
    return full * math.ceil(block * k_init) + (math.ceil(rest * k_init) if rest else 0)


def _microadam(t: TensorFacts, *, m: int = 10, k_init: float = 0.01, quant_block_size: int = 100_000,
               topk_block_size: int = 20_864, step_bytes: int = 4) -> int:
    # 20,864: the official kernels' Top-K block on an A100 (block-relative indices fit int16)
    d = t.numel
    window = m * microadam_k(d, k_init, topk_block_size) * (2 + 2)  # int16 index + bf16 value
    error_feedback = math.ceil(d / 2)  # two 4-bit codes per byte
    min_max = 2 * (d // quant_block_size + 1) * 2  # bf16 min and max per bucket
    return window + error_feedback + min_max + step_bytes


def _adam_mini(t: TensorFacts, *, m_bytes: int = 4, v_bytes: int = 4, step_bytes: int = 4) -> int:
    return t.numel * m_bytes + t.adam_mini_blocks * v_bytes + step_bytes


def _is_hidden_matrix(t: TensorFacts) -> bool:
    return t.role in MATRIX_ROLES and len(t.shape) == 2


def _stateless_matrices(t: TensorFacts, *, state_bytes: int = 4, step_bytes: int = 4) -> int:
    if _is_hidden_matrix(t):
        return 0
    return _adamw(t, state_bytes=state_bytes, step_bytes=step_bytes)


def _galore(t: TensorFacts, *, rank: int = 256, state_bytes: int = 4, step_bytes: int = 4) -> int:
    if not _is_hidden_matrix(t):
        return _adamw(t, state_bytes=state_bytes, step_bytes=step_bytes)
    small, large = sorted(t.shape)
    r = min(rank, small)
    return (small * r + 2 * large * r) * state_bytes + step_bytes  # projector + m, v of the projected grad


OPTIMIZER_STATE: dict[str, StateRule] = {
    r.name: r
    for r in [
        StateRule("adamw-fp32", "m, v fp32: 8 B/param", _adamw, {"state_bytes": 4}),
        StateRule("adamw-bf16", "m, v bf16: 4 B/param", _adamw, {"state_bytes": 2}),
        StateRule("adamw-8bit", "m, v 8-bit: 2 B/param", _adamw_8bit, {"scale_block": None}),
        StateRule("microadam-m10", "window m=10 of k=1% (int16+bf16) + 4-bit EF + bf16 min/max per 100k",
                  _microadam, {"m": 10, "k_init": 0.01, "quant_block_size": 100_000}),
        StateRule("microadam-m20", "window m=20 of k=1% (int16+bf16) + 4-bit EF + bf16 min/max per 100k",
                  _microadam, {"m": 20, "k_init": 0.01, "quant_block_size": 100_000}),
        StateRule("adam-mini", "m fp32 + one fp32 v per block (tokens, heads, neurons, tensors)",
                  _adam_mini, {"m_bytes": 4, "v_bytes": 4}),
        StateRule("sinkgd", "none for hidden matrices; AdamW fp32 for embeddings/head/norms/biases",
                  _stateless_matrices, {"state_bytes": 4}),
        StateRule("swan", "none for hidden matrices; AdamW fp32 for embeddings/head/norms/biases",
                  _stateless_matrices, {"state_bytes": 4}),
        StateRule("galore", "rank-r projector + fp32 m, v of r x n (hidden matrices); AdamW fp32 rest",
                  _galore, {"state_bytes": 4}),
    ]
}

# what the papers print, for side-by-side display (and the tests)
PUBLISHED: dict[tuple[str, str], tuple[float, str, str]] = {
    ("llama2-7b", "adamw-bf16"): (25.1, "GiB", "MicroAdam paper (4 B/param)"),
    ("llama2-7b", "adamw-8bit"): (12.55, "GiB", "MicroAdam paper (2 B/param)"),
    ("llama2-7b", "microadam-m10"): (5.65, "GiB", "MicroAdam paper (m=10, k=1%)"),
    ("llama2-7b", "adamw-fp32"): (53.92, "GB", "Adam-mini paper, Fig. 1 (m+v; = 8 B x 6.74e9)"),
    ("llama2-7b", "adam-mini"): (26.96, "GB", "Adam-mini paper, Fig. 1 (m+v)"),
}


def _rule(optimizer: str) -> StateRule:
    if optimizer not in OPTIMIZER_STATE:
        raise KeyError(f"unknown optimizer {optimizer!r}; known: {', '.join(OPTIMIZER_STATE)}")
    return OPTIMIZER_STATE[optimizer]


def tensor_state_bytes(facts: Iterable[TensorFacts], optimizer: str, **options: Any) -> dict[str, int]:
    """State bytes per tensor name under ``optimizer`` (options override the table's defaults)."""
    rule = _rule(optimizer)
    kwargs = {**rule.defaults, **options}
    return {t.name: rule.bytes(t, **kwargs) for t in facts}


def analytic_state_bytes(named_shapes: Any, optimizer: str, *, config: Any = None, **options: Any) -> int:
    """Total optimizer-state bytes of ``optimizer`` (a key of :data:`OPTIMIZER_STATE`) for a model.

    ``named_shapes``: (name, shape) or (name, tensor) pairs, or an ``nn.Module``. ``config`` (a dict or a HF
    config) gives the attention geometry Adam-mini's head blocks need; a module's ``.config`` is used by
    default. ``options`` override the formula's defaults, e.g. ``m=20`` or ``rank=128``.
    """
    facts = named_shapes if _is_facts(named_shapes) else tensor_facts(named_shapes, config)
    return sum(tensor_state_bytes(facts, optimizer, **options).values())


def _is_facts(obj: Any) -> bool:
    return isinstance(obj, list) and bool(obj) and all(isinstance(t, TensorFacts) for t in obj)


def state_table(model: str, optimizers: Iterable[str] | None = None,
                options: Mapping[str, Mapping[str, Any]] | None = None) -> dict[str, Any]:
    """Everything ``slimopt memory`` prints for one published model, as JSON-able data.

    ``options`` maps an optimizer to overrides of its formula's defaults, e.g. ``{"galore": {"rank": 128}}``
    (GaLore's rank defaults to the one used for the model's size).
    """
    options = options or {}
    if model not in MODELS:
        raise KeyError(f"unknown model {model!r}; known: {', '.join(MODELS)}")
    spec = MODELS[model]
    facts = tensor_facts(spec.shapes(), spec.config)
    n_params = sum(t.numel for t in facts)
    names = list(optimizers or OPTIMIZER_STATE)
    reference = sum(tensor_state_bytes(facts, "adamw-fp32").values())
    rows = []
    for name in names:
        chosen = {"rank": spec.galore_rank} if name == "galore" else {}
        chosen.update(options.get(name, {}))
        total = sum(tensor_state_bytes(facts, name, **chosen).values())
        row = {
            "optimizer": name, "bytes": total, "bytes_per_param": total / n_params,
            "GB": total / GB, "GiB": total / GiB, "vs_adamw_fp32": total / reference,
            "options": {**_rule(name).defaults, **chosen}, "formula": _rule(name).summary,
        }
        if chosen:
            row["formula"] += " [" + ", ".join(f"{k}={v}" for k, v in chosen.items()) + "]"
        if (model, name) in PUBLISHED and not options.get(name):
            value, unit, where = PUBLISHED[(model, name)]
            row["published"] = {"value": value, "unit": unit, "source": where}
        rows.append(row)
    return {"model": model, "source": spec.source, "config": dict(spec.config), "params": n_params,
            "tensors": len(facts), "units": {"GB": "1e9 bytes", "GiB": "2^30 bytes"},
            "note": "optimizer state only (not weights, gradients or activations); includes a 4-byte "
                    "step counter per tensor", "optimizers": rows}


# ---------------------------------------------------------------------------------------------------------
# command line


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--model", action="append", metavar="NAME",
                        help=f"published model (repeatable, or 'all'): {', '.join(MODELS)}")
    parser.add_argument("--optimizer", action="append", metavar="NAME",
                        help=f"restrict to these optimizers (repeatable): {', '.join(OPTIMIZER_STATE)}")
    parser.add_argument("--set", action="append", default=[], metavar="OPTIMIZER.KEY=VALUE",
                        help="override a formula option, e.g. galore.rank=128, microadam-m10.quant_block_size=64, "
                             "adamw-8bit.scale_block=256")
    parser.add_argument("--json", action="store_true", help="print machine-readable JSON")


def _parse_value(text: str) -> Any:
    if text.lower() == "none":
        return None
    for kind in (int, float):
        try:
            return kind(text)
        except ValueError:
            pass
    raise ValueError(f"not a number: {text!r}")


def parse_settings(settings: Iterable[str]) -> dict[str, dict[str, Any]]:
    """``["galore.rank=128"]`` -> ``{"galore": {"rank": 128}}``; names and keys are checked."""
    out: dict[str, dict[str, Any]] = {}
    for setting in settings:
        target, _, value = setting.partition("=")
        optimizer, _, key = target.rpartition(".")
        if not value or not key or optimizer not in OPTIMIZER_STATE:
            raise ValueError(f"--set {setting!r}: expected OPTIMIZER.KEY=VALUE with OPTIMIZER one of "
                             f"{', '.join(OPTIMIZER_STATE)}")
        known = [p for p in inspect.signature(OPTIMIZER_STATE[optimizer].bytes).parameters if p != "t"]
        if key not in known:
            raise ValueError(f"--set {setting!r}: {optimizer} has no option {key!r} (options: {', '.join(known)})")
        out.setdefault(optimizer, {})[key] = _parse_value(value)
    return out


def _format(table: dict[str, Any]) -> str:
    header = ("optimizer", "B/param", "GB (1e9 B)", "GiB (2^30 B)", "vs AdamW fp32", "paper", "state")
    lines = [header]
    for r in table["optimizers"]:
        published = r.get("published")
        paper = f"{published['value']:g} {published['unit']}" if published else ""
        lines.append((r["optimizer"], f"{r['bytes_per_param']:.3f}", f"{r['GB']:.2f}", f"{r['GiB']:.2f}",
                      f"{100 * r['vs_adamw_fp32']:.1f}%", paper, r["formula"]))
    widths = [max(len(line[i]) for line in lines) for i in range(len(header) - 1)]
    right = {1, 2, 3, 4}
    out = [f"{table['model']}: {table['params']:,} parameters in {table['tensors']} tensors "
           f"({table['source']})",
           "optimizer-state memory; GB = 1e9 bytes, GiB = 2^30 bytes; a 4-byte step counter per tensor included"]
    for i, line in enumerate(lines):
        cells = [c.rjust(w) if j in right else c.ljust(w) for j, (c, w) in enumerate(zip(line, widths))]
        out.append("  ".join(cells) + "  " + line[-1])
        if i == 0:
            out.append("  ".join("-" * w for w in widths) + "  " + "-" * len(header[-1]))
    sources = list(dict.fromkeys(r["published"]["source"] for r in table["optimizers"] if "published" in r))
    if sources:
        out.append("paper: " + "; ".join(sources))
    return "\n".join(out)


def run(args: argparse.Namespace) -> int:
    models = args.model or []
    if not models:
        print("models (use --model NAME, or --model all):")
        for spec in MODELS.values():
            n = sum(math.prod(s) for _, s in spec.shapes())
            print(f"  {spec.name:<12} {n / 1e6:>9.1f}M  {spec.source}")
        return 0
    if "all" in models:
        models = list(MODELS)
    unknown = [m for m in models if m not in MODELS] + [o for o in args.optimizer or [] if o not in OPTIMIZER_STATE]
    if unknown:
        print(f"unknown: {', '.join(unknown)}; models: {', '.join(MODELS)}; "
              f"optimizers: {', '.join(OPTIMIZER_STATE)}")
        return 2
    try:
        settings = parse_settings(args.set)
    except ValueError as exc:
        print(exc)
        return 2
    tables = [state_table(m, args.optimizer, settings) for m in models]
    if args.json:
        print(json.dumps(tables[0] if len(tables) == 1 else tables, indent=1))
    else:
        print("\n\n".join(_format(t) for t in tables))
    return 0
