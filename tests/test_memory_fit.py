"""``slimopt plan``: each term of the estimate held against something measured.

* optimizer state: the planner's bytes for every registered optimizer equal ``slimopt.state_bytes`` of
  the real optimizer after a step (fp32 and bf16 parameters), so the plan follows the classes' defaults;
* activations: the formula against the bytes autograd really saves (saved-tensor hooks) on tiny HF
  Llama and GPT-2 models, in fp32 and under bf16 autocast;
* the command line: table, JSON, errors.
"""

from __future__ import annotations

import json
import warnings

import pytest
import torch

import slimopt
from slimopt.cli import main
from slimopt.memory.fit import Arch, activation_bytes, arch_of, fit_candidates, fit_report, fit_state_bytes

transformers = pytest.importorskip("transformers")


def tiny_llama(layers: int = 2):
    torch.manual_seed(0)
    cfg = transformers.LlamaConfig(vocab_size=1000, hidden_size=192, intermediate_size=520, num_hidden_layers=layers,
                                   num_attention_heads=6, num_key_value_heads=2, max_position_embeddings=256)
    return transformers.LlamaForCausalLM(cfg)


def tiny_gpt2(layers: int = 2):
    torch.manual_seed(0)
    cfg = transformers.GPT2Config(vocab_size=1000, n_embd=192, n_layer=layers, n_head=6, n_positions=256,
                                  resid_pdrop=0.0, embd_pdrop=0.0, attn_pdrop=0.0, bos_token_id=0, eos_token_id=0)
    return transformers.GPT2LMHeadModel(cfg)


# -- optimizer state: exact -----------------------------------------------------------------------------


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["fp32", "bf16"])
@pytest.mark.parametrize("name", slimopt.get_supported_optimizers())
def test_planned_state_bytes_equal_the_real_optimizers(name, dtype):
    assert name in fit_candidates(), f"{name} is registered but the planner has no row for it"
    model = tiny_llama().to(dtype)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        opt = slimopt.create_optimizer(model, name, lr=1e-3)
    for p in model.parameters():
        p.grad = torch.randn_like(p) * 1e-3
    opt.step()
    expected = fit_state_bytes(name, model, param_bytes=dtype.itemsize, config=model.config)
    assert slimopt.state_bytes(opt) == expected


# -- activations: against what autograd saves -----------------------------------------------------------


def saved_activation_bytes(model, batch: int, seq_len: int, amp: bool) -> int:
    """Bytes of the distinct storages autograd saves that scale with tokens (first dim batch or
    batch*seq); parameters and autocast's weight copies are the planner's "weights"."""
    params = {p.untyped_storage().data_ptr() for p in model.parameters()}
    seen: dict[int, int] = {}

    def pack(t):
        storage = t.untyped_storage()
        token_sized = t.dim() > 0 and t.shape[0] in (batch, batch * seq_len) and t.numel() >= seq_len
        if storage.data_ptr() not in params and token_sized:
            seen[storage.data_ptr()] = storage.nbytes()
        return t

    ids = torch.randint(0, 1000, (batch, seq_len), generator=torch.Generator().manual_seed(0))
    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t), warnings.catch_warnings():
        warnings.simplefilter("ignore")
        with torch.autocast("cpu", dtype=torch.bfloat16, enabled=amp):
            model(input_ids=ids, labels=ids)
    return sum(seen.values())


