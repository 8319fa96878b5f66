"""The training loop every pre-training run shares: warm-up + cosine schedule, gradient clipping,
bf16 autocast on GPU, periodic validation, and the measurements the report needs (optimizer step time,
tokens/s, exact optimizer-state bytes, peak memory)."""

from __future__ import annotations

import math
import statistics
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from typing import Any

import torch
import torch.nn.functional as F

from slimopt import state_bytes

from .data import TokenData
from .report import peak_rss_bytes, release_freed_memory, reset_peak_rss, rss_bytes
from .torchrun import global_mean, world_size

__all__ = ["RunResult", "TrainConfig", "evaluate", "lr_factor", "train"]


@dataclass
class TrainConfig:
    steps: int = 300
    batch_size: int = 16
    seq_len: int = 128
    warmup_fraction: float = 0.1
    min_lr_fraction: float = 0.1  # cosine decays to this fraction of the peak learning rate
    grad_clip: float = 1.0
    eval_every: int = 50
    eval_batches: int = 8
    seed: int = 0


@dataclass
class RunResult:
    optimizer: str
    lr: float
    seed: int
    steps_done: int = 0
    tokens_seen: int = 0
    interrupted: bool = False
    diverged: bool = False
    train_curve: list[tuple[int, float, float]] = field(default_factory=list)  # (step, wall_s, loss)
    val_curve: list[tuple[int, int, float, float]] = field(default_factory=list)  # (step, tokens, wall_s, loss)
    optimizer_step_s: list[float] = field(default_factory=list)
    wall_s: float = 0.0
    state_bytes: int | None = None
    n_params: int = 0
    peak_memory_bytes: int | None = None
    memory_kind: str = ""

    @property
    def final_val_loss(self) -> float | None:
        return self.val_curve[-1][3] if self.val_curve else None

    def to_dict(self) -> dict[str, Any]:
        d = asdict(self)
        d["final_val_loss"] = self.final_val_loss
        d["final_val_ppl"] = math.exp(self.final_val_loss) if self.final_val_loss is not None else None
        steps = self.optimizer_step_s[1:] or self.optimizer_step_s  # the first step allocates the state
        d["optimizer_step_median_s"] = statistics.median(steps) if steps else None
        d["tokens_per_s"] = self.tokens_seen / self.wall_s if self.wall_s else None
        return d


def lr_factor(step: int, total: int, warmup_fraction: float, min_fraction: float) -> float:
    """Linear warm-up to 1, then cosine decay to ``min_fraction`` at ``total`` steps (step counts from 0)."""
    warmup = max(1, round(warmup_fraction * total))
    if step < warmup:
        return (step + 1) / warmup
    progress = min(1.0, (step - warmup) / max(1, total - warmup))
    return min_fraction + (1 - min_fraction) * 0.5 * (1 + math.cos(math.pi * progress))


def _autocast(device: torch.device):
    if device.type == "cuda":
        return torch.autocast("cuda", dtype=torch.bfloat16)
    return torch.autocast("cpu", enabled=False)


def _loss(model: torch.nn.Module, inputs: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    logits = model(inputs)
    logits = getattr(logits, "logits", logits)  # a transformers model returns an output object
    return F.cross_entropy(logits.float().flatten(0, 1), targets.flatten())


@torch.no_grad()
def evaluate(model: torch.nn.Module, batches: list[tuple[torch.Tensor, torch.Tensor]],
             device: torch.device) -> float:
    """Mean next-token cross entropy (nats) over the fixed validation batches."""
    was_training = model.training
    model.eval()
    total, count = 0.0, 0
    with _autocast(device):
        for inputs, targets in batches:
            loss = _loss(model, inputs.to(device), targets.to(device))
            total += loss.item() * targets.numel()
            count += targets.numel()
    model.train(was_training)
    return global_mean(total / count)  # --nproc: each rank scored its rows of the batches


def train(model: torch.nn.Module, optimizer: Any, data: TokenData, config: TrainConfig, *, name: str,
          lr: float, on_progress: Callable[[RunResult, float | None], None] | None = None) -> RunResult:
    """Train ``model`` with ``optimizer`` for ``config.steps`` steps; Ctrl-C stops early and keeps the result.

    Evaluates at step 0, every ``eval_every`` steps and at the end. A non-finite training loss marks the
    run as diverged and stops it (its last validation loss stays in the record).
    """
    device = next(model.parameters()).device
    generator = torch.Generator().manual_seed(config.seed)  # same batches for every optimizer with this seed
    val_batches = data.val_batches(config.batch_size, config.seq_len, config.eval_batches)
    params = [p for p in model.parameters() if p.requires_grad]
    base_lrs = [group["lr"] for group in optimizer.param_groups]
    result = RunResult(optimizer=name, lr=lr, seed=config.seed, n_params=sum(p.numel() for p in params))
    sync = torch.cuda.synchronize if device.type == "cuda" else (lambda: None)

    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
        result.memory_kind = "CUDA max allocated"
    else:
        release_freed_memory()
        reset_peak_rss()
    rss_before = rss_bytes()

    start = time.perf_counter()
    result.val_curve.append((0, 0, 0.0, evaluate(model, val_batches, device)))
    if on_progress:
        on_progress(result, result.val_curve[-1][3])
    model.train()
    try:
        for step in range(config.steps):
            factor = lr_factor(step, config.steps, config.warmup_fraction, config.min_lr_fraction)
            for group, base in zip(optimizer.param_groups, base_lrs):
                group["lr"] = base * factor
            inputs, targets = data.train_batch(config.batch_size, config.seq_len, generator)
            with _autocast(device):
                loss = _loss(model, inputs.to(device), targets.to(device))
            loss.backward()
            if config.grad_clip:
                torch.nn.utils.clip_grad_norm_(params, config.grad_clip)
            sync()
            t0 = time.perf_counter()
            optimizer.step()
            sync()
            result.optimizer_step_s.append(time.perf_counter() - t0)
            optimizer.zero_grad(set_to_none=True)

            loss_value = global_mean(loss.item())  # the global batch's loss, the same on every rank
            result.steps_done = step + 1
            result.tokens_seen += inputs.numel() * world_size()
            result.train_curve.append((step + 1, time.perf_counter() - start, loss_value))
            if not math.isfinite(loss_value):
                result.diverged = True
                break
            val = None
            if (step + 1) % config.eval_every == 0 or step + 1 == config.steps:
                val = evaluate(model, val_batches, device)
                result.val_curve.append((step + 1, result.tokens_seen, time.perf_counter() - start, val))
            if on_progress:
                on_progress(result, val)
    except KeyboardInterrupt:
        result.interrupted = True
    result.wall_s = time.perf_counter() - start
    try:
        result.state_bytes = state_bytes(optimizer)
    except Exception:  # a baseline whose state holds objects we cannot size
        result.state_bytes = None
    if device.type == "cuda":
        result.peak_memory_bytes = torch.cuda.max_memory_allocated(device)
    else:
        peak = peak_rss_bytes()
        result.peak_memory_bytes = peak - rss_before if peak is not None and rss_before is not None else None
        result.memory_kind = "CPU peak RSS above the run's start"
    return result
