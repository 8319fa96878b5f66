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


# --------------------------------------------------------------------------------------------------
# models a user brings: module types and shapes first, names second

from torch import nn  # noqa: E402

from slimopt.optim.hybrid import routing_rules  # noqa: E402
from slimopt.plans.param_plan import module_facts  # noqa: E402

ROUTING = routing_rules()


def _quiet_plan(model, rule_set, **kwargs):
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # a sensible plan needs no warning
        return ParamPlan.build(model, rule_set, **kwargs)


def _summary(plan):
    return {r.name: (r.role, r.rule) for r in plan}


def test_plain_sequential_embedding_linears_and_head():
    model = nn.Sequential(nn.Embedding(100, 32), nn.Linear(32, 64), nn.ReLU(), nn.Linear(64, 32), nn.LayerNorm(32),
                          nn.Linear(32, 100))
    assert _summary(_quiet_plan(model, ROUTING)) == {
        "0.weight": ("embedding", "adamw"),
        "1.weight": ("hidden", "stateless"), "1.bias": ("bias", "adamw"),
        "3.weight": ("hidden", "stateless"), "3.bias": ("bias", "adamw"),
        "4.weight": ("norm", "adamw"), "4.bias": ("bias", "adamw"),
        "5.weight": ("head", "adamw"), "5.bias": ("bias", "adamw"),  # the last Linear maps to the vocabulary
    }
    mini = _quiet_plan(model, ADAM_MINI)
    assert {r.name: (r.rule, r.n_blocks) for r in mini if r.name.endswith("weight")} == {
        "0.weight": ("rows", 100), "1.weight": ("rows", 64), "3.weight": ("rows", 32), "4.weight": ("whole", 1),
        "5.weight": ("rows", 100)}
    assert "last Linear" in mini["5.weight"].basis and mini["1.weight"].basis == "Linear"


def test_sinkgd_and_adam_mini_on_a_plain_model_print_each_tensors_lr(capsys):
    import slimopt

    model = nn.Sequential(nn.Embedding(50, 16), nn.Linear(16, 32), nn.GELU(), nn.Linear(32, 16), nn.Linear(16, 50))
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        sinkgd = slimopt.create_optimizer(model, "sinkgd", lr=0.02, adamw_lr=1e-3, print_plan=True)
        mini = slimopt.create_optimizer(model, "adammini", lr=3e-3, weight_decay=0.1, print_plan=True)
    out = capsys.readouterr().out
    lines = {line.split()[0]: line.split() for line in out.splitlines() if line[:1].isdigit()}
    routes = {n: (g["update"], g["lr"]) for g in sinkgd.param_groups for n in g["param_names"]}
    assert routes["1.weight"] == ("stateless", 0.02) and routes["3.weight"] == ("stateless", 0.02)
    assert routes["0.weight"] == routes["4.weight"] == ("adamw", 1e-3)
    assert "elements stateless" in out and not out.splitlines()[-1].startswith("0 elements")
    # the Adam-mini table (printed second) has lr and weight decay per tensor; biases are not decayed
    table = mini.partition_table()
    header = table.splitlines()[0].split()
    assert header[-3:] == ["lr", "wd", "facts"]
    row = {line.split()[0]: line.split() for line in table.splitlines()[2:-1]}
    assert row["1.weight"][7:9] == ["0.003", "0.1"] and row["1.bias"][7:9] == ["0.003", "0"]
    assert lines  # both tables printed rows


def test_a_classifier_without_embedding_has_its_last_linear_as_head():
    model = nn.Sequential(nn.Linear(784, 128), nn.ReLU(), nn.Linear(128, 128), nn.ReLU(), nn.Linear(128, 10))
    roles = _quiet_plan(model, ROUTING).roles()
    assert [roles[f"{i}.weight"] for i in (0, 2, 4)] == ["hidden", "hidden", "head"]
    # an MLP block that maps back to its input width has no head: all three are hidden matrices
    block = nn.Sequential(nn.Linear(32, 128), nn.GELU(), nn.Linear(128, 32))
    assert _quiet_plan(block, ROUTING).rules() == {"0.weight": "stateless", "0.bias": "adamw",
                                                   "2.weight": "stateless", "2.bias": "adamw"}


