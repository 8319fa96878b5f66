"""``slimopt bench finetune``: fine-tune MiniLM-L6 (all-MiniLM-L6-v2, 22.7M) for text classification.

    labelled text (Rotten Tomatoes fresh/rotten, or 20 Newsgroups) -> MiniLM tokenizer, truncation
    -> AutoModelForSequenceClassification (offline, from slimopt.bench.fetch.minilm_path(); new classifier head)
    -> optimizer (same factory as pre-training) -> warm-up + cosine loop, clipping
    -> test accuracy, train loss, optimizer state bytes, peak memory, step time.

``--text FILE`` fine-tunes on the user's own labelled text instead of a named task: one example per line,
``LABEL<TAB>TEXT``; the last ``--test-fraction`` of the lines (default 0.2) is the held-out test split.

On two CPU cores a full epoch takes long, so ``--train-examples`` takes a fixed, seeded subset (default
2048) and ``--test-examples`` likewise (default 1000); set them to 0 for the whole splits.

Learning rates: fine-tuning wants far smaller steps than pre-training from scratch. The default for each
optimizer is 5e-5 scaled by (its registry example lr / AdamW's), which keeps the methods' relative scales
(SinkGD and SWAN normalise their updates differently from Adam); ``--lr`` sets one value for all.
"""

from __future__ import annotations

import argparse
import math
import random
import statistics
import time
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F

from slimopt.registry import default_names

