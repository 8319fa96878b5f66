"""``slimopt bench memory``: the analytic optimizer-state formulas beside the bytes really allocated.

For each harness model preset and optimizer: build the model, give every parameter a gradient, take one
optimizer step (state is allocated lazily) and count ``slimopt.state_bytes`` exactly; next to it the
formula from ``slimopt.memory.formulas`` evaluated on the same named shapes, with the optimizer's own
hyper-parameters (read from ``optimizer.defaults``, e.g. MicroAdam's m, k and block sizes). A mismatch
means either the formula or the implementation keeps something the other does not.
"""

from __future__ import annotations

import argparse
from pathlib import Path
from typing import Any

import torch

from slimopt.registry import default_names

from .args import check_choices, check_out, check_threads, guarded
from .baselines import BASELINES, OptimizerUnavailable, default_lr, galore_rank, harness_names, make_optimizer
from .model import PRESETS, build_model
from .report import markdown_table, run_metadata, write_json

__all__ = ["add_arguments", "compare", "default_optimizers", "run", "state_formula", "validate"]

# the baselines checked beside slimopt's optimizers by default: the authors' Adam-mini, and GaLore's formula
FORMULA_BASELINES = ("adam-mini-official", "galore")


def default_optimizers() -> list[str]:
    """Without ``--optimizers``: every registered optimizer, then :data:`FORMULA_BASELINES`."""
    return [*default_names(), *FORMULA_BASELINES]


def state_formula(name: str) -> str | None:
    """The analytic formula of harness optimizer ``name``: its own (registered) or its baseline's, if any."""
    from slimopt.registry import SPECS

    if name in SPECS:
        return name
    return BASELINES[name].state_formula if name in BASELINES else None


def _formula_options(formula: str, optimizer: Any, model: torch.nn.Module) -> dict[str, Any]:
    """The optimizer's own hyper-parameters that the formula takes (m, k_init, block sizes, rank ...), and
    the parameter dtype's size."""
    from slimopt.memory.formulas import formula_option_names

    accepted = set(formula_option_names(formula))
    options: dict[str, Any] = {}
    for group in optimizer.param_groups:
        options.setdefault("param_bytes", group["params"][0].element_size())
        for key in accepted & set(group):
            if group[key] is None or isinstance(group[key], (int, float, str, torch.dtype)):
                options.setdefault(key, group[key])
    if formula == "galore":  # our GaLore baseline's rank
        options["rank"] = galore_rank(model)
    return options


def compare(preset: str, names: list[str], *, seed: int = 0, log=print) -> list[dict[str, Any]]:
    from slimopt import state_bytes
    from slimopt.memory.formulas import analytic_state_bytes

    rows = []
    for name in names:
        torch.manual_seed(seed)
        model = build_model(preset)
        n_params = sum(p.numel() for p in model.parameters())
        for p in model.parameters():
            p.grad = torch.randn_like(p) * 1e-3
        try:
            optimizer = make_optimizer(model, name, lr=default_lr(name))
        except OptimizerUnavailable as exc:
            log(f"  skipping {name}: {exc}")
            continue
        optimizer.step()
        measured = state_bytes(optimizer)
        formula = state_formula(name)
        options = _formula_options(formula, optimizer, model) if formula else {}
        analytic = analytic_state_bytes(model, formula, **options) if formula else None
        rows.append({
            "preset": preset, "optimizer": name, "n_params": n_params, "measured_bytes": measured,
            "measured_bytes_per_param": measured / n_params, "formula": formula, "formula_options": options,
            "analytic_bytes": analytic,
            "analytic_minus_measured": analytic - measured if analytic is not None else None,
        })
        log(f"  {preset:8s} {name:18s} measured {measured:>12,d} B  analytic "
            f"{analytic if analytic is not None else '-':>12}")
        del model, optimizer
    return rows


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--presets", default="tiny,cpu,step42m", help="comma-separated model presets")
    parser.add_argument("--optimizers", default=",".join(default_optimizers()),
                        help="comma-separated optimizer names (default: every registered optimizer, then the "
                             "baselines with a state formula of their own: " + ", ".join(FORMULA_BASELINES) + ")")
    parser.add_argument("--threads", type=int, default=None)
    parser.add_argument("--out", default="runs/memory", help="folder for results.json and report.md")


def validate(args: argparse.Namespace) -> None:
    check_choices("--presets", args.presets, PRESETS, "preset")
    check_choices("--optimizers", args.optimizers, harness_names(), "optimizer")
    check_threads(args.threads)
    check_out("--out", args.out)


@guarded("slimopt bench memory")
def run(args: argparse.Namespace) -> int:
    validate(args)
    if args.threads:
        torch.set_num_threads(args.threads)
    presets = args.presets.split(",")
    names = args.optimizers.split(",")
    rows = [row for preset in presets for row in compare(preset, names)]
    table = markdown_table(
        ["preset", "params", "optimizer", "measured B", "B/param", "formula", "analytic B", "analytic - measured"],
        [[r["preset"], f"{r['n_params']:,}", r["optimizer"], f"{r['measured_bytes']:,}",
          r["measured_bytes_per_param"], r["formula"],
          None if r["analytic_bytes"] is None else f"{r['analytic_bytes']:,}", r["analytic_minus_measured"]]
         for r in rows])
    out = Path(args.out)
    write_json(out / "results.json", {"meta": run_metadata(), "rows": rows})
    (out / "report.md").write_text("# Optimizer state: measured (after one step) vs analytic formula\n\n"
                                   + table + "\n")
    print(table)
    print(f"results: {out.resolve()}/ (report.md, results.json)")
    return 0
