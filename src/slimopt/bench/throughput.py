"""Optimizer step time: ``optimizer.step()`` alone, on a real model shape, against torch AdamW in the same run.

Protocol (why each choice):

* one model (default ``step42m``, LLaMA-shaped 42M), every ``.grad`` filled once with fixed N(0, 1e-3)
  values, so every optimizer sees the same tensors and no forward/backward noise enters the timing;
* each optimizer takes ``warmup`` untimed steps first (lazy state allocation, first-touch page faults,
  Triton/compile caches); its first step's peak-memory delta is recorded there;
* then ``rounds`` interleaved rounds: in every round each optimizer takes ``steps`` timed steps, the order
  rotating from round to round, so slow drifts of the machine (turbo, other tenants) hit everyone alike;
* the gradients are restored from a saved copy before every step (some optimizers edit ``.grad`` in place)
  outside the timed region; the parameters are shared and simply keep moving, which changes nothing;
* the reported number is the median over all timed steps, and the ratio is to the *faster* of
  ``adamw-foreach`` and ``adamw-forloop`` measured in the same run (on CPU the for-loop is often faster).
"""

from __future__ import annotations

import argparse
import gc
import statistics
import sys
import time
from pathlib import Path
from typing import Any

import torch

from slimopt.registry import default_names

from .args import (
    check_choices,
    check_device,
    check_int,
    check_optimizers,
    check_out,
    check_threads,
    chosen_device,
    guarded,
)
from .baselines import OptimizerUnavailable, default_lr, make_optimizer
from .kernel_count import count_launches
from .model import PRESETS, build_model, count_parameters
from .report import (
    markdown_table,
    peak_rss_bytes,
    release_freed_memory,
    reset_peak_rss,
    rss_bytes,
    run_metadata,
    write_json,
)

__all__ = ["add_arguments", "default_optimizers", "main", "measure_step_times", "run", "validate"]

REFERENCES = ("adamw-foreach", "adamw-forloop")


def default_optimizers() -> list[str]:
    """Without ``--optimizers``: torch's AdamW in its three implementations, then every other registered
    optimizer."""
    # torch's fused AdamW also runs on CPU (torch >= 2.4) and is often the fastest there; shown, not the reference
    return [*REFERENCES, "adamw-fused", *(n for n in default_names() if n != "adamw")]


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def _state_bytes(optimizer: Any) -> int | None:
    from slimopt import state_bytes

    try:
        return state_bytes(optimizer)
    except Exception:  # a baseline whose state holds objects state_bytes cannot size
        return None


class _StepMemory:
    """Peak memory above the level before one step: CUDA max-allocated, or the CPU RSS high-water mark."""

    def __init__(self, device: torch.device) -> None:
        self.device = device

    def __enter__(self) -> _StepMemory:
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)
            torch.cuda.reset_peak_memory_stats(self.device)
            self.before = torch.cuda.memory_allocated(self.device)
        else:
            release_freed_memory()
            self.before = rss_bytes() if reset_peak_rss() else None
        self.delta: int | None = None
        return self

    def __exit__(self, *exc: Any) -> None:
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)
            self.delta = torch.cuda.max_memory_allocated(self.device) - self.before
        elif self.before is not None:
            peak = peak_rss_bytes()
            self.delta = None if peak is None else max(0, peak - self.before)


