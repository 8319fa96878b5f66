"""The pre-training comparison's summary, report and merge (``slimopt bench pretrain``): one row per optimizer
(means over seeds, tokens to the reference's loss, verdicts beyond the seeds' spread), ``results.json``,
``report.md`` and the plots, and one comparison from the result folders of parallel runs."""

from __future__ import annotations

import math
import statistics
from pathlib import Path
from typing import Any

from .baselines import parse_name, split_second_lr
from .plots import loss_curves, memory_bars
from .report import console_table, markdown_table, print_results, read_results, run_metadata, write_json
from .stats import spread, verdict

__all__ = ["format_reach", "merge_results", "summarize", "write_result"]


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
    parts = read_results(folders, _MERGE_KEYS)
    first = parts[0]
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
