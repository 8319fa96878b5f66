"""``slimopt bench <task>``: the papers' experiments against the baselines.

Tasks: ``pretrain`` (LLaMA-style decoder on real text), ``finetune`` (MiniLM on labelled text), ``memory``
(analytic vs measured optimizer state), ``throughput`` (optimizer step time vs torch AdamW),
``rosenbrock`` (MicroAdam's Figure 1: Top-K with and without error feedback), and the GPU-readiness checks
that need no GPU: ``gpu-estimate`` (each step at 1.34B on fake CUDA tensors) and ``triton-check`` (every
Triton specialisation compiled for sm_80/sm_90).
Each task module provides ``add_arguments(parser)`` and ``run(args)``; it is imported only when it runs.
"""

from __future__ import annotations

import argparse
import contextlib
import importlib
import math
import sys

from .args import UsageError, check_int, check_number, check_out

_TASKS = {
    "pretrain": ("slimopt.bench.pretrain", "train a LLaMA-style decoder on real text with each optimizer"),
    "finetune": ("slimopt.bench.finetune", "fine-tune MiniLM-L6 on Rotten Tomatoes / 20 Newsgroups"),
    "finetune-lm": ("slimopt.bench.finetune_lm", "fine-tune a pre-trained decoder on a held-out corpus, 3 seeds"),
    "memory": ("slimopt.bench.memory_check", "analytic optimizer-state bytes beside the measured ones"),
    "throughput": ("slimopt.bench.throughput", "optimizer step time against torch AdamW in the same run"),
    "rosenbrock": ("slimopt.bench.rosenbrock", "Adam vs Top-K Adam with and without error feedback"),
    "gpu-estimate": ("slimopt.bench.gpu_estimate", "the GPU step at 1.34B params, modelled on CPU (fake CUDA tensors)"),
    "triton-check": ("slimopt.bench.triton_check", "compile every Triton kernel the steps launch for sm_80/sm_90"),
}


def _chosen_task() -> str | None:
    argv = sys.argv[1:]
    return argv[argv.index("bench") + 1] if "bench" in argv and argv.index("bench") + 1 < len(argv) else None


def add_arguments(parser: argparse.ArgumentParser, chosen: str | None = None) -> None:
    tasks = parser.add_subparsers(dest="task", metavar="TASK", required=True)
    chosen = chosen or _chosen_task()
    for name, (module, help_text) in _TASKS.items():
        sub = tasks.add_parser(name, help=help_text, description=help_text)
        if name == chosen:  # import only the task that runs
            importlib.import_module(module).add_arguments(sub)
        elif chosen is None:  # called with an argv we cannot see: offer every task that imports
            with contextlib.suppress(ImportError):
                importlib.import_module(module).add_arguments(sub)
        sub.set_defaults(_task_module=module)


def _check_rosenbrock(args: argparse.Namespace) -> None:
    try:
        start = [float(v) for v in args.start.split(",")]
    except ValueError:
        start = []
    if len(start) != 2 or not all(math.isfinite(v) for v in start):
        raise UsageError("--start", args.start, "expected two finite numbers x,y")
    check_number("--lr", args.lr)
    check_int("--steps", args.steps)
    check_out("--out", args.out)


# argument checks of the tasks whose module has none of its own (the others validate in their ``run``)
_CHECKS = {"rosenbrock": _check_rosenbrock}


def run(args: argparse.Namespace) -> int:
    check = _CHECKS.get(args.task)
    if check is not None:
        try:
            check(args)
        except UsageError as exc:
            print(f"slimopt bench {args.task}: {exc}", file=sys.stderr)
            return 2
    return importlib.import_module(args._task_module).run(args) or 0


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    parser = argparse.ArgumentParser(prog="slimopt bench", description=__doc__.splitlines()[0])
    add_arguments(parser, chosen=argv[0] if argv else None)
    return run(parser.parse_args(argv))