def measure_step_times(model: torch.nn.Module, names: list[str], *, rounds: int = 5, steps: int = 3,
                       warmup: int = 2, seed: int = 0, log=print) -> dict[str, Any]:
    """Time ``optimizer.step()`` for every name in ``names`` on ``model``; see the module docstring."""
    device = next(model.parameters()).device
    generator = torch.Generator(device="cpu").manual_seed(seed)
    params = [p for p in model.parameters() if p.requires_grad]
    saved_grads = [(torch.randn(p.shape, generator=generator) * 1e-3).to(device, p.dtype) for p in params]
    n_params = sum(p.numel() for p in params)

    def restore_grads() -> None:
        for p, g in zip(params, saved_grads):
            if p.grad is None:
                p.grad = g.clone()
            else:
                p.grad.copy_(g)

    optimizers: dict[str, Any] = {}
    results: dict[str, dict[str, Any]] = {}
    skipped: dict[str, str] = {}
    for name in names:
        try:
            optimizer = make_optimizer(model, name, lr=default_lr(name))
        except OptimizerUnavailable as exc:
            log(f"  skipping {name}: {exc}")
            skipped[name] = str(exc)
            continue
        restore_grads()
        with _StepMemory(device) as first:
            optimizer.step()
            _sync(device)
        steady = None
        for _ in range(max(0, warmup - 1)):
            restore_grads()
            with _StepMemory(device) as mem:
                optimizer.step()
            steady = mem.delta
        optimizers[name] = optimizer
        restore_grads()
        launches = count_launches(optimizer, device)  # one more warm-up step, counted
        state = _state_bytes(optimizer)
        results[name] = {
            "lr": default_lr(name),
            "type": f"{type(optimizer).__module__}.{type(optimizer).__qualname__}",
            "state_bytes": state,
            "state_bytes_per_param": None if state is None else state / n_params,
            "first_step_peak_delta_bytes": first.delta,
            "steady_step_peak_delta_bytes": steady,
            "launches_per_step": launches,
            "times_s": [],
        }

    order = list(optimizers)
    for r in range(rounds):
        rotation = order[r % len(order):] + order[: r % len(order)] if order else []
        for name in rotation:
            optimizer = optimizers[name]
            for _ in range(steps):
                restore_grads()
                _sync(device)
                start = time.perf_counter()
                optimizer.step()
                _sync(device)
                results[name]["times_s"].append(time.perf_counter() - start)
        log(f"  round {r + 1}/{rounds}: " + ", ".join(
            f"{n} {statistics.median(results[n]['times_s']) * 1e3:.1f} ms" for n in order))

    for name in order:
        times = results[name]["times_s"]
        results[name]["median_s"] = statistics.median(times)
        results[name]["min_s"] = min(times)
        q = statistics.quantiles(times, n=4) if len(times) >= 2 else [times[0]] * 3
        results[name]["iqr_s"] = [q[0], q[2]]
    baseline_names = [n for n in REFERENCES if n in results]
    reference = min(baseline_names, key=lambda n: results[n]["median_s"]) if baseline_names else None
    fused = results.get("adamw-fused")
    for name in order:
        results[name]["ratio_to_adamw"] = (results[name]["median_s"] / results[reference]["median_s"]
                                           if reference else None)
        results[name]["ratio_to_adamw_fused"] = (results[name]["median_s"] / fused["median_s"]
                                                 if fused else None)
    del optimizers
    gc.collect()
    return {"reference": reference, "n_params": n_params, "optimizers": results, "skipped": skipped}


