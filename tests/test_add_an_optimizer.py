"""Adding an optimizer takes its module and one registry entry (docs/architecture.md): a toy Lion
(tests/toy_lion.py) goes through the conformance suite, ``slimopt memory``, ``slimopt plan`` and
``slimopt bench throughput`` without a change anywhere else."""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

import slimopt
import toy_lion
from slimopt.bench.throughput import main as throughput_main
from slimopt.cli import main as cli_main
from slimopt.registry import register, unregister

TESTS = Path(__file__).resolve().parent


@pytest.fixture
def toy_registered():
    register(toy_lion.SPEC)
    yield toy_lion.SPEC.name
    unregister(toy_lion.SPEC.name)


def test_the_toy_passes_the_conformance_suite():
    env = {**os.environ, "SLIMOPT_TEST_TOY_OPTIMIZER": "1",
           "PYTHONPATH": os.pathsep.join([str(TESTS), os.environ.get("PYTHONPATH", "")])}
    done = subprocess.run([sys.executable, "-m", "pytest", "-q", "-p", "no:xdist", "-p", "no:cacheprovider",
                           str(TESTS / "test_conformance.py"), "-k", "toy-lion"],
                          env=env, capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    passed = int(re.search(r"(\d+) passed", done.stdout).group(1))
    per_optimizer = len(re.findall(r"^def test_", (TESTS / "test_conformance.py").read_text(), re.M))
    assert passed >= per_optimizer - 3  # a few conformance tests are for torch's AdamW only


def test_the_toy_is_a_name_a_class_and_a_formula(toy_registered):
    assert toy_registered in slimopt.get_supported_optimizers()
    assert slimopt.load_optimizer(toy_registered) is toy_lion.Lion
    model = toy_lion.torch.nn.Sequential(toy_lion.torch.nn.Linear(4, 3))
    opt = slimopt.create_optimizer(model, toy_registered, lr=1e-3)
    from slimopt.memory.formulas import analytic_state_bytes

    for p in model.parameters():
        p.grad = toy_lion.torch.ones_like(p)
    opt.step()
    assert slimopt.state_bytes(opt) == analytic_state_bytes(model, toy_registered) == 15 * 4 + 2 * 4


def test_the_toy_appears_in_memory_and_plan(toy_registered, capsys):
    with pytest.raises(SystemExit) as done:
        cli_main(["memory", "--model", "gpt2", "--optimizer", toy_registered, "--json"])
    assert done.value.code == 0
    row = json.loads(capsys.readouterr().out)["optimizers"][0]
    assert row["optimizer"] == toy_registered and 4.0 <= row["bytes_per_param"] < 4.001
    with pytest.raises(SystemExit) as done:
        cli_main(["plan", "--model", "gpt2", "--gpu-mem", "24", "--optimizer", toy_registered, "--json"])
    assert done.value.code == 0
    (row,) = json.loads(capsys.readouterr().out)["rows"]
    assert row["optimizer"] == toy_registered and row["in_slimopt"] is False and row["fits"]


def test_the_toy_appears_in_bench_throughput(toy_registered, tmp_path):
    out = tmp_path / "step.json"
    throughput_main(["--preset", "tiny", "--rounds", "1", "--steps", "1", "--warmup", "1", "--threads", "1",
                     "--optimizers", f"adamw-forloop,{toy_registered}", "--out", str(out)])
    result = json.loads(out.read_text())
    assert result["optimizers"][toy_registered]["median_s"] > 0