def arch_from_config(model) -> Arch:
    c = model.config
    if isinstance(c, transformers.LlamaConfig):
        return Arch("llama", c.num_hidden_layers, c.hidden_size, c.intermediate_size, c.num_attention_heads,
                    c.num_key_value_heads, c.vocab_size, c.hidden_size // c.num_attention_heads, 4.0)
    return Arch("gpt2", c.n_layer, c.n_embd, 4 * c.n_embd, c.n_head, c.n_head, c.vocab_size, c.n_embd // c.n_head,
                5.25)


# The formula writes out the saved tensors term by term, so it should hit the bytes; the tolerance (1.5%)
# covers Llama's pure-bf16 final norm, which keeps h bytes per token more than the per-layer norms.
@pytest.mark.parametrize("precision", ["fp32", "amp", "bf16"])
@pytest.mark.parametrize("family", ["llama", "gpt2"])
def test_activation_formula_matches_saved_tensors(family, precision):
    build = tiny_llama if family == "llama" else tiny_gpt2
    batch, seq_len = 3, 80
    for layers in (1, 3):
        model = build(layers)
        if precision == "bf16":
            model = model.to(torch.bfloat16)
        measured = saved_activation_bytes(model, batch, seq_len, amp=precision == "amp")
        predicted = activation_bytes(arch_from_config(model), seq_len, batch, precision, loss_grad=False)
        assert abs(predicted - measured) <= 0.015 * measured, (layers, predicted, measured)


def test_activation_terms_scale_as_they_should():
    arch = arch_of("llama-130m")
    one = activation_bytes(arch, 256, 1)
    assert activation_bytes(arch, 256, 8) == pytest.approx(8 * one, rel=1e-6)
    # Checkpointing keeps layer inputs and one layer; the loss's vocabulary-sized tensors stay.
    assert activation_bytes(arch, 256, 8, checkpointing=True) < activation_bytes(arch, 256, 8) / 2
    assert activation_bytes(arch, 256, 1, flash=False) > one
    assert activation_bytes(arch, 256, 1, "bf16") < one < activation_bytes(arch, 256, 1, "fp32")


# -- the plan -------------------------------------------------------------------------------------------


def test_plan_terms_for_llama2_7b():
    p = fit_report("llama2-7b", 79.2, seq_len=2048, batch=1, precision="bf16")
    rows = {r["optimizer"]: r for r in p.rows}
    n = p.params
    assert n == 6_738_415_616  # HF Llama-2-7b-hf
    gib = 2**30
    assert rows["adamw"]["weights_gib"] == pytest.approx(2 * n / gib)
    assert rows["adamw"]["gradients_gib"] == pytest.approx(2 * n / gib)
    assert rows["adamw"]["state_gib"] == pytest.approx((4 * n + 4 * 291) / gib)  # bf16 m, v + step per tensor
    # Stateless hidden matrices leave only embeddings, head and norms to AdamW.
    assert rows["sinkgd"]["state_gib"] < rows["microadam"]["state_gib"] < rows["adammini"]["state_gib"]
    assert rows["adammini"]["state_gib"] < rows["adamw"]["state_gib"]
    for r in p.rows:
        total = r["weights_gib"] + r["gradients_gib"] + r["state_gib"] + r["activations_gib"]
        assert r["total_gib"] == pytest.approx(total)
        assert r["fits"] == (r["total_gib"] <= p.budget_gib)
        if r["fits"]:
            assert r["max_batch"] >= 1


def test_plan_says_which_fit():
    p = fit_report("llama2-7b", 40, seq_len=1024, batch=1, precision="bf16", checkpointing=True)
    fits = {r["optimizer"]: r["fits"] for r in p.rows}
    assert fits["sinkgd"] and fits["microadam"] and not fits["adamw"]


def test_cli_table_json_and_errors(capsys):
    with pytest.raises(SystemExit) as done:
        main(["plan", "--model", "llama-130m", "--gpu-mem", "24", "--seq-len", "256", "--batch", "32"])
    assert done.value.code == 0
    out = capsys.readouterr().out
    assert "microadam" in out and "fits" in out and "GiB" in out
    with pytest.raises(SystemExit) as done:
        main(["plan", "--model", "gpt2", "--gpu-mem", "8", "--json", "--optimizer", "adamw", "--optimizer", "swan"])
    data = json.loads(capsys.readouterr().out)
    assert [r["optimizer"] for r in data["rows"]] == ["adamw", "swan"]
    with pytest.raises(SystemExit) as done:
        main(["plan", "--model", "no-such-model", "--gpu-mem", "8"])
    assert done.value.code == 2
    err = capsys.readouterr().err
    assert "unknown model" in err and "--model" in err and "no-such-model" in err


def test_a_misfit_is_explained_with_what_would_fit(capsys):
    """Llama-2 7B in bf16 on 24 GiB: nothing fits; each row says what it needs, its largest term, and the
    way out: a GPU size or FSDP2 over several GPUs (no setting of one GPU can hold 26 GiB of weights,
    gradients and state)."""
    with pytest.raises(SystemExit) as done:
        main(["plan", "--model", "llama2-7b", "--gpu-mem", "24", "--precision", "bf16"])
    assert done.value.code == 0
    out = capsys.readouterr().out
    assert max(len(line) for line in out.split("does not fit:")[1].splitlines()) <= 100
    text = " ".join(out.split("does not fit:")[1].split())  # unwrapped
    p = fit_report("llama2-7b", 24, precision="bf16")
    rows = {r["optimizer"]: r for r in p.rows}
    adamw, sinkgd = rows["adamw"], rows["sinkgd"]
    assert f"adamw: needs {adamw['total_gib']:.2f} GiB" in text
    assert f"largest: optimizer state {adamw['state_gib']:.2f} GiB" in text  # AdamW's bf16 m and v
    assert f"sinkgd: needs {sinkgd['total_gib']:.2f} GiB" in text and "largest: weights 12.55 GiB" in text
    static = sinkgd["weights_gib"] + sinkgd["gradients_gib"] + sinkgd["state_gib"]
    assert f"weights + gradients + state alone are {static:.2f} GiB" in text
    assert f"a GPU with {sinkgd['total_gib'] / 0.9:.1f} GiB" in text and "FSDP2 over 3 GPUs of 24 GiB" in text
    assert "none fits; the smallest total is sinkgd's" in text
    # the settings each row was counted with, and the `slimopt memory` row with the same
    assert "adamw: param_bytes=2  [memory row adamw-bf16]" in out
    assert "microadam: param_bytes=2, m=10, k_init=0.01, quant_block_size=64, topk_block_size=4096" in out


def test_an_activation_misfit_names_the_settings_that_fit():
    from slimopt.memory.fit import why_not

    p = fit_report("llama-1b", 24, batch=8, optimizers=["sinkgd"])
    (row,) = p.rows
    assert not row["fits"]
    text = why_not(p, row)
    assert "largest: activations" in text and "Fits with" in text
    for fix in ("--checkpointing", f"--batch {row['max_batch']}"):
        if fix in text:  # each fix offered does fit, with the total it gives
            changed = fit_report("llama-1b", 24, batch=row["max_batch"] if "batch" in fix else 8,
                           checkpointing="checkpointing" in fix, optimizers=["sinkgd"])
            assert changed.rows[0]["fits"] and f"{fix} ({changed.rows[0]['total_gib']:.2f} GiB)" in text
    assert "--batch 1" in text
