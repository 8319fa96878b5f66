"""The step-time benchmark: JSON structure, interleaving and the ratio to the faster torch AdamW."""

from __future__ import annotations

import json

import pytest

from slimopt.bench.baselines import BASELINES, Baseline, OptimizerUnavailable, _require, make_optimizer
from slimopt.bench.model import build_model
from slimopt.bench.throughput import main, measure_step_times


def _unavailable(*args, **kwargs):
    raise OptimizerUnavailable("needs `pip install not-installed`")


def test_step_time_json_structure(tmp_path, monkeypatch):
    monkeypatch.setitem(BASELINES, "missing", Baseline("missing", 1e-3, "a package that is not here", _unavailable))
    out = tmp_path / "step.json"
    main(["--preset", "tiny", "--rounds", "2", "--steps", "2", "--warmup", "1", "--threads", "1",
          "--optimizers", "adamw-foreach,adamw-forloop,adafactor,missing", "--out", str(out)])
    result = json.loads(out.read_text())
    assert {"meta", "settings", "reference", "n_params", "optimizers", "skipped"} <= set(result)
    assert result["meta"]["machine"]["cpu"] and result["meta"]["versions"]["torch"]
    assert result["reference"] in ("adamw-foreach", "adamw-forloop")
    assert set(result["optimizers"]) == {"adamw-foreach", "adamw-forloop", "adafactor"}
    assert "pip install not-installed" in result["skipped"]["missing"]
    for r in result["optimizers"].values():
        assert len(r["times_s"]) == 2 * 2  # rounds x steps, warm-up excluded
        assert r["launches_per_step"] > 0
        assert r["median_s"] > 0 and r["ratio_to_adamw"] > 0
    ref = result["optimizers"][result["reference"]]
    assert ref["ratio_to_adamw"] == 1.0
    # The reference is the faster torch AdamW, so the other one is at least as slow.
    assert min(result["optimizers"]["adamw-foreach"]["ratio_to_adamw"],
               result["optimizers"]["adamw-forloop"]["ratio_to_adamw"]) == 1.0
    # AdamW keeps exp_avg and exp_avg_sq in float32 (8 bytes per parameter) plus a 4-byte step per tensor.
    n_tensors = len(list(build_model("tiny").parameters()))
    expected = 8 + 4 * n_tensors / result["n_params"]
    assert ref["state_bytes_per_param"] == pytest.approx(expected, rel=1e-9)
    assert (tmp_path / "step.md").read_text().startswith("# Optimizer step time")
    assert "launches / step" in (tmp_path / "step.md").read_text()
    # the for-loop AdamW launches several ops per tensor; the foreach one a few per group of tensors
    optimizers = result["optimizers"]
    assert optimizers["adamw-forloop"]["launches_per_step"] > 3 * optimizers["adamw-foreach"]["launches_per_step"]


def test_unknown_optimizer_is_an_error_not_a_skip():
    with pytest.raises(ValueError, match="Unknown optimizer"):
        make_optimizer(build_model("tiny"), "no-such-optimizer")


def test_every_optimizer_steps_the_same_gradients():
    model = build_model("tiny")
    result = measure_step_times(model, ["adamw-forloop", "adamw-foreach"], rounds=1, steps=1, warmup=1,
                                log=lambda *_: None)
    assert all(p.grad is not None for p in model.parameters())
    assert set(result["optimizers"]) == {"adamw-forloop", "adamw-foreach"}


def test_missing_package_raises_unavailable_with_the_pip_command():
    with pytest.raises(OptimizerUnavailable, match="pip install no-such-package"):
        _require("no_such_module_for_slimopt_tests", "no-such-package")
