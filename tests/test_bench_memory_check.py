"""Measured optimizer state of the harness models against the analytic formulas."""

from __future__ import annotations

import pytest

from slimopt.bench.memory_check import compare


def test_adamw_state_matches_the_formula_exactly():
    (row,) = compare("tiny", ["adamw"], log=lambda *_: None)
    # Two float32 moments per parameter plus one 4-byte step per tensor (39 tensors in the tiny preset).
    assert row["measured_bytes"] == 8 * row["n_params"] + 4 * 39
    assert row["analytic_minus_measured"] == 0


@pytest.mark.parametrize("name", ["adammini", "microadam", "sinkgd", "swan"])
def test_our_optimizers_match_their_formula(name):
    (row,) = compare("tiny", [name], log=lambda *_: None)
    assert row["analytic_bytes"] == row["measured_bytes"]
