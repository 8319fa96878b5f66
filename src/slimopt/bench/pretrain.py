"""``slimopt bench pretrain``: train the LLaMA-style decoder on real text with each optimizer and compare.

    data (slimopt.bench.fetch corpora or --text) -> tokens -> fixed train/val split
    -> model preset (same initial weights for every optimizer with the same seed)
    -> optimizer (ours and the baselines through one factory; optional short lr sweep)
    -> loop (warm-up + cosine, clipping, bf16 autocast on GPU)
    -> results.json, report.md, loss_vs_step.png, loss_vs_time.png, memory.png

``--quick`` is the README demo: Shakespeare only, the tiny preset, 200 steps of 16 x 128 bytes, adamw /
microadam / adammini / sinkgd / swan. Measured: 2 min 25 s on two idle CPU cores; 51 min on a 2-core
machine other jobs kept busy, with torch's default of one thread per core (the threads wait on each
other); 9 min 26 s with ``--threads 1`` on such a machine. Ctrl-C stops the current run and still writes
what finished.
"""

from __future__ import annotations

import argparse
import json
import math
import re
import statistics
import sys
import textwrap
import time
from pathlib import Path
from typing import Any

import torch

from . import launch
from .args import (
    UsageError,
    check_choices,
    check_device,
    check_int,
    check_number,
    check_optimizers,
    check_out,
    check_threads,
    guarded,
)
from .baselines import OptimizerUnavailable, default_lr, known_names, make_optimizer, parse_name
from .data import TOKENIZERS, load_text, make_token_data
from .model import PRESETS, build_model
from .plots import loss_curves, memory_bars
from .report import console_table, markdown_table, print_results, run_metadata, write_json
from .stats import spread, verdict
from .train import RunResult, TrainConfig, train

__all__ = ["add_arguments", "merge_results", "run", "summarize", "validate", "write_result"]

QUICK_OPTIMIZERS = ["adamw", "microadam", "adammini", "sinkgd", "swan"]
SWEEP_FACTORS = (0.25, 0.5, 1.0, 2.0, 4.0)
SWEEP_EXTENSIONS = 2  # extra lrs tried beyond the edge of the grid when the best lies there
# optimizers with a second lr (adamw_lr: embeddings, head, 1-D tensors), swept after the first with --sweep
TWO_LRS = ("sinkgd", "swan", "adamw-split")


def with_second_lr(name: str, adamw_lr: float) -> str:
    """``sinkgd`` -> ``sinkgd@adamw_lr=0.005``: the run's name says its second lr."""
    return f"{name}{',' if '@' in name else '@'}adamw_lr={adamw_lr:.4g}"


def split_second_lr(name: str) -> tuple[str, str | None]:
    """The inverse of :func:`with_second_lr`: ``sinkgd@adamw_lr=0.005`` -> (``sinkgd``, ``"0.005"``); a name
    without a second lr -> (name, None)."""
    match = re.search(r"[@,]adamw_lr=([^,]+)", name)
    if match is None:
        return name, None
    rest = name[:match.start()] + name[match.end():]
    if "@" not in rest and "," in rest:  # the second lr was the first option: the next one takes its "@"
        rest = rest.replace(",", "@", 1)
    return rest, match.group(1)


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--quick", action="store_true",
                        help="the demo: Shakespeare, preset 'tiny', 200 steps, adamw/microadam/adammini/"
                             "sinkgd/swan (minutes on 2 CPU cores)")
    parser.add_argument("--corpus", default=None,
                        help="comma-separated slimopt.bench.fetch corpora: shakespeare, moby-dick, sotu, news "
                             "(default: all four; --quick: shakespeare)")
    parser.add_argument("--text", default=None, metavar="PATH", help="train on this UTF-8 file instead")
    parser.add_argument("--tokenizer", default="byte", choices=TOKENIZERS, help="byte (256) or gpt2 (50257)")
    parser.add_argument("--preset", default=None, choices=list(PRESETS),
                        help="model preset (default cpu; --quick: tiny)")
    parser.add_argument("--optimizers", default=None,
                        help=f"comma-separated (default {','.join(QUICK_OPTIMIZERS)}); known: "
                             + ", ".join(known_names()))
    parser.add_argument("--lr", type=float, default=None, help="one peak lr for all (default: per optimizer)")
    parser.add_argument("--weight-decay", type=float, default=0.0)
    parser.add_argument("--steps", type=int, default=None, help="training steps (default 1000; --quick: 200)")
    parser.add_argument("--batch-size", type=int, default=16)
    parser.add_argument("--seq-len", type=int, default=128)
    parser.add_argument("--eval-every", type=int, default=None, help="steps between validations")
    parser.add_argument("--eval-batches", type=int, default=8)
    parser.add_argument("--seeds", default="1", help="N (seeds 0..N-1) or a comma list like 0,3,7")
    parser.add_argument("--sweep-factors", default=",".join(f"{f:g}" for f in SWEEP_FACTORS),
                        help="with --sweep: the multiples of each optimizer's default lr to try")
    parser.add_argument("--merge", default=None, metavar="DIR,DIR",
                        help="instead of training: combine the results.json of earlier runs with the same "
                             "settings (e.g. optimizers run in parallel processes) into --out")
    parser.add_argument("--sweep", action="store_true",
                        help="first a short lr sweep per optimizer (--sweep-factors x its default lr, a quarter "
                             "of the steps, seed 0; extended by x2 steps when the best is at an edge), then "
                             "the full runs at the best lr")
    parser.add_argument("--device", default=None, help="cpu or cuda (default: cuda when available)")
    parser.add_argument("--threads", type=int, default=None,
                        help="torch CPU threads (default: one per core; on a machine other jobs keep busy, 1)")
    parser.add_argument("--out", default=None, help="result folder (default runs/pretrain-<time>)")
    parser.add_argument("--no-progress", action="store_true", help="plain log lines instead of a progress bar")
    launch.add_arguments(parser)


