"""Adding an optimizer takes its module and one registry entry (docs/architecture.md): a toy Lion
(tests/toy_lion.py) goes through the conformance suite, and appears in every list the registry feeds (the lazy
classes, ``slimopt memory``'s rows, ``slimopt plan``, the harness's defaults and ``bench throughput``)
without a change anywhere else."""

from __future__ import annotations

import json

import pytest

import slimopt
import test_conformance
import toy_lion
from slimopt.bench import finetune, finetune_lm, memory_check, pretrain, throughput
from slimopt.bench.baselines import harness_names, takes_second_lr
from slimopt.bench.model import build_model
from slimopt.cli import build_parser
from slimopt.cli import main as cli_main
from slimopt.memory import formulas
from slimopt.memory.fit import fit_candidates
from slimopt.registry import default_names, register, unregister


@pytest.fixture
def toy_registered():
    register(toy_lion.SPEC)
    yield toy_lion.SPEC.name
    unregister(toy_lion.SPEC.name)


def _names_of_each_conformance_test() -> dict[str, list[str]]:
    """test function -> the optimizer names it is parametrised with."""
    out = {}
    for name in dir(test_conformance):
        test = getattr(test_conformance, name)
        if name.startswith("test_") and callable(test):
            marks = [m for m in getattr(test, "pytestmark", []) if m.name == "parametrize" and m.args[0] == "name"]
            assert len(marks) == 1, f"{name}: every conformance test takes the optimizer as 'name'"
            out[name] = list(marks[0].args[1])
    return out


def test_the_toy_runs_every_conformance_test_but_torch_adamw_s_own():
    """The conformance suite runs the toy in-process (tests/test_conformance.py registers it for its cases):
    every test except those for torch's AdamW alone (its own error on sparse gradients)."""
    tests = _names_of_each_conformance_test()
    toy = toy_lion.SPEC.name
    torch_only = {test for test, names in tests.items() if names == ["adamw"]}
    assert torch_only == {"test_torch_adamw_rejects_sparse"}
    assert {test for test, names in tests.items() if toy in names} == set(tests) - torch_only
    assert len(tests) - len(torch_only) == 16
    assert toy not in slimopt.get_supported_optimizers()  # registered only while its own cases run


def test_the_toy_is_a_name_a_class_and_a_formula(toy_registered):
    assert toy_registered in slimopt.get_supported_optimizers()
    assert slimopt.load_optimizer(toy_registered) is toy_lion.Lion
    assert slimopt.Lion is toy_lion.Lion and "Lion" in dir(slimopt)  # the lazy classes read the registry
    model = toy_lion.torch.nn.Sequential(toy_lion.torch.nn.Linear(4, 3))
    opt = slimopt.create_optimizer(model, toy_registered, lr=1e-3)
    for p in model.parameters():
        p.grad = toy_lion.torch.ones_like(p)
    opt.step()
    assert slimopt.state_bytes(opt) == formulas.analytic_state_bytes(model, toy_registered) == 15 * 4 + 2 * 4


def test_the_class_is_gone_with_its_spec():
    with pytest.raises(AttributeError, match="Lion"):
        slimopt.Lion  # noqa: B018


def test_the_toy_is_in_every_list_the_registry_feeds(toy_registered):
    toy = toy_registered
    assert toy in formulas.table() and formulas.table()[toy].summary == toy_lion.SPEC.state_note
    assert toy in formulas.row_names() and toy in fit_candidates() and toy in harness_names()
    assert default_names()[-1] == toy
    for task in (pretrain, finetune_lm, finetune, memory_check, throughput):
        assert toy in task.default_optimizers(), task.__name__
    for argv in (["bench", "finetune-lm"], ["bench", "finetune"], ["bench", "memory"]):
        assert toy in build_parser(argv).parse_args(argv).optimizers.split(","), argv
    assert not takes_second_lr(toy)  # no adamw_lr in its constructor


def test_the_toy_appears_in_memory_and_plan(toy_registered, capsys):
    with pytest.raises(SystemExit) as done:
        cli_main(["memory", "--model", "gpt2", "--json"])  # the default rows
    assert done.value.code == 0
    rows = {row["optimizer"]: row for row in json.loads(capsys.readouterr().out)["optimizers"]}
    assert 4.0 <= rows[toy_registered]["bytes_per_param"] < 4.001
    with pytest.raises(SystemExit) as done:
        cli_main(["plan", "--model", "gpt2", "--gpu-mem", "24", "--optimizer", toy_registered, "--json"])
    assert done.value.code == 0
    (row,) = json.loads(capsys.readouterr().out)["rows"]
    assert row["optimizer"] == toy_registered and row["in_slimopt"] is False and row["fits"]


def test_the_toy_appears_in_bench_throughput(toy_registered):
    """``bench throughput``'s measurements of the toy, where they can be checked: its state against its
    formula, and its launches (each tensor's Lion update alone is 7 aten ops: m*b1, +g, sign, *lr, p-=, m*b2,
    +g) against that lower bound. The step times are not checked (a shared machine's clock)."""
    model = build_model("tiny")
    result = throughput.measure_step_times(model, [toy_registered], rounds=1, steps=1, warmup=1, log=lambda _: None)
    row = result["optimizers"][toy_registered]
    assert row["state_bytes"] == formulas.analytic_state_bytes(model, toy_registered)
    assert row["launches_per_step"] >= 7 * len(list(model.parameters()))
