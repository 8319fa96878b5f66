"""The GPU suite's own plumbing, on CPU (``--dry-run``): every section runs and writes its results."""

from __future__ import annotations

import json
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "benchmarks"))
import gpu_suite  # noqa: E402


def test_dry_run_runs_every_section(tmp_path):
    # no time budget: on a loaded 2-core machine the dry run's pre-training alone can pass the default 480 s,
    # and the test is that every section runs
    assert gpu_suite.main(["--dry-run", "--budget-s", "1e9", "--out", str(tmp_path)]) == 0
    data = json.loads((tmp_path / "results.json").read_text())
    results = data["results"]
    assert set(results) == set(gpu_suite.SECTIONS)
    assert all(r["ok"] for r in results.values()), {k: r.get("error") for k, r in results.items()}
    assert data["meta"]["versions"]["torch"] and data["dry_run"] is True
    timing = results["timing"]["result"]["rows"]
    for name in ("adamw-fused", *gpu_suite.OURS):
        for dtype in ("fp32", "bf16"):
            row = timing[f"{name}/{dtype}"]
            assert row["ms"] > 0 and row["launches"] > 0 and row["state_bytes_per_param"] > 0, (name, dtype)
    assert timing["adamw-fused/fp32"]["x_fused_adamw"] == 1.0
    assert all(results["determinism"]["result"].values()) and all(results["resume"]["result"].values())
    parity = results["parity"]["result"]
    assert all(row["finite"] and row["worst_rel_err"] == 0.0 for row in parity.values())  # same device: exact
    assert results["pretrain"]["result"]["returncode"] == 0
    assert (tmp_path / "pretrain60m" / "results.json").exists() and (tmp_path / "profile_swan.txt").exists()
    sweeps = json.loads((tmp_path / "pretrain60m" / "results.json").read_text())["sweeps"]
    assert {"adamw", "adamw-split adamw_lr", "sinkgd adamw_lr", "swan adamw_lr", "microadam"} <= set(sweeps)
    assert "| sinkgd | fp32 |" in (tmp_path / "report.md").read_text()
    smollm2 = results["smollm2"]["result"]  # the real-weights comparison's command on a tiny random Llama
    assert {r["optimizer"] for r in smollm2["summary"]} == {"adamw", "adammini", "microadam"}
    assert all(len(r["seeds"]) == 3 for r in smollm2["summary"])
    assert all(len(trials) == 3 for trials in smollm2["sweeps"].values())
    assert all(row["measured"] == row["analytic"] for row in smollm2["state_memory"]["rows"])
    finetune = results["finetune"]["result"]
    if "not_cached" not in finetune:  # MiniLM and Rotten Tomatoes fetched: the section ran them
        assert set(finetune["rows"]) == {"adamw", "microadam"}
        assert all(0.0 <= a <= 1.0 for row in finetune["rows"].values() for a in row["accuracy"])
        assert (tmp_path / "finetune_minilm" / "seed0" / "results.json").exists()


def test_unknown_section_is_named(capsys):
    with pytest.raises(SystemExit):
        gpu_suite.main(["--dry-run", "--only", "timing,nope"])
    assert "'timing,nope'" in capsys.readouterr().err