# --------------------------------------------------------------------------------------------------
# progress: rich when present, plain prints otherwise


class _Progress:
    """One bar per training run (steps, elapsed, time remaining, losses) and, under rich, one for all the
    runs planned (``expect``), whose time remaining is the whole comparison's."""

    def __init__(self, plain: bool) -> None:
        self.rich = None
        self.overall = None
        self.started = time.perf_counter()
        self.total = self.done = 0
        if not plain:
            try:
                from rich.progress import (
                    BarColumn,
                    MofNCompleteColumn,
                    Progress,
                    TextColumn,
                    TimeElapsedColumn,
                    TimeRemainingColumn,
                )

                self.rich = Progress(TextColumn("{task.description:<26}"), BarColumn(bar_width=16),
                                     MofNCompleteColumn(), TimeElapsedColumn(), TextColumn("eta"),
                                     TimeRemainingColumn(), TextColumn("{task.fields[info]}"))
            except ImportError:
                pass

    def __enter__(self) -> _Progress:
        if self.rich:
            self.rich.__enter__()
        return self

    def __exit__(self, *exc: Any) -> None:
        if self.rich:
            self.rich.__exit__(*exc)

    def log(self, message: str) -> None:
        (self.rich.console.print if self.rich else print)(message)

    def expect(self, steps: int) -> None:
        """``steps`` more training steps are planned (the overall bar's total)."""
        self.total += steps
        if self.rich:
            if self.overall is None:
                self.overall = self.rich.add_task("all runs", total=self.total, info="")
            self.rich.update(self.overall, total=self.total)

    def settle(self, planned: int, done: int) -> None:
        """A run stopped after ``done`` of its ``planned`` steps (diverged, interrupted)."""
        self.expect(done - planned)

    def _eta(self) -> str:
        if not self.done or self.total <= self.done:
            return ""
        left = (time.perf_counter() - self.started) / self.done * (self.total - self.done)
        return f", all runs: eta {int(left // 60)}:{int(left % 60):02d}"

    def tracker(self, label: str, total: int):
        task = self.rich.add_task(label, total=total, info="") if self.rich else None
        last_val: list[float | None] = [None]
        last_step = [0]

        def update(result: RunResult, val: float | None) -> None:
            if val is not None:
                last_val[0] = val
            self.done += result.steps_done - last_step[0]
            if self.rich and self.overall is not None:
                self.rich.advance(self.overall, result.steps_done - last_step[0])
            last_step[0] = result.steps_done
            parts = [f"train {result.train_curve[-1][2]:.3f}"] if result.train_curve else []
            parts += [f"val {last_val[0]:.3f}"] if last_val[0] is not None else []
            info = "  ".join(parts)
            if self.rich:
                self.rich.update(task, completed=result.steps_done, info=info)
            elif val is not None:
                print(f"  {label} step {result.steps_done}/{total}: {info}{self._eta()}", flush=True)

        return update


