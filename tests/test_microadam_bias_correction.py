"""MicroAdam's bias correction: the paper's, and the window's own weight (``bias_correction="window"``)."""

from __future__ import annotations

import math

import pytest
import torch

import slimopt
from slimopt.ops.sparse_window import bias_corrections

BETAS = (0.9, 0.999)


def _step_size_growth(mode: str, steps: list[int], m: int = 10) -> dict[int, float]:
    """|update| / lr of a coordinate that every step selects with the same gradient, k = 1 block entry."""
    p = torch.nn.Parameter(torch.zeros(64, dtype=torch.float32))
    opt = slimopt.MicroAdam([("w", p)], lr=1e-3, betas=BETAS, eps=0.0, m=m, k_init=1 / 64, topk_block_size=64,
                            bias_correction=mode, backend="torch")
    grad = torch.zeros(64)
    grad[5] = 1.0  # the largest entry: chosen every step; nothing else moves
    out = {}
    for t in range(1, max(steps) + 1):
        with torch.no_grad():
            p.zero_()  # p does not enter the update (no weight decay); at 0 its fp32 rounding is the update's
        p.grad = grad.clone()
        opt.step()
        if t in steps:
            out[t] = abs(p[5].item()) / 1e-3
    return out


def _float64_growth(mode: str, t: int, m: int = 10) -> float:
    """The same step from Algorithm 1's formulas in float64: rows of age 0..min(t, m)-1 all hold g = 1."""
    beta1, beta2 = BETAS
    rows = min(t, m)
    first = (1 - beta1) * sum(beta1**a for a in range(rows))
    second = (1 - beta2) * sum(beta2**a for a in range(rows))
    bias_t = t if mode == "paper" else min(t, m)
    return (first / (1 - beta1**bias_t)) / math.sqrt(second / (1 - beta2**bias_t))


@pytest.mark.parametrize("mode, expected", [("paper", {1: 1.0, 10: 1.0, 128: 2.3, 1000: 5.2}),
                                            ("window", {1: 1.0, 10: 1.0, 128: 1.0, 1000: 1.0})])
def test_step_size_growth_of_each_mode(mode, expected):
    measured = _step_size_growth(mode, list(expected))
    for t, value in expected.items():
        # the optimizer against the float64 formula (fp32 window values, bf16-rounded g = 1 exactly) ...
        assert measured[t] == pytest.approx(_float64_growth(mode, t), rel=1e-5), (mode, t)
        # ... and the growth the issue measured: 1x up to t = m, then 2.3x at 128 and 5.2x at 1000 (paper)
        assert measured[t] == pytest.approx(value, abs=0.05), (mode, t)


def test_window_mode_equals_paper_mode_until_the_window_fills():
    for t in range(1, 11):
        assert bias_corrections(t, *BETAS, mode="window", m=10) == bias_corrections(t, *BETAS)
    assert bias_corrections(50, *BETAS, mode="window", m=10) == bias_corrections(10, *BETAS)


def test_invalid_mode_is_named():
    with pytest.raises(ValueError, match="bias_correction.*'adam'"):
        slimopt.MicroAdam([torch.nn.Parameter(torch.zeros(4))], bias_correction="adam")
