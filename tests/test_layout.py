"""The package's shape: layers without upward imports or cycles, one place per optimizer, old import paths."""

from __future__ import annotations

import ast
import importlib
import sys
import warnings
from pathlib import Path

import pytest

import slimopt
from slimopt._moved import MOVED
from slimopt.registry import SPECS

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "tools"))
import import_graph  # noqa: E402


def test_imports_go_down_the_layers_without_cycles():
    graph = import_graph.edges()
    assert len(graph) > 50  # the scan sees the package (a broken scan would pass vacuously)
    assert ("slimopt.optim.sinkgd", "slimopt.optim.hybrid") in graph
    assert ("slimopt.registry", "slimopt.optim.microadam") in graph  # "module:Class" targets count
    assert import_graph.upward_edges(graph) == []
    assert import_graph.cycles(graph) == []


def test_the_check_finds_an_upward_edge_and_a_cycle():
    fake = {("slimopt.ops.topk", "slimopt.optim.microadam"), ("slimopt.optim.microadam", "slimopt.ops.topk")}
    assert import_graph.upward_edges(fake) == [("slimopt.ops.topk", "slimopt.optim.microadam")]
    assert import_graph.cycles(fake) == [["slimopt.ops.topk", "slimopt.optim.microadam"]]


def _code_strings(path: Path) -> set[str]:
    tree = ast.parse(path.read_text())
    docstrings = {id(node.body[0].value) for node in ast.walk(tree)
                  if isinstance(node, (ast.Module, ast.FunctionDef, ast.ClassDef)) and node.body
                  and isinstance(node.body[0], ast.Expr) and isinstance(node.body[0].value, ast.Constant)}
    return {n.value for n in ast.walk(tree) if isinstance(n, ast.Constant) and isinstance(n.value, str)
            and id(n) not in docstrings}


def test_no_code_outside_the_optimizers_and_registry_names_an_optimizer_or_its_class():
    class_names = {spec.target.partition(":")[2] for spec in SPECS.values()}
    names = set(SPECS) | {a for spec in SPECS.values() for a in spec.aliases}
    src = ROOT / "src" / "slimopt"
    below = [*(src / "ops").glob("*.py"), *(src / "core").glob("*.py"), *(src / "plans").glob("*.py")]
    for path in below:
        found = _code_strings(path) & (names | class_names)
        assert not found, f"{path.relative_to(ROOT)} names {found}"
    # above them, no branching on class names (the spec's hooks say what differs)
    for path in [src / "comm.py", *(src / "memory").glob("*.py"), *(src / "bench").glob("*.py")]:
        found = _code_strings(path) & class_names
        assert not found, f"{path.relative_to(ROOT)} names the classes {found}"


def test_every_spec_resolves():
    for spec in SPECS.values():
        assert isinstance(spec.load(), type)
        assert callable(spec.formula())
        assert spec.comm is None or callable(spec.comm_hook())
        assert set(spec.formula_defaults()) == set(spec.formula_options), spec.name


@pytest.mark.parametrize("old, attribute, new", [
    ("slimopt.microadam", "MicroAdam", "slimopt.optim.microadam:MicroAdam"),
    ("slimopt.adam_mini", "AdamMini", "slimopt.optim.adam_mini:AdamMini"),
    ("slimopt.sinkgd", "SinkGD", "slimopt.optim.sinkgd:SinkGD"),
    ("slimopt.swan", "SWAN", "slimopt.optim.swan:SWAN"),
    ("slimopt.routing", "HybridStatelessOptimizer", "slimopt.optim.hybrid:HybridStatelessOptimizer"),
    ("slimopt.optimizer", "SlimOptimizer", "slimopt.core.base:SlimOptimizer"),
    ("slimopt.plan", "Plan", "slimopt.plans.param_plan:ParamPlan"),
    ("slimopt.plan", "ADAM_MINI", "slimopt.optim.adam_mini:ADAM_MINI"),
    ("slimopt.planner", "Plan", "slimopt.memory.fit:FitPlan"),
    ("slimopt.memory_model", "MODELS", "slimopt.memory.models:MODELS"),
    ("slimopt.memory_model", "analytic_state_bytes", "slimopt.memory.formulas:analytic_state_bytes"),
    ("slimopt.distributed", "comm_bytes_per_step", "slimopt.comm:comm_bytes_per_step"),
    ("slimopt.data", "fetch", "slimopt.bench.fetch:fetch"),
    ("slimopt.memory", "state_bytes", "slimopt.memory.state_bytes:state_bytes"),
])
def test_old_import_paths_forward_to_the_new_ones(old, attribute, new):
    module, _, name = new.partition(":")
    expected = getattr(importlib.import_module(module), name)
    if old != "slimopt.memory":
        sys.modules.pop(old, None)  # a fresh forwarder warns again (each warns once)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        got = getattr(importlib.import_module(old), attribute)
    assert got is expected
    if old != "slimopt.memory":  # still a real module: the package
        assert any(issubclass(w.category, FutureWarning) and MOVED[old][0] in str(w.message)
                   for w in caught), [str(w.message) for w in caught]


def test_a_name_gone_from_an_old_path_says_where_the_module_went():
    with pytest.raises(ImportError, match="slimopt.memory.formulas"), warnings.catch_warnings():
        warnings.simplefilter("ignore")
        from slimopt.memory_model import OPTIMIZER_STATE  # noqa: F401


def test_public_api_is_unchanged():
    for name in ("create_optimizer", "get_supported_optimizers", "load_optimizer", "state_bytes",
                 "state_bytes_by_key", "MicroAdam", "AdamMini", "SinkGD", "SWAN", "SlimOptimizer"):
        assert getattr(slimopt, name) is not None
    from slimopt.bench.model import PRESETS, LlamaDecoder, build_model  # noqa: F401

    assert slimopt.load_optimizer("adam-mini") is slimopt.AdamMini  # aliases