class _BasicBlock(nn.Module):
    def __init__(self, c_in, c_out, stride=1):
        super().__init__()
        self.conv1 = nn.Conv2d(c_in, c_out, 3, stride, 1, bias=False)
        self.bn1 = nn.BatchNorm2d(c_out)
        self.conv2 = nn.Conv2d(c_out, c_out, 3, 1, 1, bias=False)
        self.bn2 = nn.BatchNorm2d(c_out)
        self.shortcut = nn.Sequential(nn.Conv2d(c_in, c_out, 1, stride, bias=False), nn.BatchNorm2d(c_out))

    def forward(self, x):
        h = torch.relu(self.bn1(self.conv1(x)))
        return torch.relu(self.bn2(self.conv2(h)) + self.shortcut(x))


class _ResNet(nn.Module):
    def __init__(self, classes=10):
        super().__init__()
        self.gain = nn.Parameter(torch.ones(()))  # a bare parameter first: the input width is still the stem's
        self.stem = nn.Conv2d(3, 8, 3, 1, 1, bias=False)
        self.bn = nn.BatchNorm2d(8)
        self.layer1 = _BasicBlock(8, 16, 2)
        self.pool = nn.AdaptiveAvgPool2d(1)
        self.fc = nn.Linear(16, classes)

    def forward(self, x):
        return self.fc(self.pool(self.layer1(torch.relu(self.bn(self.stem(x))))).flatten(1)) * self.gain


def test_resnet_style_convs_take_adamw_reported_once_unless_conv_as_matrix():
    model = _ResNet()
    convs = ["stem.weight", "layer1.conv1.weight", "layer1.conv2.weight", "layer1.shortcut.0.weight"]
    with pytest.warns(UserWarning) as record:
        plan = ParamPlan.build(model, ROUTING)
    assert len(record) == 1  # one report, a table naming every convolution, the bare gain and the way out
    message = str(record[0].message)
    assert all(name in message for name in convs) and "conv_as_matrix=True" in message and "Conv2d" in message
    assert "gain" in message and "not recognised" in message
    assert {n: plan[n].rule for n in convs} == dict.fromkeys(convs, "adamw")
    assert all(plan[n].role == "conv" for n in convs)
    assert plan["bn.weight"].role == "norm" and plan["layer1.shortcut.1.bias"].role == "bias"
    assert (plan["fc.weight"].role, plan["fc.weight"].rule) == ("head", "adamw")  # the classifier

    as_matrix = _quiet_plan(model, routing_rules(conv_as_matrix=True), overrides={"gain": "norm"})
    assert {n: as_matrix[n].rule for n in convs} == dict.fromkeys(convs, "stateless")
    assert as_matrix["layer1.conv1.weight"].extra["matrix"] == [16, 8 * 3 * 3]
    assert as_matrix["fc.weight"].rule == "adamw" and as_matrix["bn.weight"].rule == "adamw"
    mini = _quiet_plan(model, ADAM_MINI, overrides={"gain": "norm"})  # Adam-mini: one block per output channel
    assert (mini["layer1.conv2.weight"].rule, mini["layer1.conv2.weight"].n_blocks) == ("rows", 16)

    import slimopt  # and SinkGD trains it, convolutions included

    opt = slimopt.create_optimizer(model, "sinkgd", lr=0.02, conv_as_matrix=True, overrides={"gain": "norm"})
    model(torch.randn(2, 3, 8, 8)).square().mean().backward()
    before = model.stem.weight.detach().clone()
    opt.step()
    assert not torch.equal(before, model.stem.weight) and model.stem.weight not in opt.state


