"""The package's shape: layers without upward imports or cycles, no optimizer named below the optimizers, the
registry as the one list, the public API."""

from __future__ import annotations

import ast
import importlib
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

import slimopt
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


def _docstrings(tree: ast.AST) -> set[int]:
    return {id(node.body[0].value) for node in ast.walk(tree)
            if isinstance(node, (ast.Module, ast.FunctionDef, ast.AsyncFunctionDef, ast.ClassDef)) and node.body
            and isinstance(node.body[0], ast.Expr) and isinstance(node.body[0].value, ast.Constant)}


def _code_strings(path: Path) -> set[str]:
    """The string literals of a module's code (docstrings are prose, not code)."""
    tree = ast.parse(path.read_text())
    docstrings = _docstrings(tree)
    return {n.value for n in ast.walk(tree) if isinstance(n, ast.Constant) and isinstance(n.value, str)
            and id(n) not in docstrings}


def _identifiers(path: Path) -> set[str]:
    """Every name a module's code gives or uses: the module's own, its functions, classes, arguments, variables,
    attributes, keywords and imports, and the words of its string literals."""
    tree = ast.parse(path.read_text())
    names = {path.stem}
    for node in ast.walk(tree):
        if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef, ast.ClassDef)):
            names.add(node.name)
        elif isinstance(node, ast.arg):
            names.add(node.arg)
        elif isinstance(node, ast.Attribute):
            names.add(node.attr)
        elif isinstance(node, ast.Name):
            names.add(node.id)
        elif isinstance(node, ast.keyword) and node.arg:
            names.add(node.arg)
        elif isinstance(node, ast.alias):
            names.update(filter(None, (node.name, node.asname)))
        elif isinstance(node, ast.ImportFrom) and node.module:
            names.add(node.module)
    names.update(word for text in _code_strings(path) for word in re.findall(r"[\w.-]+", text))
    return names


def _squash(name: str) -> str:
    """``adam_mini_foreach``, ``Adam-mini``, ``AdamMini`` -> ``adamminiforeach``, ``adammini``, ``adammini``."""
    return re.sub(r"[^a-z0-9]", "", name.lower())


def _slimopt_optimizer_names() -> set[str]:
    """slimopt's own optimizers as written anywhere: names, aliases and classes, squashed. (torch's AdamW, which
    the registry also holds, is not one: ``ops/adamw.py`` is the textbook update the hybrids' AdamW part runs.)"""
    return {_squash(n) for spec in SPECS.values() if spec.in_slimopt
            for n in (spec.name, *spec.aliases, spec.target.partition(":")[2])}


def _names_an_optimizer(path: Path) -> list[str]:
    optimizers = _slimopt_optimizer_names()
    return sorted(n for n in _identifiers(path) if any(o in _squash(n) for o in optimizers))


def test_the_identifier_check_sees_names_in_code(tmp_path):
    """The check below finds an optimizer in a function's name, an argument, an attribute and a string."""
    fake = tmp_path / "fake_kernel.py"
    fake.write_text("def sinkgd_scale(x, adam_mini_blocks):\n    return x.microadam_window, 'SWAN rows'\n")
    assert _names_an_optimizer(fake) == ["SWAN", "adam_mini_blocks", "microadam_window", "sinkgd_scale"]
    fake.write_text("def row_scale(x, blocks):\n    return x.window, 'rows'\n")
    assert _names_an_optimizer(fake) == []


def test_no_code_below_the_optimizers_names_an_optimizer():
    """Kernels (ops/), bookkeeping (core/) and plans (plans/) are named for what they compute: no module,
    function, class, argument, attribute or string there names one of slimopt's optimizers."""
    src = ROOT / "src" / "slimopt"
    below = [*(src / "ops").glob("*.py"), *(src / "core").glob("*.py"), *(src / "plans").glob("*.py")]
    assert len(below) > 10
    found = {str(path.relative_to(ROOT)): _names_an_optimizer(path) for path in sorted(below)}
    found = {path: names for path, names in found.items() if names}
    assert not found, found


def test_no_code_above_the_optimizers_branches_on_a_class_name():
    """memory/, comm.py and bench/ ask the spec's hooks what differs, never the class's name."""
    class_names = {spec.target.partition(":")[2] for spec in SPECS.values()}
    src = ROOT / "src" / "slimopt"
    for path in [src / "comm.py", *(src / "memory").glob("*.py"), *(src / "bench").glob("*.py")]:
        found = _code_strings(path) & class_names
        assert not found, f"{path.relative_to(ROOT)} names the classes {found}"


def test_every_spec_resolves():
    for spec in SPECS.values():
        assert isinstance(spec.load(), type)
        assert callable(spec.formula())
        assert spec.comm is None or callable(spec.comm_hook())
        assert set(spec.formula_defaults()) == set(spec.formula_options), spec.name


def test_public_api_is_unchanged():
    for name in ("create_optimizer", "get_supported_optimizers", "load_optimizer", "state_bytes",
                 "state_bytes_by_key", "MicroAdam", "AdamMini", "SinkGD", "SWAN", "SlimOptimizer"):
        assert getattr(slimopt, name) is not None
    from slimopt.bench.model import PRESETS, LlamaDecoder, build_model  # noqa: F401

    assert slimopt.load_optimizer("adam-mini") is slimopt.AdamMini  # aliases
    assert slimopt.__version__ == "0.2.0"


def test_the_lazy_classes_are_the_registry_s_and_import_slimopt_stays_light():
    """``slimopt.<Class>`` for every registered class of slimopt (read from the specs), imported on first use:
    ``import slimopt`` imports no optimizer module."""
    for spec in SPECS.values():
        if spec.in_slimopt:
            name = spec.target.partition(":")[2]
            assert name in slimopt.__all__ and getattr(slimopt, name) is spec.load()
    assert not hasattr(slimopt, "AdamW")  # torch's class stays torch's
    with pytest.raises(AttributeError, match="no attribute 'Nope'"):
        slimopt.Nope  # noqa: B018
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(ROOT / "src"), os.environ.get("PYTHONPATH", "")])}
    done = subprocess.run([sys.executable, "-c", "import sys, slimopt; print(sorted(m for m in sys.modules if "
                           "m.startswith(('slimopt.optim', 'slimopt.ops', 'slimopt.bench'))))"],
                          capture_output=True, text=True, timeout=120, env=env)
    assert done.returncode == 0, done.stderr
    assert done.stdout.strip() == "[]"


def test_the_import_paths_of_0_1_are_gone():
    """0.2.0 dropped the forwarders of the 0.1 layout (CHANGELOG.md lists the new homes)."""
    for old in ("slimopt.microadam", "slimopt.plan", "slimopt.planner", "slimopt.memory_model"):
        with pytest.raises(ModuleNotFoundError):
            importlib.import_module(old)
