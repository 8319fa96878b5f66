"""``slimopt bench pretrain``: train the LLaMA-style decoder on real text with each optimizer and compare.

    data (slimopt.bench.fetch corpora or --text) -> tokens -> fixed train/val split
    -> model preset (same initial weights for every optimizer with the same seed)
    -> optimizer (ours and the baselines through one factory; optional short lr sweep)
    -> loop (warm-up + cosine, clipping, bf16 autocast on GPU)
    -> results.json, report.md, loss_vs_step.png, loss_vs_time.png, memory.png (comparison.py)

``--quick`` is the README demo: Shakespeare only, the tiny preset, 200 steps of 16 x 128 bytes, every
registered optimizer (adamw, microadam, adammini, sinkgd, swan). Measured: 2 min 25 s on two idle CPU
cores; 51 min on a 2-core machine other jobs kept busy, with torch's default of one thread per core (the
threads wait on each other); 9 min 26 s with ``--threads 1`` on such a machine. Ctrl-C stops the current
run and still writes what finished.
"""

from __future__ import annotations

import argparse
import math
import sys
import textwrap
import time
from pathlib import Path
from typing import Any

import torch

from slimopt.registry import default_names

from . import torchrun
from .args import (
    UsageError,
    check_choices,
    check_device,
    check_file,
    check_int,
    check_number,
    check_optimizers,
    check_out,
    check_threads,
    chosen_device,
    guarded,
)
from .baselines import (
    OptimizerUnavailable,
    default_lr,
    harness_names,
    make_optimizer,
    second_lr_default,
    takes_second_lr,
    with_second_lr,
)
from .comparison import merge_results, summarize, write_result
from .data import TOKENIZERS, load_text, make_token_data
from .model import PRESETS, build_model
from .progress import Progress
from .report import run_metadata
from .train import RunResult, TrainConfig, train

__all__ = ["add_arguments", "default_optimizers", "run", "validate"]

SWEEP_FACTORS = (0.25, 0.5, 1.0, 2.0, 4.0)
SWEEP_EXTENSIONS = 2  # extra lrs tried beyond the edge of the grid when the best lies there


def default_optimizers() -> list[str]:
    """Without ``--optimizers``: every registered optimizer (``--quick``'s demo too)."""
    return default_names()


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--quick", action="store_true",
                        help="the demo: Shakespeare, preset 'tiny', 200 steps, every registered optimizer "
                             "(minutes on 2 CPU cores)")
    parser.add_argument("--corpus", default=None,
                        help="comma-separated slimopt.bench.fetch corpora: shakespeare, moby-dick, sotu, news "
                             "(default: all four; --quick: shakespeare)")
    parser.add_argument("--text", default=None, metavar="PATH", help="train on this UTF-8 file instead")
    parser.add_argument("--tokenizer", default="byte", choices=TOKENIZERS, help="byte (256) or gpt2 (50257)")
    parser.add_argument("--preset", default=None, choices=list(PRESETS),
                        help="model preset (default cpu; --quick: tiny)")
    parser.add_argument("--optimizers", default=None,
                        help=f"comma-separated (default {','.join(default_optimizers())}); known: "
                             + ", ".join(harness_names()))
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
    torchrun.add_arguments(parser)


# --------------------------------------------------------------------------------------------------
# one run, a sweep, the whole comparison


def _one_run(name: str, lr: float, seed: int, data, config: TrainConfig, preset: str, device: torch.device,
             weight_decay: float, progress: Progress, label: str) -> RunResult:
    torch.manual_seed(seed)  # same initial weights for every optimizer with this seed
    model = torchrun.distribute(build_model(preset, vocab_size=data.vocab_size).to(device))  # --nproc: shard first
    optimizer = make_optimizer(torchrun.unwrap(model), name, lr=lr, weight_decay=weight_decay)
    torchrun.note_optimizer(name, optimizer)
    seeded = TrainConfig(**{**config.__dict__, "seed": seed})
    result = train(model, optimizer, data, seeded, name=name, lr=lr,
                   on_progress=progress.tracker(label, config.steps))
    progress.settle(config.steps, result.steps_done)
    del model, optimizer
    return result


def _sweep(name: str, data, config: TrainConfig, preset: str, device: torch.device, weight_decay: float,
           progress: Progress, factors: tuple[float, ...] = SWEEP_FACTORS, *, fixed_lr: float | None = None
           ) -> tuple[float, list[dict[str, Any]], bool]:
    """Short runs (a quarter of the steps, seed 0) at ``factors`` x the default lr; the best lr wins. If
    the best is the smallest or largest lr tried, the grid grows by a factor of 2 that way (at most
    SWEEP_EXTENSIONS times), so that the chosen lr is not just the edge of a badly placed grid.

    With ``fixed_lr`` the second lr is swept instead (``adamw_lr``: embeddings, head and 1-D tensors of
    SinkGD, SWAN and adamw-split, those ``baselines.takes_second_lr`` says take one) around its default, the
    main lr fixed at ``fixed_lr``: every method gets as many tuned lrs as it has."""
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
    check_file("--text", args.text)
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
    if not torchrun._in_worker():  # the launcher checked before starting the workers
        validate(args)
    code = torchrun.start(args)  # --nproc > 1: re-launch through torchrun, or join its process group
    if code is not None:
        return code
    try:
        return _run(args)
    finally:
        torchrun.finish()


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
    names = args.optimizers.split(",") if args.optimizers else default_optimizers()
    device = chosen_device(args.device)
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
    data = torchrun.rank_slices(tokens)
    n_params = _warm_up(preset, data, config, device)
    print(textwrap.fill(f"pretrain: {preset} ({n_params / 1e6:.2f}M params) on {description}: {len(data.train):,} "
                        f"train / {len(data.val):,} val {args.tokenizer} tokens; {steps} steps; {device}, "
                        f"{torch.get_num_threads()} threads; optimizers {', '.join(names)}; seeds {seeds}",
                        width=100, subsequent_indent="  "))

    runs: list[dict[str, Any]] = []
    skipped: dict[str, str] = {}
    sweeps: dict[str, list[dict[str, Any]]] = {}
    interrupted = False
    with Progress(args.no_progress) as progress:
        short_steps = min(config.steps, max(20, config.steps // 4))  # as _sweep
        planned = len(seeds) * steps + (len(sweep_factors) * short_steps if args.sweep else 0)
        second = len(sweep_factors) * short_steps if args.sweep and args.lr is None else 0
        progress.expect(planned * len(names) + second * sum(takes_second_lr(n) for n in names))
        for name in names:
            try:
                lr = args.lr or default_lr(name)
                run_name = name
                if args.sweep and args.lr is None:
                    lr, sweeps[name], interrupted = _sweep(name, data, config, preset, device,
                                                           args.weight_decay, progress, sweep_factors)
                    progress.log(f"{name}: sweep picked lr {lr:.3g}")
                    if takes_second_lr(name) and not interrupted:
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
        "distributed": torchrun.describe(),
    }
    if not torchrun.is_main():
        return 130 if interrupted else 0
    write_result(result, out)
    return 130 if interrupted else 0


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="slimopt bench pretrain", description=__doc__.splitlines()[0])
    add_arguments(parser)
    return run(parser.parse_args(sys.argv[1:] if argv is None else argv))
