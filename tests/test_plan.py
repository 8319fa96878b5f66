"""Parameter plans: roles from names + shapes, layouts, validation, overrides, param groups.

The expected roles below are written out by hand from each architecture's documented module layout,
not computed by the code under test.
"""

from __future__ import annotations

import warnings

import pytest
import torch

from slimopt.optim.adam_mini import ADAM_MINI
from slimopt.plans.param_plan import ROLES, ROLES_ONLY, AttentionShape, ParamPlan, classify

transformers = pytest.importorskip("transformers")


def _tiny_models():
    t = transformers
    return {
        "llama": lambda: t.LlamaForCausalLM(t.LlamaConfig(
            vocab_size=64, hidden_size=32, intermediate_size=48, num_hidden_layers=1, num_attention_heads=4,
            num_key_value_heads=2)),
        "qwen3": lambda: t.Qwen3ForCausalLM(t.Qwen3Config(
            vocab_size=64, hidden_size=32, intermediate_size=48, num_hidden_layers=1, num_attention_heads=4,
            num_key_value_heads=2, head_dim=16)),
        "gpt2": lambda: t.GPT2LMHeadModel(t.GPT2Config(
            vocab_size=64, n_embd=32, n_layer=1, n_head=4, n_positions=16, bos_token_id=0, eos_token_id=0)),
        "bert": lambda: t.BertModel(t.BertConfig(
            vocab_size=64, hidden_size=32, num_hidden_layers=1, num_attention_heads=4, intermediate_size=48,
            max_position_embeddings=16)),
        "opt": lambda: t.OPTForCausalLM(t.OPTConfig(
            vocab_size=64, hidden_size=32, num_hidden_layers=1, num_attention_heads=4, ffn_dim=48,
            max_position_embeddings=16, word_embed_proj_dim=32)),
        "t5": lambda: t.T5ForConditionalGeneration(t.T5Config(
            vocab_size=64, d_model=32, d_kv=8, d_ff=48, num_layers=1, num_heads=4)),
    }