from .args import (
    UsageError,
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
from .baselines import OptimizerUnavailable, default_lr, make_optimizer
from .plots import memory_bars
from .report import (
    console_table,
    markdown_table,
    peak_rss_bytes,
    print_results,
    release_freed_memory,
    reset_peak_rss,
    rss_bytes,
    run_metadata,
    write_json,
)
from .train import lr_factor

__all__ = ["add_arguments", "console_summary", "default_optimizers", "finetune_lr", "run", "validate"]

TASKS = ("rotten-tomatoes", "20newsgroups")
ADAMW_FINETUNE_LR = 5e-5


def default_optimizers() -> list[str]:
    """Without ``--optimizers``: every registered optimizer (AdamW, the reference, first)."""
    return default_names()


def finetune_lr(name: str) -> float:
    return ADAMW_FINETUNE_LR * default_lr(name) / default_lr("adamw")


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--task", default="rotten-tomatoes", choices=TASKS)
    parser.add_argument("--text", default=None, metavar="PATH",
                        help="your own labelled text instead of --task: one LABEL<TAB>TEXT per line; the last "
                             "--test-fraction of the lines is the test split")
    parser.add_argument("--test-fraction", type=float, default=0.2,
                        help="with --text: the tail of the lines held out for testing (default 0.2)")
    parser.add_argument("--optimizers", default=",".join(default_optimizers()),
                        help="comma-separated (default: every registered optimizer)")
    parser.add_argument("--lr", type=float, default=None, help="one lr for all (default: finetune_lr(name))")
    parser.add_argument("--epochs", type=float, default=1.0)
    parser.add_argument("--batch-size", type=int, default=32)
    parser.add_argument("--max-length", type=int, default=None, help="tokens per text (default 64; 20NG 256)")
    parser.add_argument("--train-examples", type=int, default=2048, help="seeded subset (0 = all)")
    parser.add_argument("--test-examples", type=int, default=1000, help="seeded subset (0 = all)")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--device", default=None)
    parser.add_argument("--threads", type=int, default=None)
    parser.add_argument("--out", default=None, help="result folder (default runs/finetune-<task>-<time>)")


def _subset(items: list, n: int, seed: int) -> list:
    if not n or n >= len(items):
        return list(items)
    return random.Random(seed).sample(items, n)


def _encode(tokenizer, items: list[tuple[str, int]], max_length: int) -> list[tuple[list[int], int]]:
    encoded = tokenizer([text for text, _ in items], truncation=True, max_length=max_length)["input_ids"]
    return [(ids, label) for ids, (_, label) in zip(encoded, items)]


def _batch(examples: list[tuple[list[int], int]], pad_id: int, device: torch.device):
    length = max(len(ids) for ids, _ in examples)
    ids = torch.full((len(examples), length), pad_id, dtype=torch.long)
    mask = torch.zeros((len(examples), length), dtype=torch.long)
    for i, (row, _) in enumerate(examples):
        ids[i, : len(row)] = torch.tensor(row)
        mask[i, : len(row)] = 1
    labels = torch.tensor([label for _, label in examples])
    return ids.to(device), mask.to(device), labels.to(device)


@torch.no_grad()
def _accuracy(model, examples, pad_id: int, batch_size: int, device: torch.device) -> float:
    model.eval()
    correct = 0
    for i in range(0, len(examples), batch_size):
        ids, mask, labels = _batch(examples[i:i + batch_size], pad_id, device)
        correct += (model(input_ids=ids, attention_mask=mask).logits.argmax(-1) == labels).sum().item()
    model.train()
    return correct / len(examples)


def _one_run(name: str, lr: float, train_set, test_set, n_labels: int, pad_id: int, args,
             device: torch.device) -> dict[str, Any]:
    from transformers import AutoModelForSequenceClassification
    from transformers.utils import logging as hf_logging

    from slimopt import state_bytes
    from slimopt.bench.fetch import minilm_path

    hf_logging.set_verbosity_error()  # "newly initialised classifier" is expected
    hf_logging.disable_progress_bar()
    torch.manual_seed(args.seed)
    model = AutoModelForSequenceClassification.from_pretrained(str(minilm_path()), num_labels=n_labels).to(device)
    optimizer = make_optimizer(model, name, lr=lr)
    base_lrs = [g["lr"] for g in optimizer.param_groups]
    steps = max(1, math.ceil(args.epochs * len(train_set) / args.batch_size))
    order = random.Random(args.seed)
    params = [p for p in model.parameters() if p.requires_grad]
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
    else:
        release_freed_memory()
        reset_peak_rss()
    rss_before = rss_bytes()
    losses, step_times, queue = [], [], []
    start = time.perf_counter()
    interrupted = False
    try:
        for step in range(steps):
            if len(queue) < args.batch_size:  # reshuffle each epoch
                queue += order.sample(train_set, len(train_set))
            batch, queue = queue[:args.batch_size], queue[args.batch_size:]
            factor = lr_factor(step, steps, 0.1, 0.0)
            for group, base in zip(optimizer.param_groups, base_lrs):
                group["lr"] = base * factor
            ids, mask, labels = _batch(batch, pad_id, device)
            with torch.autocast("cuda", dtype=torch.bfloat16, enabled=device.type == "cuda"):
                logits = model(input_ids=ids, attention_mask=mask).logits
            loss = F.cross_entropy(logits.float(), labels)
            loss.backward()
            torch.nn.utils.clip_grad_norm_(params, 1.0)
            t0 = time.perf_counter()
            optimizer.step()
            if device.type == "cuda":
                torch.cuda.synchronize(device)
            step_times.append(time.perf_counter() - t0)
            optimizer.zero_grad(set_to_none=True)
            losses.append(loss.item())
            if (step + 1) % max(1, steps // 5) == 0:
                print(f"  {name} step {step + 1}/{steps}: train loss {statistics.mean(losses[-10:]):.4f}",
                      flush=True)
    except KeyboardInterrupt:
        interrupted = True
    wall = time.perf_counter() - start
    accuracy = _accuracy(model, test_set, pad_id, args.batch_size * 2, device)
    if device.type == "cuda":
        peak = torch.cuda.max_memory_allocated(device)
    else:
        hwm = peak_rss_bytes()
        peak = hwm - rss_before if hwm is not None and rss_before is not None else None
    n_params = sum(p.numel() for p in params)
    state = state_bytes(optimizer)
    return {"optimizer": name, "lr": lr, "steps": len(losses), "train_loss_curve": losses,
            "final_train_loss": statistics.mean(losses[-max(1, len(losses) // 10):]) if losses else None,
            "test_accuracy": accuracy, "state_bytes": state, "state_bytes_per_param": state / n_params,
            "n_params": n_params, "n_tensors": len(params), "peak_memory_bytes": peak,
            "optimizer_step_median_s": statistics.median(step_times[1:] or step_times) if step_times else None,
            "wall_s": wall, "interrupted": interrupted}


MAX_POSITIONS = 512  # MiniLM-L6's position embeddings


def read_labelled_text(path: str | Path, test_fraction: float, batch_size: int = 1) -> dict:
    """``{"train", "test", "label_names"}`` from a file of ``LABEL<TAB>TEXT`` lines (blank lines skipped):
    labels index the sorted label names; the last ``test_fraction`` of the examples is the test split.
    A file that cannot give one training batch and one test example raises :class:`UsageError` (``--text``)."""
    lines = Path(path).read_text(encoding="utf-8", errors="replace").splitlines()
    rows: list[tuple[str, str]] = []
    for number, line in enumerate(lines, start=1):
        if not line.strip():
            continue
        label, tab, text = line.partition("\t")
        if not tab or not label.strip() or not text.strip():
            raise UsageError("--text", str(path), f"line {number} is not LABEL<TAB>TEXT: {line[:60]!r}")
        rows.append((text.strip(), label.strip()))
    label_names = sorted({label for _, label in rows})
    if len(label_names) < 2:
        raise UsageError("--text", str(path), f"{len(rows)} examples with {len(label_names)} label(s) "
                                              f"{label_names}; a classifier needs at least 2")
    n_test = max(1, round(len(rows) * test_fraction))
    train, test = rows[:len(rows) - n_test], rows[len(rows) - n_test:]
    if len(train) < batch_size:
        raise UsageError("--text", str(path), f"too short for one batch: {len(rows)} examples give {len(train)} "
                                              f"for training ({len(test)} held out), fewer than --batch-size "
                                              f"{batch_size}")
    index = {label: i for i, label in enumerate(label_names)}
    return {"train": [(t, index[label]) for t, label in train], "test": [(t, index[label]) for t, label in test],
            "label_names": label_names}


def validate(args: argparse.Namespace) -> None:
    """Every argument, before the data or the model is loaded; a bad one raises :class:`UsageError`."""
    check_optimizers("--optimizers", args.optimizers)
    check_number("--lr", args.lr, what="the peak learning rate")
    check_number("--epochs", args.epochs)
    check_int("--batch-size", args.batch_size)
    check_int("--max-length", args.max_length, minimum=2)
    if args.max_length is not None and args.max_length > MAX_POSITIONS:
        raise UsageError("--max-length", args.max_length, f"MiniLM-L6 reads at most {MAX_POSITIONS} tokens")
    check_int("--train-examples", args.train_examples, minimum=0, what="0 = all")
    check_int("--test-examples", args.test_examples, minimum=0, what="0 = all")
    check_int("--seed", args.seed, minimum=0)
    check_device("--device", args.device)
    check_threads(args.threads)
    check_out("--out", args.out)
    if not 0 < args.test_fraction < 1:
        raise UsageError("--test-fraction", args.test_fraction, "must be between 0 and 1")
    check_file("--text", args.text)
    # read here, so that its errors come before any work; run takes it from args
    args.labelled = None if args.text is None else read_labelled_text(args.text, args.test_fraction, args.batch_size)


@guarded("slimopt bench finetune")
def run(args: argparse.Namespace) -> int:
    validate(args)
    from transformers import AutoTokenizer

    from slimopt.bench.fetch import labelled, minilm_path

    if args.threads:
        torch.set_num_threads(args.threads)
    names = args.optimizers.split(",")
    device = chosen_device(args.device)
    max_length = args.max_length or (256 if args.task == "20newsgroups" else 64)
    if args.text is not None:
        data = args.labelled
        args.task = f"file {Path(args.text).name}"
    else:
        data = labelled(args.task)
    tokenizer = AutoTokenizer.from_pretrained(str(minilm_path()))
    train_set = _encode(tokenizer, _subset(data["train"], args.train_examples, args.seed), max_length)
    test_set = _encode(tokenizer, _subset(data["test"], args.test_examples, args.seed + 1), max_length)
    n_labels = len(data["label_names"])
    print(f"finetune MiniLM-L6 on {args.task}: {len(train_set)} train / {len(test_set)} test examples, "
          f"{n_labels} labels, max length {max_length}; {device}; optimizers {', '.join(names)}")
    slug = "text" if args.text else args.task
    out = Path(args.out) if args.out else Path("runs") / time.strftime(f"finetune-{slug}-%Y%m%d-%H%M%S")

    runs, skipped = [], {}
    for name in names:
        lr = args.lr or finetune_lr(name)
        try:
            result = _one_run(name, lr, train_set, test_set, n_labels, tokenizer.pad_token_id, args, device)
        except OptimizerUnavailable as exc:
            print(f"skipping {name}: {exc}")
            skipped[name] = str(exc)
            continue
        runs.append(result)
        print(f"{name}: test accuracy {result['test_accuracy']:.4f}, final train loss "
              f"{result['final_train_loss']:.4f}")
        if result["interrupted"]:
            print("interrupted: writing the runs that finished")
            break

    rows = [[r["optimizer"], f"{r['lr']:.3g}", r["test_accuracy"], r["final_train_loss"],
             r["state_bytes"] / 2**20, r["state_bytes_per_param"],
             None if r["peak_memory_bytes"] is None else r["peak_memory_bytes"] / 2**20,
             r["optimizer_step_median_s"] and r["optimizer_step_median_s"] * 1e3] for r in runs]
    table = markdown_table(["optimizer", "lr", "test accuracy", "final train loss", "state MiB", "state B/param",
                            "peak MiB", "opt. step ms"], rows)
    plots = []
    png = memory_bars([(r["optimizer"], r["state_bytes"] / 2**20,
                        r["peak_memory_bytes"] and r["peak_memory_bytes"] / 2**20) for r in runs],
                      out / "memory.png", peak_label="peak memory above start" if device.type == "cpu"
                      else "cuda max allocated", title=f"MiniLM-L6 on {args.task}")
    if png:
        plots.append(str(png))
    meta = run_metadata()
    write_json(out / "results.json", {"meta": meta, "settings": {**vars(args), "max_length": max_length,
                                                                 "device": str(device)},
                                      "runs": runs, "skipped": skipped, "plots": plots})
    report = (f"# Fine-tuning MiniLM-L6 on {args.task}\n\n{len(train_set)} train / {len(test_set)} test "
              f"examples, {args.epochs} epoch(s), batch {args.batch_size}, max length {max_length}; commit "
              f"{meta['git_commit']}.\n\n{table}\n"
              + ("\nSkipped: " + "; ".join(f"{k}: {v}" for k, v in skipped.items()) + "\n" if skipped else "")
              + "".join(f"\n![{Path(p).stem}]({Path(p).name})\n" for p in plots))
    (out / "report.md").write_text(report)
    console = console_summary(runs, f"MiniLM-L6 on {args.task}, {len(train_set)} train / {len(test_set)} test "
                                    "examples")
    print_results(console, out, ["report.md", "results.json", *(Path(p).name for p in plots)])
    return 0


def console_summary(runs: list[dict[str, Any]], title: str) -> str:
    """The end-of-run table for a terminal (report.md keeps the Markdown one)."""
    def fixed(value: float | None, digits: int, scale: float = 1.0, suffix: str = "") -> str | None:
        return None if value is None else f"{value * scale:.{digits}f}{suffix}"

    return console_table(
        title, ["optimizer", "lr", "test acc.", "train loss", "state MiB", "state B/p", "peak MiB", "step ms"],
        [[r["optimizer"], f"{r['lr']:.3g}", fixed(r["test_accuracy"], 2, 100, "%"), fixed(r["final_train_loss"], 4),
          fixed(r["state_bytes"], 1, 2**-20), fixed(r["state_bytes_per_param"], 2),
          fixed(r["peak_memory_bytes"], 1, 2**-20), fixed(r["optimizer_step_median_s"] or None, 1, 1e3)]
         for r in runs])