def test_bert_and_vit_from_their_configs():
    bert = transformers.BertModel(transformers.BertConfig(
        vocab_size=64, hidden_size=32, num_hidden_layers=1, num_attention_heads=4, intermediate_size=48,
        max_position_embeddings=16))
    plan = _quiet_plan(bert, ROUTING)
    for name, role, rule in [("embeddings.word_embeddings.weight", "embedding", "adamw"),
                             ("encoder.layer.0.attention.self.query.weight", "query", "stateless"),
                             ("encoder.layer.0.attention.output.dense.weight", "attn_out", "stateless"),
                             ("encoder.layer.0.intermediate.dense.weight", "mlp", "stateless"),
                             ("encoder.layer.0.output.LayerNorm.weight", "norm", "adamw"),
                             ("pooler.dense.weight", "mlp", "stateless")]:
        assert (plan[name].role, plan[name].rule) == (role, rule), name

    vit = transformers.ViTModel(transformers.ViTConfig(
        hidden_size=32, num_hidden_layers=1, num_attention_heads=4, intermediate_size=48, image_size=16,
        patch_size=8))
    for conv_as_matrix in (False, True):
        plan = _quiet_plan(vit, routing_rules(conv_as_matrix))
        for name, role, rule in [("embeddings.cls_token", "embedding", "adamw"),
                                 ("embeddings.position_embeddings", "embedding", "adamw"),
                                 ("embeddings.patch_embeddings.projection.weight", "embedding", "adamw"),
                                 ("attention.q_proj.weight", "query", "stateless"),
                                 ("attention.o_proj.weight", "attn_out", "stateless"),
                                 ("mlp.fc2.weight", "mlp", "stateless"),
                                 ("layernorm_before.weight", "norm", "adamw"),
                                 ("layernorm.weight", "norm", "adamw")]:
            row = next(r for r in plan if r.name.endswith(name))  # transformers 4 and 5 name ViT's layers apart
            assert (row.role, row.rule) == (role, rule), name
    mini = _quiet_plan(vit, ADAM_MINI)
    key = next(r for r in mini if r.role == "key")
    assert key.rule == "heads" and key.n_blocks == 4  # heads from the config
    assert mini["embeddings.patch_embeddings.projection.weight"].n_blocks == 32  # one per output channel


class _Block(nn.Module):
    """A pre-norm transformer block as a user writes it: no config, no names slimopt knows for the MLP."""

    def __init__(self, d=32, heads=4):
        super().__init__()
        self.ln1 = nn.LayerNorm(d)
        self.attn = nn.MultiheadAttention(d, heads, batch_first=True)
        self.ln2 = nn.LayerNorm(d)
        self.ff = nn.Sequential(nn.Linear(d, 4 * d), nn.GELU(), nn.Linear(4 * d, d))

    def forward(self, x):
        a = self.ln1(x)
        x = x + self.attn(a, a, a, need_weights=False)[0]
        return x + self.ff(self.ln2(x))


def test_a_block_with_no_config_gets_its_heads_from_the_module():
    block = _Block()
    assert getattr(block, "config", None) is None
    assert _summary(_quiet_plan(block, ROUTING)) == {
        "ln1.weight": ("norm", "adamw"), "ln1.bias": ("bias", "adamw"),
        "attn.in_proj_weight": ("qkv", "stateless"), "attn.in_proj_bias": ("bias", "adamw"),
        "attn.out_proj.weight": ("attn_out", "stateless"), "attn.out_proj.bias": ("bias", "adamw"),
        "ln2.weight": ("norm", "adamw"), "ln2.bias": ("bias", "adamw"),
        "ff.0.weight": ("hidden", "stateless"), "ff.0.bias": ("bias", "adamw"),
        "ff.2.weight": ("hidden", "stateless"), "ff.2.bias": ("bias", "adamw"),  # back to the width: no head
    }
    mini = _quiet_plan(block, ADAM_MINI)  # nn.MultiheadAttention says 4 heads of 8: no "head_dim unknown"
    qkv = mini["attn.in_proj_weight"]
    assert qkv.extra["segments"] == [[0, 64, 8], [64, 32, 1]] and qkv.n_blocks == 4 + 4 + 32
    assert mini["ff.0.weight"].n_blocks == 128

    class Attention(nn.Module):  # timm style: the module carries its head count
        def __init__(self, d=32):
            super().__init__()
            self.num_heads = 2
            self.qkv = nn.Linear(d, 3 * d)
            self.proj = nn.Linear(d, d)

    model = nn.Module()
    model.attn = Attention()
    plan = _quiet_plan(model, ADAM_MINI)
    assert plan["attn.qkv.weight"].extra["segments"] == [[0, 64, 16], [64, 32, 1]]
    assert plan["attn.proj.weight"].role == "attn_out"


def test_an_unrecognised_tensor_is_reported_once_in_a_table():
    block = _Block()
    block.gain = nn.Parameter(torch.ones(()))
    block.rnn = nn.GRU(32, 32)
    with pytest.warns(UserWarning) as record:
        plan = ParamPlan.build(block, ROUTING)
    assert len(record) == 1
    report = str(record[0].message)
    lines = report.splitlines()
    assert lines[1].split() == ["parameter", "shape", "module", "role", "rule", "why"]
    rows = {line.split()[0]: line.split() for line in lines[3:] if line.startswith("  ")}
    assert set(rows) == {"gain", "rnn.weight_ih_l0", "rnn.weight_hh_l0"}  # GRU biases are 1-D biases
    assert rows["gain"][1:5] == ["()", "_Block", "other", "adamw"] and rows["rnn.weight_ih_l0"][2] == "GRU"
    assert "overrides=" in report and "hidden" in report
    assert plan.report() == report and plan.table().endswith(report)
    # saying what they are silences it
    fixed = _quiet_plan(block, ROUTING, overrides={"gain": "norm", "rnn.weight_*": "hidden"})
    assert fixed["rnn.weight_hh_l0"].rule == "stateless" and fixed["gain"].source == "override"