# (name suffix, role, rule, n_blocks) for each scheme; hidden 32, 4 heads (head_dim 8; Qwen3 head_dim 16)
EXPECTED = {
    "llama": [
        ("model.embed_tokens.weight", "embedding", "rows", 64),
        ("self_attn.q_proj.weight", "query", "heads", 4),
        ("self_attn.k_proj.weight", "key", "heads", 2),  # GQA: kv heads
        ("self_attn.v_proj.weight", "value", "rows", 16),
        ("self_attn.o_proj.weight", "attn_out", "rows", 32),
        ("mlp.gate_proj.weight", "mlp", "rows", 48),
        ("mlp.down_proj.weight", "mlp", "rows", 32),
        ("input_layernorm.weight", "norm", "whole", 1),
        ("model.norm.weight", "norm", "whole", 1),
        ("lm_head.weight", "head", "rows", 64),
    ],
    "qwen3": [
        ("self_attn.q_proj.weight", "query", "heads", 4),  # 64 rows / head_dim 16, not hidden/heads = 8
        ("self_attn.k_proj.weight", "key", "heads", 2),
        ("self_attn.q_norm.weight", "norm", "whole", 1),
        ("self_attn.k_norm.weight", "norm", "whole", 1),
        ("self_attn.o_proj.weight", "attn_out", "rows", 32),
    ],
    "gpt2": [
        ("wte.weight", "embedding", "rows", 64),
        ("wpe.weight", "embedding", "rows", 16),
        ("attn.c_attn.weight", "qkv", "qkv", 4 + 4 + 32),  # q, k heads + v neurons
        ("attn.c_attn.bias", "bias", "elementwise", 96),
        ("attn.c_proj.weight", "attn_out", "rows", 32),
        ("mlp.c_fc.weight", "mlp", "rows", 128),  # Conv1D (32, 128): output neurons are the columns
        ("mlp.c_proj.weight", "mlp", "rows", 32),  # Conv1D (128, 32)
        ("ln_1.weight", "norm", "whole", 1),
        ("ln_f.bias", "bias", "elementwise", 32),
    ],
    "bert": [
        ("embeddings.word_embeddings.weight", "embedding", "rows", 64),
        ("embeddings.position_embeddings.weight", "embedding", "rows", 16),
        ("embeddings.token_type_embeddings.weight", "embedding", "rows", 2),
        ("embeddings.LayerNorm.weight", "norm", "whole", 1),
        ("attention.self.query.weight", "query", "heads", 4),
        ("attention.self.key.weight", "key", "heads", 4),
        ("attention.self.value.weight", "value", "rows", 32),
        ("attention.output.dense.weight", "attn_out", "rows", 32),
        ("attention.output.LayerNorm.weight", "norm", "whole", 1),
        ("intermediate.dense.weight", "mlp", "rows", 48),
        ("layer.0.output.dense.weight", "mlp", "rows", 32),
        ("pooler.dense.weight", "mlp", "rows", 32),
        ("pooler.dense.bias", "bias", "elementwise", 32),
    ],
    "opt": [
        ("embed_tokens.weight", "embedding", "rows", 64),
        ("embed_positions.weight", "embedding", "rows", 18),
        ("self_attn.q_proj.weight", "query", "heads", 4),
        ("self_attn.out_proj.weight", "attn_out", "rows", 32),
        ("fc1.weight", "mlp", "rows", 48),
        ("fc2.weight", "mlp", "rows", 32),
        ("self_attn_layer_norm.weight", "norm", "whole", 1),
        ("final_layer_norm.bias", "bias", "elementwise", 32),
    ],
    "t5": [
        ("shared.weight", "embedding", "rows", 64),
        ("encoder.block.0.layer.0.SelfAttention.q.weight", "query", "heads", 4),
        ("encoder.block.0.layer.0.SelfAttention.k.weight", "key", "heads", 4),
        ("encoder.block.0.layer.0.SelfAttention.v.weight", "value", "rows", 32),
        ("encoder.block.0.layer.0.SelfAttention.o.weight", "attn_out", "rows", 32),
        ("SelfAttention.relative_attention_bias.weight", "embedding", "rows", 32),
        ("EncDecAttention.q.weight", "query", "heads", 4),
        ("DenseReluDense.wi.weight", "mlp", "rows", 48),
        ("DenseReluDense.wo.weight", "mlp", "rows", 32),
        ("layer.0.layer_norm.weight", "norm", "whole", 1),
    ],
}


@pytest.mark.parametrize("arch", sorted(EXPECTED))
def test_partition_of_each_naming_scheme(arch):
    model = _tiny_models()[arch]()
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # every tensor of these models is recognised: no warning
        plan = ParamPlan.build(model, ADAM_MINI)
    names = [r.name for r in plan]
    assert len(names) == len({id(p) for p in model.parameters()})  # tied weights once
    for suffix, role, rule, n_blocks in EXPECTED[arch]:
        row = next(r for r in plan if r.name.endswith(suffix))
        assert (row.role, row.rule, row.n_blocks) == (role, rule, n_blocks), (arch, row)
        if rule != "qkv":  # equal blocks
            assert row.n_blocks * row.block_size == row.numel
    table = plan.table()
    assert len(table.splitlines()) == len(plan) + 3  # header, rule, rows, total
    assert all(r.name in table for r in plan)


def test_gpt2_fused_qkv_segments_follow_transposed_layout():
    model = _tiny_models()["gpt2"]()
    row = ParamPlan.build(model, ADAM_MINI)["transformer.h.0.attn.c_attn.weight"]
    assert row.out_dim == 1  # Conv1D (in=32, out=96)
    # [q | k] cut into 8 heads of head_dim 8, then v cut into 32 single neurons
    assert row.extra["segments"] == [[0, 64, 8], [64, 32, 1]]
    assert row.block_size == 8 * 32


def test_nanogpt_names_with_linear_layout_are_not_transposed():
    # nanoGPT uses the GPT-2 names with nn.Linear weights (out, in)
    pairs = [("transformer.h.0.attn.c_attn.weight", torch.zeros(96, 32)),
             ("transformer.h.0.attn.c_proj.weight", torch.zeros(32, 32)),
             ("transformer.h.0.mlp.c_fc.weight", torch.zeros(128, 32))]
    plan = ParamPlan.build(pairs, ADAM_MINI, num_heads=4)
    assert [r.out_dim for r in plan] == [0, 0, 0]
    assert plan["transformer.h.0.mlp.c_fc.weight"].n_blocks == 128


