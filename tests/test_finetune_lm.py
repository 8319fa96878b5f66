"""``slimopt bench finetune-lm`` on tiny settings with synthetic text (the real corpora are for benchmarks)."""

from __future__ import annotations

import json
import random

import pytest

from slimopt.bench import finetune_lm
from slimopt.bench.cli import main as bench_main
from slimopt.bench.stats import spread, verdict


def _text(corpora):
    rng = random.Random("+".join(corpora))
    words = ["alpha", "beta", "gamma", "delta", "omega", "the", "a", "of"] + list(corpora)
    return " ".join(rng.choice(words) for _ in range(6000)), "+".join(corpora)


@pytest.fixture
def synthetic(monkeypatch, tmp_path):
    monkeypatch.setattr(finetune_lm, "load_text", _text)
    monkeypatch.setenv("SLIMOPT_CACHE", str(tmp_path / "cache"))
    return tmp_path


ARGS = ["--base-corpora", "one,two", "--corpus", "three", "--base-steps", "6", "--steps", "8", "--batch-size", "2",
        "--seq-len", "16", "--eval-every", "4", "--eval-batches", "1", "--checkpoints", "4,8", "--seeds", "2",
        "--sweep-factors", "0.5,2", "--sweep-steps", "4", "--optimizers", "adamw,adammini", "--threads", "1"]


def test_runs_reports_and_reuses_the_cached_base(synthetic, capsys):
    out = synthetic / "run"
    assert bench_main(["finetune-lm", *ARGS, "--out", str(out)]) == 0
    result = json.loads((out / "results.json").read_text())
    sha = result["settings"]["base_sha256"]
    assert len(sha) == 64
    rows = {r["optimizer"]: r for r in result["summary"]}
    assert rows["adamw"]["final_verdict"] == "reference"
    assert rows["adammini"]["final_verdict"] in ("win", "loss", "within spread")
    assert rows["adamw"]["ratio@8"] == pytest.approx(1.0)
    assert set(result["sweeps"]) == {"adamw", "adammini"} and len(result["runs"]) == 4
    assert "x AdamW @4" in (out / "report.md").read_text()
    assert "pre-training tiny with AdamW" in capsys.readouterr().out
    assert bench_main(["finetune-lm", *ARGS, "--out", str(synthetic / "again")]) == 0
    assert "cached" in capsys.readouterr().out
    again = json.loads((synthetic / "again" / "results.json").read_text())
    assert again["settings"]["base_sha256"] == sha
    assert [r["final_val_loss"] for r in again["runs"]] == [r["final_val_loss"] for r in result["runs"]]


@pytest.mark.parametrize("change, message", [
    (["--steps", "-3"], "--steps -3"),
    (["--seeds", "-1"], "--seeds -1"),
    (["--checkpoints", "3,8"], "--checkpoints '3,8'"),
    (["--optimizers", "adammini"], "must include adamw"),
    (["--optimizers", "adamw,nope"], "unknown nope"),
    (["--corpus", "one"], "held out"),
    (["--sweep-factors", "1,x"], "--sweep-factors '1,x'"),
])
def test_user_errors_name_the_argument_before_any_work(synthetic, capsys, change, message):
    assert bench_main(["finetune-lm", *ARGS, *change, "--out", str(synthetic / "bad")]) == 2
    assert message in capsys.readouterr().err
    assert not (synthetic / "bad").exists() and not (synthetic / "cache").exists()


def test_verdict_needs_a_difference_beyond_the_spread():
    reference = spread([1.00, 1.02, 0.98])
    assert verdict(spread([0.90, 0.91, 0.89]), reference) == "win"
    assert verdict(spread([1.10, 1.12, 1.08]), reference) == "loss"
    assert verdict(spread([0.99, 1.03, 0.97]), reference) == "within spread"
    assert verdict(spread([0.5]), reference) == "one seed"


def test_parts_run_apart_merge_into_one_comparison(synthetic):
    common = [a for a in ARGS if a not in ("adamw,adammini",)]
    i = common.index("--optimizers")
    del common[i]
    assert bench_main(["finetune-lm", *common, "--optimizers", "adamw", "--out", str(synthetic / "a")]) == 0
    assert bench_main(["finetune-lm", *common, "--optimizers", "adammini@exp_avg_dtype=bf16", "--no-reference-ok",
                       "--out", str(synthetic / "b")]) == 0
    assert bench_main(["finetune-lm", "--merge", f"{synthetic / 'a'},{synthetic / 'b'}",
                       "--out", str(synthetic / "merged")]) == 0
    merged = json.loads((synthetic / "merged" / "results.json").read_text())
    rows = {r["optimizer"]: r for r in merged["summary"]}
    assert set(rows) == {"adamw", "adammini@exp_avg_dtype=bf16"}
    assert rows["adammini@exp_avg_dtype=bf16"]["ratio@8"] is not None


def test_a_sweep_only_part_adds_lrs_to_the_merged_sweep(synthetic):
    assert bench_main(["finetune-lm", *ARGS, "--out", str(synthetic / "a")]) == 0
    extra = [a for a in ARGS]
    extra[extra.index("--seeds") + 1] = "0"
    extra[extra.index("--sweep-factors") + 1] = "0.125"
    extra[extra.index("--optimizers") + 1] = "adamw"
    assert bench_main(["finetune-lm", *extra, "--out", str(synthetic / "b")]) == 0
    part = json.loads((synthetic / "b" / "results.json").read_text())
    assert part["runs"] == [] and len(part["sweeps"]["adamw"]) == 1
    assert bench_main(["finetune-lm", "--merge", f"{synthetic / 'a'},{synthetic / 'b'}",
                       "--out", str(synthetic / "merged")]) == 0
    merged = json.loads((synthetic / "merged" / "results.json").read_text())
    lrs = [t["lr"] for t in merged["sweeps"]["adamw"]]
    default = finetune_lm.default_lr("adamw")
    assert lrs == pytest.approx([default * f for f in (0.125, 0.5, 2)])  # one grid, by lr
    assert len(merged["sweeps"]["adammini"]) == 2 and len(merged["runs"]) == 4


def test_the_report_says_when_a_merged_sweep_found_a_better_lr():
    result = {"runs": [{"optimizer": "adamw", "lr": 1e-3}, {"optimizer": "adammini", "lr": 1e-3}],
              "sweeps": {"adamw": [{"lr": 3e-4, "final_val_loss": 1.70}, {"lr": 1e-3, "final_val_loss": 1.75}],
                         "adammini": [{"lr": 3e-4, "final_val_loss": None}, {"lr": 1e-3, "final_val_loss": 1.8}]}}
    assert finetune_lm.better_lrs(result) == {"adamw": (1e-3, 3e-4)}
