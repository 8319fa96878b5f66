"""The fine-tuning task end to end on a handful of Rotten Tomatoes snippets (needs the cached MiniLM)."""

from __future__ import annotations

import argparse
import json

import pytest

from slimopt.bench import finetune


def _cached(name: str) -> bool:
    from slimopt.bench.fetch import is_cached

    return is_cached(name)


@pytest.mark.skipif(not (_cached("minilm") and _cached("rotten-tomatoes")),
                    reason="needs `slimopt data fetch minilm rotten-tomatoes`")
def test_finetune_writes_results(tmp_path):
    parser = argparse.ArgumentParser()
    finetune.add_arguments(parser)
    args = parser.parse_args(["--train-examples", "16", "--test-examples", "16", "--batch-size", "8",
                              "--optimizers", "adamw", "--threads", "1", "--out", str(tmp_path)])
    assert finetune.run(args) == 0
    result = json.loads((tmp_path / "results.json").read_text())
    (run,) = result["runs"]
    assert run["steps"] == 2 and 0.0 <= run["test_accuracy"] <= 1.0
    # AdamW: two float32 moments per parameter plus a 4-byte step per tensor.
    assert run["n_tensors"] == 105  # BertModel incl. pooler (103) + classifier weight and bias
    assert run["state_bytes"] == 8 * run["n_params"] + 4 * run["n_tensors"]
    assert "| adamw |" in (tmp_path / "report.md").read_text()


def test_finetune_lr_keeps_the_registry_ratios():
    assert finetune.finetune_lr("adamw") == pytest.approx(5e-5)
    assert finetune.finetune_lr("adamw-forloop") == pytest.approx(5e-5)


def test_end_of_run_table_fits_100_columns():
    runs = [{"optimizer": name, "lr": 5e-5 * (i + 1), "test_accuracy": 0.8 - i / 100, "final_train_loss": 0.46 + i,
             "state_bytes": 182_000_000 - i * 10**7, "state_bytes_per_param": 8.0 - i, "peak_memory_bytes": None,
             "optimizer_step_median_s": 0.2 * (i + 1)}
            for i, name in enumerate(["adamw", "microadam", "adammini", "sinkgd", "swan", "adam-mini-official"])]
    table = finetune.console_summary(runs, "MiniLM-L6 on rotten-tomatoes, 4096 train / 1066 test examples")
    assert max(len(line) for line in table.splitlines()) <= 100
    line = next(line for line in table.splitlines() if line.split()[:1] == ["adamw"])
    assert line.split()[1:5] == ["5e-05", "80.00%", "0.4600", "173.6"] and line.split()[-2] == "–"
