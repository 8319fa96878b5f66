"""MicroAdam's Figure 1 claim on Rosenbrock: Top-K (1 of 2) Adam fails, error feedback recovers Adam."""

from __future__ import annotations

import json

import torch

from slimopt.bench.rosenbrock import default_args, rosenbrock, rosenbrock_grad, run, run_all, simulate, top1


def test_gradient_matches_autograd():
    x = torch.tensor([0.3, -1.7], dtype=torch.float64, requires_grad=True)
    value = (1 - x[0]) ** 2 + 100 * (x[1] - x[0] ** 2) ** 2
    value.backward()
    assert rosenbrock(0.3, -1.7) == value.item()
    assert torch.allclose(torch.tensor(rosenbrock_grad(0.3, -1.7), dtype=torch.float64), x.grad, rtol=1e-14)


def test_plain_adam_path_matches_torch_adam():
    ours = simulate("adam", start=(1.5, 0.5), lr=0.002, steps=200)
    p = torch.tensor([1.5, 0.5], dtype=torch.float64, requires_grad=True)
    adam = torch.optim.Adam([p], lr=0.002, betas=(0.9, 0.999), eps=1e-8)
    for _ in range(200):
        adam.zero_grad()
        ((1 - p[0]) ** 2 + 100 * (p[1] - p[0] ** 2) ** 2).backward()
        adam.step()
    # Same float64 recurrence in a different operation order: agreement to rounding after 200 steps.
    assert torch.allclose(torch.tensor(ours.points[-1], dtype=torch.float64), p.detach(), atol=1e-10)


def test_top1_keeps_the_larger_magnitude_coordinate():
    assert top1((3.0, -5.0)) == (0.0, -5.0)
    assert top1((-7.0, 2.0)) == (-7.0, 0.0)


def test_error_feedback_recovers_adam_and_plain_topk_fails():
    runs = run_all()  # the documented default setup
    adam, topk, ef = runs["adam"], runs["topk-adam"], runs["topk-adam-ef"]
    assert adam.steps_to_target is not None and ef.steps_to_target is not None  # both reach f < 1e-3
    assert ef.distance_to_minimum < 0.1 and adam.distance_to_minimum < 0.1
    assert topk.steps_to_target is None
    assert topk.final_value > 50 * ef.final_value
    assert topk.distance_to_minimum > 0.3
    # Error feedback is slower than Adam (updates are delayed), but within a factor of two here.
    assert ef.steps_to_target < 2 * adam.steps_to_target


def test_cli_writes_table_plot_and_json(tmp_path):
    assert run(default_args(out=str(tmp_path), steps=300)) == 0
    result = json.loads((tmp_path / "results.json").read_text())
    assert [r["method"] for r in result["results"]] == ["adam", "topk-adam", "topk-adam-ef"]
    assert (tmp_path / "rosenbrock.png").stat().st_size > 10_000
    assert "topk-adam-ef" in (tmp_path / "report.md").read_text()
