"""The harness's LLaMA decoder: names, shapes, sizes, and logits equal to Hugging Face's LlamaForCausalLM."""

from __future__ import annotations

import pytest
import torch

from slimopt.bench.model import PRESETS, build_model, count_parameters

HF_NAMES_PER_LAYER = [
    "input_layernorm.weight",
    "self_attn.q_proj.weight", "self_attn.k_proj.weight",
    "self_attn.v_proj.weight", "self_attn.o_proj.weight",
    "post_attention_layernorm.weight",
    "mlp.gate_proj.weight", "mlp.up_proj.weight", "mlp.down_proj.weight",
]


def test_parameter_names_are_hugging_face_llama_names():
    model = build_model("tiny")
    expected = {"embed_tokens.weight", "norm.weight", "lm_head.weight"}
    for i in range(model.config.num_hidden_layers):
        expected |= {f"layers.{i}.{n}" for n in HF_NAMES_PER_LAYER}
    assert {n for n, _ in model.named_parameters()} == expected
    assert set(model.state_dict()) == expected  # rotary tables are not saved


def test_shapes_follow_the_config_with_grouped_query_attention():
    model = build_model("tiny")
    c = model.config
    assert c.num_key_value_heads < c.num_attention_heads  # the tiny preset exercises GQA
    params = dict(model.named_parameters())
    attn = "layers.0.self_attn"
    assert params[f"{attn}.q_proj.weight"].shape == (c.num_attention_heads * c.head_dim, c.hidden_size)
    assert params[f"{attn}.k_proj.weight"].shape == (c.num_key_value_heads * c.head_dim, c.hidden_size)
    assert params["layers.0.mlp.down_proj.weight"].shape == (c.hidden_size, c.intermediate_size)
    assert params["lm_head.weight"].data_ptr() != params["embed_tokens.weight"].data_ptr()  # untied
    logits = model(torch.randint(0, c.vocab_size, (2, 16)))
    assert logits.shape == (2, 16, c.vocab_size)


@pytest.mark.parametrize(("preset", "millions"), [
    ("step42m", 42.08), ("60m", 58.07), ("130m", 134.1), ("350m", 368.0), ("1b", 1339.1),
])
def test_preset_sizes(preset, millions):
    # Independent arithmetic: embeddings + head, then q/k/v/o, three SwiGLU matrices and two norms per layer.
    c = PRESETS[preset]
    h, f, layers, v = c.hidden_size, c.intermediate_size, c.num_hidden_layers, c.vocab_size
    by_hand = 2 * v * h + layers * (4 * h * h + 3 * h * f + 2 * h) + h
    assert count_parameters(c) == by_hand
    assert by_hand / 1e6 == pytest.approx(millions, abs=0.05)


def test_small_presets_allocate_what_the_formula_says():
    for preset in ("tiny", "cpu"):
        model = build_model(preset)
        assert sum(p.numel() for p in model.parameters()) == count_parameters(model.config)
    assert build_model("tiny", vocab_size=1000).lm_head.weight.shape[0] == 1000


def test_logits_match_transformers_llama():
    transformers = pytest.importorskip("transformers")
    torch.manual_seed(0)
    ours = build_model("tiny").eval()
    c = ours.config
    hf_config = transformers.LlamaConfig(
        vocab_size=c.vocab_size, hidden_size=c.hidden_size, intermediate_size=c.intermediate_size,
        num_hidden_layers=c.num_hidden_layers, num_attention_heads=c.num_attention_heads,
        num_key_value_heads=c.num_key_value_heads, head_dim=c.head_dim,
        max_position_embeddings=c.max_position_embeddings, rms_norm_eps=c.rms_norm_eps,
        rope_theta=c.rope_theta,
        tie_word_embeddings=False, attention_bias=False, mlp_bias=False, attn_implementation="eager",
    )
    reference = transformers.LlamaForCausalLM(hf_config).eval()
    state = {(n if n == "lm_head.weight" else f"model.{n}"): t for n, t in ours.state_dict().items()}
    missing, unexpected = reference.load_state_dict(state, strict=False)
    assert not unexpected and all("rotary" in m for m in missing)
    ids = torch.randint(0, c.vocab_size, (2, 24))
    with torch.no_grad():
        expected = reference(ids).logits
        got = ours(ids)
    # Same float32 math in a different order (SDPA vs eager softmax): agreement to ~1e-5 on logits of size ~1.
    torch.testing.assert_close(got, expected, atol=1e-4, rtol=1e-4)