# --------------------------------------------------------------------------------------------------
# one run, a sweep, the whole comparison


def _one_run(name: str, lr: float, seed: int, data, config: TrainConfig, preset: str, device: torch.device,
             weight_decay: float, progress: _Progress, label: str) -> RunResult:
    torch.manual_seed(seed)  # same initial weights for every optimizer with this seed
    model = launch.distribute(build_model(preset, vocab_size=data.vocab_size).to(device))  # --nproc: shard first
    optimizer = make_optimizer(launch.unwrap(model), name, lr=lr, weight_decay=weight_decay)
    launch.note_optimizer(name, optimizer)
    seeded = TrainConfig(**{**config.__dict__, "seed": seed})
    result = train(model, optimizer, data, seeded, name=name, lr=lr,
                   on_progress=progress.tracker(label, config.steps))
    progress.settle(config.steps, result.steps_done)
    del model, optimizer
    return result


def second_lr_default(name: str, lr: float) -> float:
    """The default ``adamw_lr`` of an optimizer with two lrs: the hybrids give their AdamW part their own lr;
    adamw-split gives it what the hybrids give it by default."""
    base, _ = parse_name(name)
    return default_lr("sinkgd") if base == "adamw-split" else lr


def _sweep(name: str, data, config: TrainConfig, preset: str, device: torch.device, weight_decay: float,
           progress: _Progress, factors: tuple[float, ...] = SWEEP_FACTORS, *, fixed_lr: float | None = None
           ) -> tuple[float, list[dict[str, Any]], bool]:
    """Short runs (a quarter of the steps, seed 0) at ``factors`` x the default lr; the best lr wins. If
    the best is the smallest or largest lr tried, the grid grows by a factor of 2 that way (at most
    SWEEP_EXTENSIONS times), so that the chosen lr is not just the edge of a badly placed grid.

    With ``fixed_lr`` the second lr is swept instead (``adamw_lr``: embeddings, head and 1-D tensors of
    SinkGD, SWAN and adamw-split, :data:`TWO_LRS`) around its default, the main lr fixed at ``fixed_lr``:
    every method gets as many tuned lrs as it has."""
    center = default_lr(name) if fixed_lr is None else second_lr_default(name, fixed_lr)
    short_steps = min(config.steps, max(20, config.steps // 4))
    short = TrainConfig(**{**config.__dict__, "steps": short_steps, "eval_every": short_steps})
    trials: list[dict[str, Any]] = []

    def loss_of(trial: dict[str, Any]) -> float:
        return math.inf if trial["final_val_loss"] is None else trial["final_val_loss"]

    def try_factor(factor: float) -> bool:
        lr = center * factor
        if fixed_lr is None:
            result = _one_run(name, lr, 0, data, short, preset, device, weight_decay, progress,
                              f"sweep {name} lr {lr:.3g}")
        else:
            result = _one_run(with_second_lr(name, lr), fixed_lr, 0, data, short, preset, device, weight_decay,
                              progress, f"sweep {name} adamw_lr {lr:.3g}")
        loss = result.final_val_loss if not result.diverged and result.final_val_loss is not None else math.inf
        trials.append({"lr": lr, "factor": factor, "final_val_loss": loss if math.isfinite(loss) else None,
                       "diverged": result.diverged, "steps": result.steps_done})
        return result.interrupted

    for factor in sorted(factors):
        if try_factor(factor):
            return trials[-1]["lr"], trials, True
    for _ in range(SWEEP_EXTENSIONS if len(factors) > 1 else 0):
        best = min(trials, key=loss_of)
        tried = [t["factor"] for t in trials]
        if not math.isfinite(loss_of(best)):
            break
        if best["factor"] == min(tried):
            extra = min(tried) / 2
        elif best["factor"] == max(tried):
            extra = max(tried) * 2
        else:
            break
        progress.log(f"{name}: best lr at the edge of the sweep; also trying x{extra:g}")
        progress.expect(short_steps)
        if try_factor(extra):
            return trials[-1]["lr"], trials, True
    trials.sort(key=lambda t: t["lr"])
    return min(trials, key=loss_of)["lr"], trials, False


def _warm_up(preset: str, data, config: TrainConfig, device: torch.device) -> int:
    """One throw-away forward/backward, so one-time allocations (thread pools, autograd and allocator
    caches) are not charged to the first optimizer's peak memory. Returns the parameter count."""
    model = build_model(preset, vocab_size=data.vocab_size).to(device)
    inputs, targets = data.train_batch(config.batch_size, config.seq_len, torch.Generator().manual_seed(0))
    with torch.autocast("cuda", dtype=torch.bfloat16, enabled=device.type == "cuda"):
        logits = model(inputs.to(device))
    torch.nn.functional.cross_entropy(logits.float().flatten(0, 1), targets.to(device).flatten()).backward()
    return sum(p.numel() for p in model.parameters())


def _seeds(text: str) -> list[int]:
    """``"3"`` -> seeds 0, 1, 2; ``"0,3,7"`` -> those seeds."""
    try:
        seeds = [int(s) for s in text.split(",")] if "," in text else list(range(int(text)))
    except ValueError:
        raise UsageError("--seeds", text, "expected a count N (seeds 0..N-1) or a comma list like 0,3,7") from None
    if not seeds or any(s < 0 for s in seeds) or len(set(seeds)) != len(seeds):
        raise UsageError("--seeds", text, "expected a count N >= 1 or distinct seeds >= 0")
    return seeds


def summarize(runs: list[dict[str, Any]], reference: str = "adamw") -> list[dict[str, Any]]:
    """One row per optimizer: means over seeds, and tokens to reach the reference's final val loss."""
    by_name: dict[str, list[dict[str, Any]]] = {}
    for r in runs:
        by_name.setdefault(r["optimizer"], []).append(r)
    ref_runs = by_name.get(reference) or next(iter(by_name.values()), [])
    ref_losses = [r["final_val_loss"] for r in ref_runs if r["final_val_loss"] is not None]
    target = statistics.mean(ref_losses) if ref_losses else None
    ref_step = [r["optimizer_step_median_s"] for r in ref_runs if r["optimizer_step_median_s"]]
    ref_step_s = statistics.median(ref_step) if ref_step else None
    # the baseline that shares the hybrids' advantage (its own lr for embeddings, head, 1-D tensors)
    # final losses of the runs that finished without diverging, per optimizer
    finished = {name: [r["final_val_loss"] for r in group if r["final_val_loss"] is not None and not r["diverged"]]
                for name, group in by_name.items()}
    split_name = next((n for n in by_name if parse_name(n)[0] == "adamw-split" and n != reference), None)
    split_losses = finished.get(split_name, [])

    def mean(values):
        values = [v for v in values if v is not None]
        return statistics.mean(values) if values else None

    rows = []
    for name, group in by_name.items():
        losses = finished[name]
        reach = []
        for r in group:
            hit = next((tokens for _, tokens, _, loss in r["val_curve"] if target is not None and loss <= target),
                       None)
            reach.append(hit)
        step_s = mean(r["optimizer_step_median_s"] for r in group)
        rows.append({
            "optimizer": name,
            "lr": group[0]["lr"],
            "seeds": [r["seed"] for r in group],
            "final_val_loss": statistics.mean(losses) if losses else None,
            "final_val_loss_std": statistics.stdev(losses) if len(losses) > 1 else None,
            "final_val_ppl": math.exp(statistics.mean(losses)) if losses else None,
            # mean over the seeds that got there; "reached" says how many did
            "tokens_to_reference_loss": mean(reach),
            "reached_reference": f"{sum(t is not None for t in reach)}/{len(reach)}",
            "reference_loss": target,
            "state_bytes": mean(r["state_bytes"] for r in group),
            "state_bytes_per_param": mean(r["state_bytes"] / r["n_params"] for r in group
                                          if r["state_bytes"] is not None),
            "peak_memory_bytes": mean(r["peak_memory_bytes"] for r in group),
            "optimizer_step_median_s": step_s,
            "optimizer_step_ratio": step_s / ref_step_s if step_s and ref_step_s else None,
            "val_loss_ratio": statistics.mean(losses) / target if losses and target else None,
            # a win or a loss only beyond the seeds' spread (bench/stats.verdict)
            "verdict": "reference" if name == reference else verdict(spread(losses), spread(ref_losses)),
            "split_reference": split_name,
            "val_loss_ratio_vs_split": (statistics.mean(losses) / statistics.mean(split_losses)
                                        if losses and split_losses else None),
            "verdict_vs_split": (None if split_name is None else "reference" if name == split_name
                                 else verdict(spread(losses), spread(split_losses))),
            "tokens_per_s": mean(r["tokens_per_s"] for r in group),
            "diverged": any(r["diverged"] for r in group),
            "interrupted": any(r["interrupted"] for r in group),
        })
    return rows


def _mib(n_bytes: float | None) -> float | None:
    return None if n_bytes is None else n_bytes / 2**20


def format_reach(row: dict[str, Any], *, short: bool = False) -> str | None:
    """A summary row's tokens to the reference loss, with how many seeds got there if not all; None if
    none did. ``short``: millions and "(2/3)", for a terminal's columns."""
    tokens = row["tokens_to_reference_loss"]
    if tokens is None:
        return None
    reached, total = row["reached_reference"].split("/")
    if short:
        return f"{tokens / 1e6:.2f}M" + ("" if reached == total else f" ({reached}/{total})")
    return f"{tokens:,.0f}" + ("" if reached == total else f" ({reached}/{total} seeds)")


def _report(result: dict[str, Any]) -> str:
    s, meta = result["settings"], result["meta"]
    machine = meta["machine"]
    where = machine["gpu"] or f"{machine['cpu']} ({machine['torch_threads']} threads)"
    split = any(r.get("split_reference") for r in result["summary"])
    lines = [
        f"# Pre-training: {s['preset']} on {s['data']} ({s['tokenizer']} tokens)",
        "",
        f"{s['n_params'] / 1e6:.2f}M parameters; {s['steps']} steps x {s['batch_size']} x {s['seq_len']} tokens; "
        f"warm-up {s['warmup_fraction']:.0%} + cosine to {s['min_lr_fraction']:.0%}; clip {s['grad_clip']}; "
        f"train {s['train_tokens']:,} / val {s['val_tokens']:,} tokens; seeds {s['seeds']}.",
        f"{where}; torch {meta['versions']['torch']}; commit {meta['git_commit']}; `{meta['command']}`",
        "",
        f"Reference: **{result['reference']}** (its mean final validation loss is the target for "
        "\"tokens to reference loss\"). \"vs ref.\": a win or a loss only when the mean final losses differ by "
        "more than the seeds' spread, sqrt(s² + s_ref²); with one seed no call is made."
        + (" \"vs split\": the same against adamw-split, the AdamW with the hybrids' own lr for embeddings, "
           "head and 1-D tensors." if split else ""),
        "",
    ]
    rows = []
    for r in sorted(result["summary"], key=lambda r: math.inf if r["final_val_loss"] is None
                    else r["final_val_loss"]):
        loss = None if r["final_val_loss"] is None else f"{r['final_val_loss']:.4f}" + (
            f" ± {r['final_val_loss_std']:.4f}" if r["final_val_loss_std"] is not None else "")
        flags = ("diverged " if r["diverged"] else "") + ("interrupted" if r["interrupted"] else "")
        rows.append([r["optimizer"] + (f" ({flags.strip()})" if flags else ""), f"{r['lr']:.3g}", loss,
                     r.get("val_loss_ratio"), r.get("verdict"),
                     *([r.get("val_loss_ratio_vs_split"), r.get("verdict_vs_split")] if split else []),
                     r["final_val_ppl"], format_reach(r),
                     _mib(r["state_bytes"]), r["state_bytes_per_param"], _mib(r["peak_memory_bytes"]),
                     r["optimizer_step_median_s"] and r["optimizer_step_median_s"] * 1e3,
                     r["optimizer_step_ratio"], r["tokens_per_s"] and round(r["tokens_per_s"])])
    lines.append(markdown_table(
        ["optimizer", "lr", "final val loss", "loss x ref.", "vs ref.",
         *(["loss x split", "vs split"] if split else []), "val ppl", "tokens to ref. loss",
         "state MiB",
         "state B/param", f"peak MiB ({result['memory_kind']})", "opt. step ms", "step x ref.", "tokens/s"], rows))
    if result["skipped"]:
        lines += ["", "Skipped: " + "; ".join(f"{n}: {why}" for n, why in result["skipped"].items())]
    if result["sweeps"]:
        lines += ["", "## Learning-rate sweep", ""]
        sweep_rows = [[name, f"{t['lr']:.3g}", t["final_val_loss"], "yes" if t["diverged"] else ""]
                      for name, trials in result["sweeps"].items() for t in trials]
        lines.append(markdown_table(["optimizer", "lr", "val loss (short run)", "diverged"], sweep_rows))
    if result["plots"]:
        lines += ["", "## Plots", ""] + [f"![{Path(p).stem}]({Path(p).name})" for p in result["plots"]]
    if result["interrupted"]:
        lines += ["", "**Interrupted** (Ctrl-C): only the runs above finished."]
    return "\n".join(lines) + "\n"


def write_result(result: dict[str, Any], out: Path) -> None:
    """results.json, report.md and the plots of one comparison into ``out``."""
    s = result["settings"]
    runs = result["runs"]
    title = f"{s['preset']} on {s['data']}, {s['steps']} steps"
    result["plots"] = []
    for path in (loss_curves(runs, out / "loss_vs_step.png", x="step", title=title),
                 loss_curves(runs, out / "loss_vs_time.png", x="time", title=title),
                 memory_bars([(r["optimizer"], r["state_bytes"] and r["state_bytes"] / 2**20,
                               r["peak_memory_bytes"] and r["peak_memory_bytes"] / 2**20)
                              for r in result["summary"]], out / "memory.png",
                             peak_label=f"peak ({result['memory_kind']})", title=title)):
        if path is not None:
            result["plots"].append(str(path))
    write_json(out / "results.json", result)
    (out / "report.md").write_text(_report(result))
    print_results(_console_summary(result), out,
                  ["report.md", "results.json", *(Path(p).name for p in result["plots"])])


def _console_summary(result: dict[str, Any]) -> str:
    """The end-of-run table for a terminal: the columns a reader compares (report.md has them all)."""
    s = result["settings"]
    def fixed(value: float | None, digits: int, scale: float = 1.0) -> str | None:
        return None if value is None else f"{value * scale:.{digits}f}"

    rows = []
    for r in sorted(result["summary"], key=lambda r: math.inf if r["final_val_loss"] is None
                    else r["final_val_loss"]):
        flag = " (diverged)" if r["diverged"] else " (interrupted)" if r["interrupted"] else ""
        # a second lr goes beside the first, so that names stay short enough not to fold
        name, second = split_second_lr(r["optimizer"])
        lr = f"{r['lr']:.3g}" + (f"/{second}" if second else "")
        rows.append([name + flag, lr, fixed(r["final_val_loss"], 4),
                     fixed(r.get("val_loss_ratio"), 3), format_reach(r, short=True),
                     fixed(r["state_bytes_per_param"], 2),
                     fixed(r["peak_memory_bytes"], 1, 2**-20), fixed(r["optimizer_step_median_s"] or None, 1, 1e3)])
    title = (f"{s['preset']} on {s['data']}, {s['steps']} steps, seeds {s['seeds']}; reference "
             f"{result['reference']}")
    if any("/" in row[1] for row in rows):
        title += "; lr/adamw_lr where there are two"
    return console_table(title, ["optimizer", "lr", "val loss", "x ref", "tokens to ref", "state B/p",
                                 "peak MiB", "step ms"], rows)


# settings that must agree for runs to be compared in one table
_MERGE_KEYS = ("preset", "n_params", "data", "tokenizer", "train_tokens", "val_tokens", "weight_decay", "steps",
               "batch_size", "seq_len", "eval_every", "eval_batches")


def merge_results(folders: list[Path], out: Path) -> dict[str, Any]:
    """One comparison from several result folders of the same settings (optimizers run in parallel
    processes or on several machines). Step-time ratios then compare numbers from different processes."""
    parts = []
    for folder in folders:
        path = Path(folder) / "results.json"
        if not path.is_file():
            raise ValueError(f"--merge: {folder} has no results.json")
        parts.append(json.loads(path.read_text()))
    first = parts[0]
    for folder, part in zip(folders[1:], parts[1:]):
        differ = [k for k in _MERGE_KEYS if part["settings"].get(k) != first["settings"].get(k)]
        if differ:
            raise ValueError(f"--merge: {folder} differs from {folders[0]} in {', '.join(differ)}")
    runs = [r for part in parts for r in part["runs"]]
    names = [r["optimizer"] for r in runs]
    reference = "adamw" if "adamw" in names else (names[0] if names else None)
    result = {
        **first,
        "meta": run_metadata() | {"merged_from": [{"folder": str(f), "meta": p["meta"]}
                                                  for f, p in zip(folders, parts)]},
        "settings": first["settings"] | {"seeds": sorted({s for p in parts for s in p["settings"]["seeds"]})},
        "reference": reference,
        "summary": summarize(runs, reference) if runs else [],
        "runs": runs,
        "skipped": {k: v for p in parts for k, v in p["skipped"].items()},
        "sweeps": {k: v for p in parts for k, v in p["sweeps"].items()},
        "interrupted": any(p["interrupted"] for p in parts),
    }
    out.mkdir(parents=True, exist_ok=True)
    write_result(result, out)
    return result


def _parse_factors(text: str) -> tuple[float, ...]:
    try:
        factors = tuple(float(f) for f in text.split(","))
    except ValueError:
        raise UsageError("--sweep-factors", text, "must be comma-separated numbers") from None
    if not factors or any(not math.isfinite(f) or f <= 0 for f in factors):
        raise UsageError("--sweep-factors", text, "must be positive")
    return factors


def validate(args: argparse.Namespace) -> None:
    """Every argument, before any data is loaded or folder made; a bad one raises :class:`UsageError`."""
    check_out("--out", args.out)
    if args.merge:
        folders = [f for f in args.merge.split(",") if f]
        if len(folders) < 1:
            raise UsageError("--merge", args.merge, "expected comma-separated result folders")
        for folder in folders:
            if not (Path(folder) / "results.json").is_file():
                raise UsageError("--merge", args.merge, f"{folder} has no results.json")
        return
    if args.optimizers is not None:
        check_optimizers("--optimizers", args.optimizers)
    if args.corpus is not None:
        from .fetch import TEXT_CORPORA

        check_choices("--corpus", args.corpus, TEXT_CORPORA, "corpus")
    if args.text is not None and not Path(args.text).is_file():
        raise UsageError("--text", args.text, "no such file")
    check_number("--lr", args.lr, what="the peak learning rate")
    check_number("--weight-decay", args.weight_decay, strict=False)
    check_int("--steps", args.steps)
    check_int("--batch-size", args.batch_size)
    check_int("--seq-len", args.seq_len, minimum=2)
    check_int("--eval-every", args.eval_every)
    check_int("--eval-batches", args.eval_batches)
    _seeds(args.seeds)
    _parse_factors(args.sweep_factors)
    if args.sweep and args.lr is not None:
        raise UsageError("--lr", args.lr, "--sweep chooses each optimizer's lr; drop --lr or --sweep")
    check_device("--device", args.device)
    check_threads(args.threads)
    check_int("--nproc", getattr(args, "nproc", 1))
    nproc = getattr(args, "nproc", 1)
    if nproc > 1 and args.batch_size % nproc:
        raise UsageError("--batch-size", args.batch_size, f"is the global batch and must be divisible by "
                                                          f"--nproc {nproc}")


@guarded("slimopt bench pretrain")
def run(args: argparse.Namespace) -> int:
    if not launch._in_worker():  # the launcher checked before starting the workers
        validate(args)
    code = launch.start(args)  # --nproc > 1: re-launch through torchrun, or join its process group
    if code is not None:
        return code
    try:
        return _run(args)
    finally:
        launch.finish()


def _run(args: argparse.Namespace) -> int:
    if args.merge:
        out = Path(args.out) if args.out else Path("runs") / time.strftime("pretrain-merged-%Y%m%d-%H%M%S")
        try:
            result = merge_results([Path(f) for f in args.merge.split(",") if f], out)
        except ValueError as exc:
            raise UsageError("--merge", args.merge, str(exc).removeprefix("--merge: ")) from None
        return 130 if result["interrupted"] else 0
    sweep_factors = _parse_factors(args.sweep_factors)
    if args.threads:
        torch.set_num_threads(args.threads)
    quick = args.quick
    if args.corpus:
        corpora = args.corpus.split(",")
    else:
        corpora = ["shakespeare"] if quick else ["shakespeare", "moby-dick", "sotu", "news"]
    preset = args.preset or ("tiny" if quick else "cpu")
    steps = args.steps or (200 if quick else 1000)
    names = args.optimizers.split(",") if args.optimizers else list(QUICK_OPTIMIZERS)
    device = torch.device(args.device or ("cuda" if torch.cuda.is_available() else "cpu"))
    config = TrainConfig(steps=steps, batch_size=args.batch_size, seq_len=args.seq_len,
                         eval_every=args.eval_every or max(1, steps // 6), eval_batches=args.eval_batches)
    seeds = _seeds(args.seeds)
    out = Path(args.out) if args.out else Path("runs") / time.strftime("pretrain-%Y%m%d-%H%M%S")

    text, description = load_text(corpora, args.text)
    try:
        tokens = make_token_data(text, args.tokenizer, description=description)
    except ValueError as exc:  # a text too short for a train/validation split
        raise UsageError("--text" if args.text else "--corpus", args.text or ",".join(corpora), str(exc)) from None
    if len(tokens.val) < args.seq_len + 1:
        raise UsageError("--seq-len", args.seq_len, f"longer than the validation split of {description} "
                                                    f"({len(tokens.val)} tokens)")
    data = launch.rank_slices(tokens)
    n_params = _warm_up(preset, data, config, device)
    print(textwrap.fill(f"pretrain: {preset} ({n_params / 1e6:.2f}M params) on {description}: {len(data.train):,} "
                        f"train / {len(data.val):,} val {args.tokenizer} tokens; {steps} steps; {device}, "
                        f"{torch.get_num_threads()} threads; optimizers {', '.join(names)}; seeds {seeds}",
                        width=100, subsequent_indent="  "))

    runs: list[dict[str, Any]] = []
    skipped: dict[str, str] = {}
    sweeps: dict[str, list[dict[str, Any]]] = {}
    interrupted = False
    with _Progress(args.no_progress) as progress:
        short_steps = min(config.steps, max(20, config.steps // 4))  # as _sweep
        planned = len(seeds) * steps + (len(sweep_factors) * short_steps if args.sweep else 0)
        second = len(sweep_factors) * short_steps if args.sweep and args.lr is None else 0
        progress.expect(planned * len(names) + second * sum(parse_name(n)[0] in TWO_LRS for n in names))
        for name in names:
            try:
                lr = args.lr or default_lr(name)
                run_name = name
                if args.sweep and args.lr is None:
                    lr, sweeps[name], interrupted = _sweep(name, data, config, preset, device,
                                                           args.weight_decay, progress, sweep_factors)
                    progress.log(f"{name}: sweep picked lr {lr:.3g}")
                    if parse_name(name)[0] in TWO_LRS and not interrupted:
                        second, sweeps[f"{name} adamw_lr"], interrupted = _sweep(
                            name, data, config, preset, device, args.weight_decay, progress, sweep_factors,
                            fixed_lr=lr)
                        run_name = with_second_lr(name, second)
                        progress.log(f"{name}: sweep picked adamw_lr {second:.3g}")
                for seed in seeds if not interrupted else []:
                    result = _one_run(run_name, lr, seed, data, config, preset, device, args.weight_decay, progress,
                                      f"{run_name} (lr {lr:.3g}, seed {seed})")
                    runs.append(result.to_dict())
                    if result.interrupted:
                        interrupted = True
                        break
            except OptimizerUnavailable as exc:
                progress.log(f"skipping {name}: {exc}")
                progress.settle(planned, 0)
                skipped[name] = str(exc)
            except KeyboardInterrupt:  # between training steps (building a model, evaluating at step 0)
                interrupted = True
            if interrupted:
                progress.log("interrupted: writing the runs that finished")
                break

    reference = "adamw" if any(r["optimizer"] == "adamw" for r in runs) else (runs[0]["optimizer"] if runs else None)
    result: dict[str, Any] = {
        "meta": run_metadata(),
        "settings": {"preset": preset, "model_config": PRESETS[preset].to_dict() | {"vocab_size": data.vocab_size},
                     "n_params": n_params, "data": description, "tokenizer": args.tokenizer,
                     "train_tokens": len(data.train), "val_tokens": len(data.val), "seeds": seeds,
                     "device": str(device), "weight_decay": args.weight_decay, "sweep": args.sweep,
                     **config.__dict__},
        "reference": reference,
        "memory_kind": runs[0]["memory_kind"] if runs else "",
        "summary": summarize(runs, reference) if runs else [],
        "runs": runs,
        "skipped": skipped,
        "sweeps": sweeps,
        "interrupted": interrupted,
        "plots": [],
        "distributed": launch.describe(),
    }
    if not launch.is_main():
        return 130 if interrupted else 0
    write_result(result, out)
    return 130 if interrupted else 0


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="slimopt bench pretrain", description=__doc__.splitlines()[0])
    add_arguments(parser)
    return run(parser.parse_args(sys.argv[1:] if argv is None else argv))