def markdown_summary(result: dict[str, Any]) -> str:
    settings = result["settings"]
    machine = result["meta"]["machine"]
    where = machine["gpu"] or f"{machine['cpu']}, {settings['threads']} threads"
    lines = [
        f"# Optimizer step time: {settings['preset']} ({result['n_params'] / 1e6:.1f}M params, "
        f"{settings['dtype']}, {settings['device']})",
        "",
        f"{where}; torch {result['meta']['versions']['torch']}; commit {result['meta']['git_commit']}.",
        f"{settings['rounds']} interleaved rounds x {settings['steps']} steps after {settings['warmup']} "
        f"warm-up steps; median step time; ratio to the faster of torch AdamW foreach/for-loop "
        f"({result['reference']}), and to torch's fused AdamW where it ran.",
        "",
    ]

    def mib(b: int | None) -> float | None:
        return None if b is None else b / 2**20

    rows = []
    for name, r in sorted(result["optimizers"].items(), key=lambda kv: kv[1]["median_s"]):
        rows.append([name, r["median_s"] * 1e3, f"{r['iqr_s'][0] * 1e3:.1f}–{r['iqr_s'][1] * 1e3:.1f}",
                     r["ratio_to_adamw"], r["ratio_to_adamw_fused"], r.get("launches_per_step"),
                     r["state_bytes_per_param"],
                     mib(r["first_step_peak_delta_bytes"]), mib(r["steady_step_peak_delta_bytes"])])
    lines.append(markdown_table(["optimizer", "median ms", "IQR ms", "x AdamW", "x fused AdamW",
                                 "launches / step", "state B/param",
                                 "1st step peak +MiB", "step peak +MiB"], rows))
    if result["skipped"]:
        lines += ["", "Skipped: " + "; ".join(f"{n} ({why})" for n, why in result["skipped"].items())]
    return "\n".join(lines) + "\n"


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--optimizers", default=None,
                        help="comma-separated names (default: adamw-foreach, adamw-forloop, adamw-fused, "
                             "and every registered slimopt optimizer)")
    parser.add_argument("--preset", default="step42m", help="model preset (default step42m)")
    parser.add_argument("--rounds", type=int, default=5, help="interleaved timing rounds (default 5)")
    parser.add_argument("--steps", type=int, default=3, help="timed steps per optimizer per round (default 3)")
    parser.add_argument("--warmup", type=int, default=2, help="untimed steps per optimizer first (default 2)")
    parser.add_argument("--threads", type=int, default=None, help="torch CPU threads (default: torch's choice)")
    parser.add_argument("--device", default=None, help="cpu or cuda (default: cuda when available)")
    parser.add_argument("--dtype", default="float32", choices=["float32", "bfloat16"], help="parameter dtype")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--out", default=None,
                        help="JSON path (default benchmarks/results/<device>/step_time_<preset>.json); "
                             "a Markdown summary is written beside it")


def validate(args: argparse.Namespace) -> None:
    """Every argument, before a model is built; a bad one raises ``UsageError``."""
    if args.optimizers is not None:
        check_optimizers("--optimizers", args.optimizers)
    check_choices("--preset", args.preset, PRESETS, "preset")
    check_int("--rounds", args.rounds)
    check_int("--steps", args.steps)
    check_int("--warmup", args.warmup, minimum=0)
    check_threads(args.threads)
    check_device("--device", args.device)
    check_out("--out", args.out, file=True)


@guarded("slimopt bench throughput")
def run(args: argparse.Namespace, argv: list[str] | None = None) -> int:
    validate(args)
    if args.threads:
        torch.set_num_threads(args.threads)
    device = chosen_device(args.device)
    names = args.optimizers.split(",") if args.optimizers else default_optimizers()
    dtype = getattr(torch, args.dtype)
    torch.manual_seed(args.seed)
    model = build_model(args.preset).to(device=device, dtype=dtype)
    n = count_parameters(model.config)
    print(f"step time on {args.preset} ({n / 1e6:.1f}M params, {args.dtype}, {device}, "
          f"{torch.get_num_threads()} threads): {', '.join(names)}")
    measured = measure_step_times(model, names, rounds=args.rounds, steps=args.steps, warmup=args.warmup,
                                  seed=args.seed)
    result = {
        "meta": run_metadata(argv),
        "settings": {"preset": args.preset, "device": str(device), "dtype": args.dtype, "rounds": args.rounds,
                     "steps": args.steps, "warmup": args.warmup, "threads": torch.get_num_threads(),
                     "seed": args.seed, "model_config": model.config.to_dict()},
        **measured,
    }
    out = Path(args.out) if args.out else Path("benchmarks/results") / device.type / f"step_time_{args.preset}.json"
    write_json(out, result)
    summary = markdown_summary(result)
    out.with_suffix(".md").write_text(summary)
    print(summary)
    print(f"results: {out.resolve()} and {out.with_suffix('.md').name} beside it")
    return 0


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    parser = argparse.ArgumentParser(prog="step_time", description=__doc__.splitlines()[0])
    add_arguments(parser)
    return run(parser.parse_args(argv), argv=[sys.argv[0], *argv])
