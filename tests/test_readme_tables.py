"""The README's result tables are generated from benchmarks/results/ and must stay in sync with them."""

from __future__ import annotations

import importlib.util
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def _tables_module():
    spec = importlib.util.spec_from_file_location("readme_tables", ROOT / "benchmarks" / "readme_tables.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_readme_tables_match_the_committed_results(capsys):
    assert _tables_module().main(["--check"]) == 0, capsys.readouterr().out


def test_a_table_is_rewritten_between_its_markers_only():
    tables = _tables_module()
    text = ("intro\n<!-- begin: demo (generated) -->\nstale\n<!-- end: demo -->\noutro\n"
            + "".join(f"<!-- begin: {n} x -->\n<!-- end: {n} -->\n" for n in tables.TABLES if n != "demo"))
    out = tables.render(text)
    demo = out.split("<!-- end: demo -->")[0]
    assert demo.startswith("intro\n<!-- begin: demo (generated) -->\nRan on ")  # the machine first
    assert "\n| optimizer |" in demo and "stale" not in out
    assert "-->\noutro\n" in out
    assert tables.render(out) == out  # idempotent
