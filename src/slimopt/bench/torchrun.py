"""``slimopt bench pretrain --nproc N``: data-parallel pre-training through torchrun.

With ``--nproc N > 1`` the command re-launches itself as ``python -m torch.distributed.run --standalone
--nproc_per_node N -m slimopt bench pretrain ...``. Inside each worker (torchrun sets ``RANK``):

* the process group uses gloo on CPU and NCCL on CUDA (device ``cuda:LOCAL_RANK``);
* ``--batch-size`` stays the global batch: every rank draws the same global batch from the same seeded
  generator and trains on its own ``batch_size // world`` rows, so the gradient the ranks average is the
  one-process gradient of the whole batch;
* the model is sharded with ``fully_shard`` per decoder layer and at the root (``--dist fsdp2``) or wrapped
  in DDP (``--dist ddp``); the optimizer is built afterwards, on the sharded (or unwrapped) model;
* training and validation losses are averaged over the ranks, so every rank takes the same decisions
  (divergence, sweep winner) and rank 0 reports the global-batch numbers;
* only rank 0 prints and writes the result folder; ``results.json`` gets a ``distributed`` entry with the
  world size, the mode and ``slimopt.comm.comm_bytes_per_step`` of each optimizer.

Without ``--nproc`` (or with 1) and outside torchrun every function here is a no-op.
"""

from __future__ import annotations

import argparse
import os
import subprocess
import sys
from typing import Any

import torch
import torch.distributed as dist
from torch import Tensor, nn

from .args import chosen_device

__all__ = ["add_arguments", "describe", "distribute", "finish", "global_mean", "is_main", "note_optimizer",
           "rank_slices", "start", "unwrap", "world_size"]

MODES = ("fsdp2", "ddp")

# This process's place in the run; filled by start() inside a torchrun worker.
_run: dict[str, Any] = {}


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--nproc", type=int, default=1,
                        help="data-parallel processes (re-launches through torchrun; gloo on CPU, NCCL on "
                             "CUDA); --batch-size is the global batch and must be divisible by it")
    parser.add_argument("--dist", default="fsdp2", choices=MODES,
                        help="with --nproc > 1: shard with FSDP2 (fully_shard per layer + root) or use DDP")


def _in_worker() -> bool:
    return "RANK" in os.environ


def _worker_argv() -> list[str]:
    """The arguments after ``pretrain`` on this command line, less ``--nproc``: torchrun's own parser would
    take it for an abbreviation of its ``--nproc-per-node``, and a worker reads the world size from torchrun."""
    argv = sys.argv[1:]
    if "pretrain" not in argv:
        raise RuntimeError("--nproc > 1 re-launches the command line; run it as `slimopt bench pretrain ...`")
    rest, kept = argv[argv.index("pretrain") + 1:], []
    while rest:
        arg = rest.pop(0)
        if arg == "--nproc":
            rest.pop(0)
        elif not arg.startswith("--nproc="):
            kept.append(arg)
    return kept


def _check_batch(batch_size: int, world: int) -> str | None:
    if batch_size % world:
        return (f"--batch-size {batch_size} is the global batch and must be divisible by the number of "
                f"processes ({world}); each rank trains on batch_size // world rows")
    return None