def test_grouped_qkv_layout_neox():
    # GPT-NeoX/Falcon query_key_value: per kv group [q_1..q_g, k, v]; 4 heads, 2 kv heads, head_dim 8
    pairs = [("gpt_neox.layers.0.attention.query_key_value.weight", torch.zeros((4 + 2 * 2) * 8, 32))]
    row = ParamPlan.build(pairs, ADAM_MINI, num_heads=4, num_kv_heads=2, head_dim=8)[pairs[0][0]]
    assert row.extra["segments"] == [[0, 24, 8], [24, 8, 1], [32, 24, 8], [56, 8, 1]]
    assert row.n_blocks == (4 + 2) + 2 * 8


@pytest.mark.parametrize(
    "name, shape, role",
    [
        ("base_model.model.model.layers.0.self_attn.q_proj.lora_A.default.weight", (8, 32), "adapter"),
        ("base_model.model.model.layers.0.self_attn.q_proj.lora_B.default.weight", (32, 8), "adapter"),
        ("base_model.model.model.layers.0.self_attn.q_proj.base_layer.weight", (32, 32), "query"),
        ("base_model.model.model.layers.0.mlp.up_proj.base_layer.weight", (48, 32), "mlp"),
        ("base_model.model.lm_head.modules_to_save.default.weight", (64, 32), "head"),
        ("model.layers.0.self_attn.q_proj.lora_magnitude_vector", (32,), "norm"),
        ("layers.0.attention.wq.weight", (32, 32), "query"),  # original LLaMA / torchtitan
        ("layers.0.attention.wo.weight", (32, 32), "attn_out"),
        ("layers.0.feed_forward.w2.weight", (32, 48), "mlp"),
        ("tok_embeddings.weight", (64, 32), "embedding"),
        ("output.weight", (64, 32), "head"),
        ("layers.0.attention_norm.weight", (32,), "norm"),
        ("encoder.layers.0.self_attn.in_proj_weight", (96, 32), "qkv"),  # nn.MultiheadAttention
        ("encoder.layers.0.self_attn.in_proj_bias", (96,), "bias"),
        ("gpt_neox.embed_out.weight", (64, 32), "head"),
        ("classifier.weight", (3, 32), "head"),
        ("cls.predictions.decoder.weight", (64, 32), "head"),
        ("cls.predictions.transform.dense.weight", (32, 32), "mlp"),
        ("model.layers.0.mlp.experts.3.w1.weight", (48, 32), "mlp"),
        ("some.mystery.weight", (5, 7), "other"),
        ("scalar_gain", (), "other"),
    ],
)
def test_classify_names(name, shape, role):
    assert classify(name, shape) == role
    assert role in ROLES


def test_one_warning_lists_all_unknown_tensors():
    pairs = [("a.weight", torch.zeros(3, 3)), ("b.weight", torch.zeros(4, 4)), ("mlp.fc1.weight", torch.zeros(4, 4))]
    with pytest.warns(UserWarning) as record:
        plan = ParamPlan.build(pairs, ADAM_MINI)
    messages = [str(w.message) for w in record]
    assert len(messages) == 1 and "a.weight" in messages[0] and "b.weight" in messages[0]
    assert plan["a.weight"].rule == "whole"  # the safe default


def test_unknown_head_dim_falls_back_to_rows_with_a_warning():
    pairs = [("layers.0.self_attn.q_proj.weight", torch.zeros(32, 32))]
    with pytest.warns(UserWarning, match="head_dim unknown"):
        plan = ParamPlan.build(pairs, ADAM_MINI)
    assert plan[pairs[0][0]].rule == "rows" and plan[pairs[0][0]].n_blocks == 32


