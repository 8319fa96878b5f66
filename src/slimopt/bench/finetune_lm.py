"""``slimopt bench finetune-lm``: the regime the papers claim, fine-tuning a pre-trained model, on CPU.

1. **Base model**: the preset pre-trained with AdamW on ``--base-corpora`` for ``--base-steps``, once, then
   cached (``$SLIMOPT_CACHE/finetune-lm/``) with the sha256 of the checkpoint recorded beside it and in
   every result (a second run reuses it after checking the sha256).
2. **Fine-tuning** on a held-out corpus (``--corpus``, none of whose text the base saw) for ``--steps`` with
   each optimizer: first a short lr sweep from the base (``--sweep-factors`` x the optimizer's default lr,
   ``--sweep-steps`` each, seed 0), then ``--seeds`` runs at the chosen lr.
3. **Report**: validation loss of each optimizer as a ratio to AdamW's at ``--checkpoints`` steps (mean ±
   std over seeds), and whether each final difference is a win or a loss beyond the seeds' spread.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import math
import statistics
import sys
import time
from pathlib import Path
from typing import Any

import torch

from .baselines import OptimizerUnavailable, default_lr, is_known, known_names, make_optimizer
from .data import load_text, make_token_data
from .model import PRESETS, build_model
from .report import markdown_table, run_metadata, write_json
from .stats import spread, verdict
from .train import TrainConfig, train

__all__ = ["add_arguments", "base_checkpoint", "run"]

DEFAULT_OPTIMIZERS = "adamw,microadam,adammini,sinkgd,swan"


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


def _fine_tune(name: str, lr: float, seed: int, base: dict[str, torch.Tensor], preset: str, data,
               config: TrainConfig) -> dict[str, Any]:
    torch.manual_seed(seed)
    model = build_model(preset, vocab_size=data.vocab_size)
    model.load_state_dict(base)
    optimizer = make_optimizer(model, name, lr=lr)
    result = train(model, optimizer, data, TrainConfig(**{**config.__dict__, "seed": seed}), name=name, lr=lr)
    return result.to_dict()


def _loss_at(run: dict[str, Any], step: int) -> float | None:
    for s, _, _, loss in run["val_curve"]:
        if s == step:
            return loss
    return None


def summarize(runs: list[dict[str, Any]], checkpoints: list[int], reference: str = "adamw") -> list[dict[str, Any]]:
    """Per optimizer and checkpoint: mean ± std of the val loss ratio to the reference's mean; final verdict."""
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
    lines = [f"# Fine-tuning a pre-trained {s['preset']} on {s['corpus']}", "",
             f"Base: {s['preset']} pre-trained with AdamW on {s['base_corpora']} for {s['base_steps']} steps "
             f"(sha256 `{s['base_sha256']}`). Fine-tuning: {s['steps']} steps x {s['batch_size']} x {s['seq_len']} "
             f"byte tokens, warm-up {s['warmup_fraction']:.0%} + cosine, seeds {s['seeds']}; lr per optimizer "
             f"from a {s['sweep_steps']}-step sweep from the base (seed 0; the grids are in the sweep table).",
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
    better = better_lrs(result)
    if better:
        lines += ["", "**Not at the best swept lr**: " + "; ".join(
            f"{n} ran at {ran:.3g}, its sweep's best is {best:.3g}" for n, (ran, best) in better.items())]
    if result["skipped"]:
        lines += ["", "Skipped: " + "; ".join(f"{n}: {why}" for n, why in result["skipped"].items())]
    return "\n".join(lines) + "\n"


def _ratio_plot(result: dict[str, Any], path: Path) -> Path | None:
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return None
    runs = result["runs"]
    reference = [r for r in runs if r["optimizer"] == "adamw"]
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
    ax.set_title(f"fine-tuning {result['settings']['preset']} on {result['settings']['corpus']}")
    ax.legend(loc="upper left", bbox_to_anchor=(1.01, 1.0))
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return path


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--preset", default="tiny", choices=list(PRESETS), help="model preset (default tiny)")
    parser.add_argument("--base-corpora", default="shakespeare,moby-dick,news",
                        help="what the base model is pre-trained on (comma list of `slimopt data` corpora)")
    parser.add_argument("--base-steps", type=int, default=1500, help="AdamW pre-training steps of the base")
    parser.add_argument("--base-lr", type=float, default=2.5e-3, help="AdamW lr of the base pre-training")
    parser.add_argument("--corpus", default="sotu", help="the held-out fine-tuning corpus (default sotu)")
    parser.add_argument("--optimizers", default=DEFAULT_OPTIMIZERS)
    parser.add_argument("--steps", type=int, default=2000, help="fine-tuning steps (default 2000)")
    parser.add_argument("--batch-size", type=int, default=8)
    parser.add_argument("--seq-len", type=int, default=64)
    parser.add_argument("--eval-every", type=int, default=125)
    parser.add_argument("--eval-batches", type=int, default=8)
    parser.add_argument("--checkpoints", default="250,500,1000,2000", help="steps to report (multiples of "
                        "--eval-every, the last one --steps)")
    parser.add_argument("--seeds", type=int, default=3,
                        help="runs per optimizer at the swept lr (0: only the sweep, e.g. more lrs to --merge)")
    parser.add_argument("--sweep-factors", default="0.25,1,4", help="x each optimizer's default lr")
    parser.add_argument("--sweep-steps", type=int, default=500)
    parser.add_argument("--threads", type=int, default=None)
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
    if args.seeds < 0:
        raise ValueError(f"--seeds {args.seeds}: must be positive (or 0: sweep only, a part to --merge)")
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
                         f"(choose from {', '.join(known_names())}; NAME@key=value,... passes options)")
    if "adamw" not in names and not args.no_reference_ok and args.seeds:
        raise ValueError(f"--optimizers {args.optimizers!r}: must include adamw, the reference (or pass "
                         "--no-reference-ok for a part to --merge with one that has it)")
    return checkpoints, factors, names