def start(args: argparse.Namespace) -> int | None:
    """Launcher: run the torchrun workers and return their exit code. Worker: join the process group and
    return None (go on training). Single process: return None. An invalid setting returns 2."""
    nproc = getattr(args, "nproc", 1)
    if nproc < 1:
        print(f"--nproc must be at least 1, got {nproc}", file=sys.stderr)
        return 2
    if not _in_worker():
        if nproc == 1:
            return None
        error = _check_batch(args.batch_size, nproc)
        if error:
            print(error, file=sys.stderr)
            return 2
        command = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", str(nproc),
                   "-m", "slimopt", "bench", "pretrain", *_worker_argv()]
        process = subprocess.Popen(command)
        try:
            return process.wait()
        except KeyboardInterrupt:  # torchrun got the SIGINT too and stops its workers
            return process.wait()

    rank, world = int(os.environ["RANK"]), int(os.environ["WORLD_SIZE"])
    local_rank = int(os.environ.get("LOCAL_RANK", 0))
    if nproc > 1 and nproc != world:
        print(f"--nproc {nproc} but torchrun started {world} processes", file=sys.stderr)
        return 2
    error = _check_batch(args.batch_size, world)
    if error:
        print(error, file=sys.stderr)
        return 2
    device = chosen_device(args.device)
    if device.type == "cuda":
        torch.cuda.set_device(local_rank)
        args.device = f"cuda:{local_rank}"
    backend = "nccl" if device.type == "cuda" else "gloo"
    dist.init_process_group(backend)
    _run.update(rank=rank, world=world, mode=args.dist, backend=backend, batch=args.batch_size // world, comm={})
    if rank != 0:  # only rank 0 reports; errors still reach stderr
        sys.stdout = open(os.devnull, "w")  # noqa: SIM115 (kept open for the life of the process)
    return None


def finish() -> None:
    if dist.is_initialized():
        dist.destroy_process_group()
    _run.clear()


def world_size() -> int:
    return _run.get("world", 1)


def is_main() -> bool:
    return _run.get("rank", 0) == 0


def global_mean(value: float) -> float:
    """The mean of ``value`` over the ranks (the ranks' batches are equal, so this is the global-batch
    mean of a per-rank mean loss)."""
    if not _run:
        return value
    total = torch.tensor([value], dtype=torch.float64,
                         device="cuda" if _run["backend"] == "nccl" else "cpu")
    dist.all_reduce(total)
    return total.item() / _run["world"]


class _RankSlices:
    """The token data as one rank sees it: its rows of every global training and validation batch."""

    def __init__(self, data: Any, rank: int, world: int) -> None:
        self._data, self._rank, self._world = data, rank, world

    def __getattr__(self, name: str) -> Any:
        return getattr(self._data, name)

    def _rows(self, batch: tuple[Tensor, Tensor]) -> tuple[Tensor, Tensor]:
        per_rank = batch[0].shape[0] // self._world
        rows = slice(self._rank * per_rank, (self._rank + 1) * per_rank)
        return batch[0][rows], batch[1][rows]

    def train_batch(self, batch_size: int, seq_len: int, generator: torch.Generator) -> tuple[Tensor, Tensor]:
        return self._rows(self._data.train_batch(batch_size, seq_len, generator))

    def val_batches(self, batch_size: int, seq_len: int, max_batches: int) -> list[tuple[Tensor, Tensor]]:
        # A short last batch is cut to a multiple of the world size, so every rank scores as many windows
        # and the mean of the ranks' means is the mean over all windows scored.
        batches = self._data.val_batches(batch_size, seq_len, max_batches)
        return [self._rows(b) for b in batches if b[0].shape[0] >= self._world]


def rank_slices(data: Any) -> Any:
    return _RankSlices(data, _run["rank"], _run["world"]) if _run else data


def distribute(model: nn.Module) -> nn.Module:
    """Shard ``model`` (FSDP2: each decoder layer, then the root) or wrap it in DDP; build the optimizer
    after this, on ``unwrap(model)``."""
    if not _run:
        return model
    if _run["mode"] == "ddp":
        device = next(model.parameters()).device
        return nn.parallel.DistributedDataParallel(model, device_ids=[device] if device.type == "cuda" else None)
    from torch.distributed.fsdp import fully_shard

    for layer in model.layers:
        fully_shard(layer)
    fully_shard(model)
    return model


def unwrap(model: nn.Module) -> nn.Module:
    """The model the optimizer sees: DDP's inner module (its parameter names carry no ``module.``)."""
    return model.module if isinstance(model, nn.parallel.DistributedDataParallel) else model


def note_optimizer(name: str, optimizer: Any) -> None:
    """Record the bytes ``optimizer`` adds to collectives per step (beyond gradient reduction)."""
    if not _run:
        return
    from slimopt.comm import comm_bytes_per_step

    try:
        _run["comm"][name] = comm_bytes_per_step(optimizer)
    except (AttributeError, KeyError, TypeError):  # a baseline without torch's param_groups layout
        _run["comm"][name] = None


def describe() -> dict[str, Any] | None:
    """The ``distributed`` entry of results.json (None for one process)."""
    if not _run:
        return None
    return {"world_size": _run["world"], "mode": _run["mode"], "backend": _run["backend"],
            "per_rank_batch_size": _run["batch"],
            "comm_bytes_per_step": dict(_run["comm"])}