def test_tied_head_registered_first_and_overrides_with_new_roles():
    class TiedFirst(nn.Module):
        def __init__(self):
            super().__init__()
            self.out = nn.Linear(16, 40, bias=False)
            self.tok = nn.Embedding(40, 16)
            self.out.weight = self.tok.weight
            self.mix = nn.Linear(16, 16)

    plan = _quiet_plan(TiedFirst(), ROUTING)
    assert plan.roles() == {"out.weight": "head", "mix.weight": "hidden", "mix.bias": "bias"}
    assert plan["out.weight"].basis == "Linear tied to an embedding"
    conv = nn.Sequential(nn.Conv1d(4, 8, 3), nn.Flatten(), nn.Linear(8, 8))
    plan = _quiet_plan(conv, ROUTING, overrides={"0.weight": "head", "2.weight": "conv"})
    assert (plan["0.weight"].rule, plan["2.weight"].rule) == ("adamw", "stateless")


@pytest.mark.parametrize("arch", ["preset-tiny", *sorted(EXPECTED)])
def test_module_types_change_nothing_where_names_decide(arch):
    """The harness's LLaMA and the known architectures plan exactly as from their names alone."""
    if arch == "preset-tiny":
        from slimopt.bench.model import build_model

        model = build_model("tiny")
    else:
        model = _tiny_models()[arch]()
    pairs = list(model.named_parameters())
    for rule_set in (ADAM_MINI, ROUTING, routing_rules(True)):
        by_module = _quiet_plan(model, rule_set)
        by_name = _quiet_plan(pairs, rule_set, config=model.config)
        assert [(r.name, r.role, r.rule, r.facts_dict()) for r in by_module] == \
               [(r.name, r.role, r.rule, r.facts_dict()) for r in by_name]
    facts = module_facts(model)
    assert all(f.role != "other" for f in facts.values())


def test_state_formula_follows_the_type_based_plan():
    import slimopt
    from slimopt.memory.formulas import analytic_state_bytes

    for name in ("sinkgd", "adammini"):
        model = nn.Sequential(nn.Embedding(30, 8), nn.Linear(8, 16), nn.Tanh(), nn.Linear(16, 8), nn.LayerNorm(8),
                              nn.Linear(8, 30))
        opt = slimopt.create_optimizer(model, name, lr=1e-3)
        model(torch.randint(0, 30, (4,))).square().mean().backward()
        opt.step()
        assert slimopt.state_bytes(opt) == analytic_state_bytes(model, name), name


def test_docs_plans_examples_run_and_print_what_they_show(capsys):
    """docs/plans.md: its Python blocks run in order, and the plan tables it shows are what they print."""
    import re
    from pathlib import Path

    text = (Path(__file__).resolve().parents[1] / "docs" / "plans.md").read_text()
    blocks = re.findall(r"```(python)?\n(.*?)```", text, re.DOTALL)
    namespace: dict = {}
    shown = []
    for lang, body in blocks:
        if lang:
            exec(compile(body, "docs/plans.md", "exec"), namespace)
        else:
            shown.append(body)
    printed = capsys.readouterr().out
    for body in shown:
        lines = [line for line in body.splitlines() if line.strip() and line.strip() != "..."]
        if lines[0].startswith("parameter"):  # a printed plan table: each line shown was printed
            assert all(line in printed for line in lines), body


def test_print_plan_reports_the_tensors_to_look_at_once(capsys):
    import slimopt

    model = _ResNet()
    for name in ("sinkgd", "adammini"):
        with warnings.catch_warnings():
            warnings.simplefilter("error")  # printed: not warned a second time
            slimopt.create_optimizer(model, name, lr=1e-3, print_plan=True)
        out = capsys.readouterr().out
        assert out.count("tensor(s) to look at") == 1 and "gain" in out.split("to look at")[1]