# settings that must agree for runs to be compared in one table
_MERGE_KEYS = ("preset", "base_sha256", "corpus", "steps", "batch_size", "seq_len", "eval_every", "eval_batches",
               "checkpoints", "sweep_steps")  # sweep grids may differ per part: each optimizer has its own


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


def merge(folders: list[Path], out: Path) -> dict[str, Any]:
    parts = []
    for folder in folders:
        path = folder / "results.json"
        if not path.is_file():
            raise ValueError(f"--merge: {folder} has no results.json")
        parts.append(json.loads(path.read_text()))
    first = parts[0]["settings"]
    for folder, part in zip(folders[1:], parts[1:]):
        differ = [k for k in _MERGE_KEYS if part["settings"].get(k) != first.get(k)]
        if differ:
            raise ValueError(f"--merge: {folder} differs from {folders[0]} in {', '.join(differ)}")
    runs = [r for p in parts for r in p["runs"]]
    seeds = sorted({r["seed"] for r in runs})  # a sweep-only part (--seeds 0) may come first
    result = {"meta": run_metadata() | {"merged_from": [str(f) for f in folders]}, "settings": first | {"seeds": seeds},
              "summary": summarize(runs, first["checkpoints"]), "runs": runs,
              "sweeps": _merged_sweeps(parts),
              "skipped": {k: v for p in parts for k, v in p["skipped"].items()}}
    _write(result, out)
    return result


def _write(result: dict[str, Any], out: Path) -> None:
    write_json(out / "results.json", result)
    plot = _ratio_plot(result, out / "loss_ratio_vs_step.png")
    report = _report(result) + (f"\n![loss ratio]({plot.name})\n" if plot else "")
    (out / "report.md").write_text(report)
    print(report)
    print(f"wrote {out.resolve()}")


def run(args: argparse.Namespace) -> int:
    if args.merge:
        out = Path(args.out) if args.out else Path("runs") / time.strftime("finetune-lm-merged-%Y%m%d-%H%M%S")
        try:
            merge([Path(f) for f in args.merge.split(",") if f], out)
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
    base_corpora = args.base_corpora.split(",")
    if args.corpus in base_corpora:
        print(f"slimopt bench finetune-lm: --corpus {args.corpus!r} is among --base-corpora {args.base_corpora!r}: "
              "the fine-tuning corpus must be held out", file=sys.stderr)
        return 2
    config = TrainConfig(steps=args.steps, batch_size=args.batch_size, seq_len=args.seq_len,
                         eval_every=args.eval_every, eval_batches=args.eval_batches)
    base_path, base_sha = base_checkpoint(args.preset, base_corpora, args.base_steps, config, args.base_lr)
    base = torch.load(base_path, weights_only=True)
    text, description = load_text([args.corpus])
    data = make_token_data(text, description=description)
    out = Path(args.out) if args.out else Path("runs") / time.strftime("finetune-lm-%Y%m%d-%H%M%S")
    runs: list[dict[str, Any]] = []
    sweeps: dict[str, list[dict[str, Any]]] = {}
    skipped: dict[str, str] = {}
    sweep_config = TrainConfig(**{**config.__dict__, "steps": args.sweep_steps,
                                  "eval_every": args.sweep_steps})
    started = time.perf_counter()

    def snapshot() -> dict[str, Any]:
        return {
            "meta": run_metadata(),
            "settings": {"preset": args.preset, "base_corpora": args.base_corpora, "base_steps": args.base_steps,
                         "base_lr": args.base_lr, "base_checkpoint": base_path.name, "base_sha256": base_sha,
                         "corpus": description, "train_tokens": len(data.train), "val_tokens": len(data.val),
                         "seeds": list(range(args.seeds)), "checkpoints": checkpoints, "sweep_factors": factors,
                         "sweep_steps": args.sweep_steps, **config.__dict__},
            "summary": summarize(runs, checkpoints),
            "runs": runs,
            "sweeps": sweeps,
            "skipped": skipped,
        }

    for name in names:
        try:
            trials = []
            for factor in factors:
                lr = default_lr(name) * factor
                trial = _fine_tune(name, lr, 0, base, args.preset, data, sweep_config)
                loss = trial["final_val_loss"]
                trials.append({"lr": lr, "final_val_loss": loss if loss is not None and math.isfinite(loss) else None,
                               "diverged": trial["diverged"]})
                print(f"  sweep {name} lr {lr:.3g}: val {trial['final_val_loss']}", flush=True)
            sweeps[name] = trials
            lr = min(trials, key=lambda t: math.inf if t["final_val_loss"] is None else t["final_val_loss"])["lr"]
            for seed in range(args.seeds):
                runs.append(_fine_tune(name, lr, seed, base, args.preset, data, config))
                print(f"  {name} lr {lr:.3g} seed {seed}: val {runs[-1]['final_val_loss']:.4f} "
                      f"({time.perf_counter() - started:.0f} s so far)", flush=True)
                write_json(out / "results.json", snapshot())  # what finished survives a stop
        except OptimizerUnavailable as exc:
            skipped[name] = str(exc)
    result = snapshot()
    _write(result, out)
    return 0