def test_shape_contradicting_rule_raises_naming_the_parameter():
    pairs = [("layers.0.self_attn.k_proj.weight", torch.zeros(24, 32))]
    with pytest.raises(ValueError, match="k_proj"):
        ParamPlan.build(pairs, ADAM_MINI, num_heads=4, head_dim=8, num_kv_heads=2)  # 24 rows = 3 kv heads != 2
    with pytest.raises(ValueError, match="norm.weight"):
        ParamPlan.build([("norm.weight", torch.zeros(8))], ADAM_MINI, overrides={"norm.weight": "rows"})
    with pytest.raises(ValueError, match="c_attn"):  # fused qkv of the wrong width
        ParamPlan.build([("h.0.attn.c_attn.weight", torch.zeros(32, 90))], ADAM_MINI, num_heads=4)


def test_overrides_by_role_rule_and_pattern():
    pairs = [("layers.0.self_attn.v_proj.weight", torch.zeros(16, 32)),
             ("layers.1.self_attn.v_proj.weight", torch.zeros(16, 32)),
             ("mystery.weight", torch.zeros(4, 4))]
    plan = ParamPlan.build(pairs, ADAM_MINI, overrides={"*.v_proj.weight": "whole", "mystery.weight": "mlp"})
    assert plan.rules() == {pairs[0][0]: "whole", pairs[1][0]: "whole", "mystery.weight": "rows"}
    assert plan["mystery.weight"].role == "mlp" and plan["mystery.weight"].source == "override"
    with pytest.raises(ValueError, match="match no parameter"):
        ParamPlan.build(pairs, ADAM_MINI, overrides={"typo.weight": "whole"})
    with pytest.raises(ValueError, match="not a role"):
        ParamPlan.build(pairs, ADAM_MINI, overrides={"mystery.weight": "diagonal"})


def test_attention_shape_from_config_and_kwargs():
    cfg = transformers.Qwen3Config(hidden_size=1024, num_attention_heads=16, num_key_value_heads=8, head_dim=128)
    assert AttentionShape.from_config(cfg) == AttentionShape(16, 8, 128, 1024)
    assert AttentionShape.from_config({"n_head": 12, "n_embd": 768}) == AttentionShape(12, 12, 64, 768)
    assert AttentionShape.from_config({"text_config": {"num_attention_heads": 4, "hidden_size": 64}}).head_dim == 16
    assert AttentionShape.from_config(cfg, num_kv_heads=16).num_kv_heads == 16
    with pytest.raises(ValueError, match="num_kv_heads"):
        AttentionShape.from_config(num_heads=6, num_kv_heads=4)


def test_param_groups_carry_metadata_and_keep_user_groups():
    model = _tiny_models()["llama"]()
    named = dict(model.named_parameters())
    decay = [n for n in named if n.endswith("proj.weight")]
    rest = [n for n in named if n not in decay]
    groups = [{"params": [named[n] for n in decay], "param_names": decay, "lr": 0.1},
              {"params": [named[n] for n in rest], "param_names": rest, "weight_decay": 0.0}]
    plan = ParamPlan.build(groups, ADAM_MINI, num_heads=4, num_kv_heads=2)
    out = plan.param_groups(weight_decay=0.5)
    assert [g["param_names"] for g in out] == [decay, rest]
    assert out[0]["lr"] == 0.1 and out[0]["weight_decay"] == 0.5 and out[1]["weight_decay"] == 0.0
    for g in out:
        assert len(g["params"]) == len(g["param_roles"]) == len(g["param_rules"]) == len(g["param_layouts"])
        for p, name, layout in zip(g["params"], g["param_names"], g["param_layouts"]):
            assert p is named[name] and layout["rule"] == plan[name].rule
    # a torch optimizer accepts these groups and keeps the metadata lists
    opt = torch.optim.SGD(plan.param_groups(), lr=0.1)
    assert opt.param_groups[0]["param_rules"][1] == "heads"


def test_roles_only_rule_set_and_tied_weights():
    emb = torch.nn.Parameter(torch.zeros(64, 32))
    pairs = [("model.embed_tokens.weight", emb), ("lm_head.weight", emb)]
    plan = ParamPlan.build(pairs, ROLES_ONLY)
    assert plan.rules() == {"model.embed_tokens.weight": "embedding"}
    assert len(plan.param_groups()[0]["params"]) == 1
