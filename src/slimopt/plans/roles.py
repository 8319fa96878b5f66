"""Roles: what a tensor is in a Transformer, one of ``ROLES``, from its name and rank alone.

``classify(name, shape)`` is a pure function of its arguments. Where it recognises a tensor, its answer wins over
what module types say (``plans.module_facts``)::

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

Naming schemes covered: LLaMA/Mistral/Qwen2/Qwen3/Gemma, GPT-2 (and nanoGPT), BERT/RoBERTa, OPT, T5,
GPT-NeoX/Falcon, the original LLaMA/torchtitan names (wq, w1, tok_embeddings, output), and PEFT wrappers
(``base_layer``, ``modules_to_save`` are looked through; ``base_layer`` keeps its role).
"""

from __future__ import annotations

import re
from collections.abc import Iterable
from typing import Any

__all__ = ["HIDDEN_ROLES", "ROLES", "ROLE_FALLBACK", "ROLE_HELP", "classify", "name_components"]

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
# roles from names

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


def name_components(name: str) -> list[str]:
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
    comps = name_components(name)
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
