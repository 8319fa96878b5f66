"""DDP and FSDP2 give the single-process result, and DCP checkpoints resume on other world sizes.

Two spawns in all (2 ranks, then 4 ranks, gloo on CPU): each runs every optimizer under DDP and under
FSDP2 (built after sharding, and built before sharding then rebound, as Accelerate does), a DCP round trip
and helper checks (tests/_dist_worker.py). This process computes the single-process references with the
same functions and compares.

Tolerances (the model is float64, relative to the largest entry of each parameter):

* 1e-9 for AdamW, Adam-mini, MicroAdam and for DDP of every method. Sharding only changes the order of
  float64 sums (the batch split, reduce-scatter, Adam-mini's per-block all-reduce): about 1e-16 relative
  per operation; measured at most ~3e-15 after 5 steps. MicroAdam's Top-K choices and bf16/4-bit codes
  are identical (measured bit-exact); a flipped choice would show as an error of order lr, not 1e-9.
* 1e-5 for SinkGD and SWAN under FSDP2: their kernels compute in float32 by design; SinkGD's column
  sums are added in another order across ranks (float32 rounding, ~6e-8 relative per sum, over 5
  Sinkhorn iterations and 5 steps; measured ~4e-8).
"""

from __future__ import annotations

import importlib.util
import os
import socket
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import pytest
import torch

WORKER_PATH = Path(__file__).with_name("_dist_worker.py")
_spec = importlib.util.spec_from_file_location("_dist_worker", WORKER_PATH)
worker = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(worker)

WORLDS = (2, 4)
TIMEOUT_S = 240  # per world size; a hang fails the test instead of blocking CI
FP32_KERNELS = ("sinkgd", "swan")

_HAS_GLOO = torch.distributed.is_available() and torch.distributed.is_gloo_available()
pytestmark = [pytest.mark.slow, pytest.mark.skipif(not _HAS_GLOO, reason="needs torch.distributed with gloo")]


def tolerance(name: str, mode: str) -> float:
    return 1e-5 if name in FP32_KERNELS and mode != "ddp" else 1e-9


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _spawn(world: int, out_dir: Path) -> dict[str, Any]:
    port = _free_port()
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONWARNINGS": "ignore"}
    logs = [open(out_dir / f"rank{r}_w{world}.log", "w+") for r in range(world)]  # noqa: SIM115
    procs = [subprocess.Popen([sys.executable, str(WORKER_PATH), str(r), str(world), str(port), str(out_dir)],
                              stdout=logs[r], stderr=subprocess.STDOUT, env=env) for r in range(world)]
    deadline = time.monotonic() + TIMEOUT_S
    try:
        for p in procs:
            p.wait(timeout=max(1.0, deadline - time.monotonic()))
    except subprocess.TimeoutExpired:
        pass
    finally:
        for p in procs:
            if p.poll() is None:
                p.kill()
                p.wait()
    tails = []
    for r, log in enumerate(logs):
        log.seek(0)
        tails.append(f"--- rank {r} (exit {procs[r].returncode}) ---\n" + log.read()[-3000:])
        log.close()
    result = out_dir / f"results_{world}.pt"
    if any(p.returncode != 0 for p in procs) or not result.exists():
        pytest.fail(f"{world}-rank run failed or hung (limit {TIMEOUT_S}s):\n" + "\n".join(tails))
    return torch.load(result, weights_only=False)


@pytest.fixture(scope="module")
def runs(tmp_path_factory: pytest.TempPathFactory) -> dict[int, dict[str, Any]]:
    out_dir = tmp_path_factory.mktemp("dist")
    return {world: _spawn(world, out_dir) for world in WORLDS}  # 4 ranks resume the 2-rank checkpoint


@pytest.fixture(scope="module")
def reference() -> dict[str, dict[str, torch.Tensor]]:
    return {name: worker.train_single(name) for name in worker.OPTIMIZERS}


def assert_close_params(got: dict[str, torch.Tensor], want: dict[str, torch.Tensor], tol: float, what: str) -> None:
    assert got.keys() == want.keys(), what
    for name, w in want.items():
        err = ((got[name] - w).abs().max() / w.abs().max().clamp_min(1e-30)).item()
        assert err <= tol, f"{what}: {name} differs by {err:.2e} (relative to its largest entry; tolerance {tol})"


def _ok(entry: Any, what: str) -> Any:
    if isinstance(entry, dict) and "error" in entry:
        pytest.fail(f"{what} raised on rank 0:\n{entry['error']}")
    return entry


@pytest.mark.parametrize("world", WORLDS)
@pytest.mark.parametrize("mode", worker.MODES)
@pytest.mark.parametrize("name", list(worker.OPTIMIZERS))
def test_distributed_training_matches_one_process(runs, reference, name, mode, world):
    entry = _ok(runs[world]["parity"][f"{name}/{mode}"], f"{name} {mode} on {world} ranks")
    assert_close_params(entry["params"], reference[name], tolerance(name, mode), f"{name} {mode} {world} ranks")


@pytest.mark.parametrize("world", WORLDS)
@pytest.mark.parametrize("mode", worker.MODES)
@pytest.mark.parametrize("name", list(worker.OPTIMIZERS))
def test_communication_matches_the_analytic_count(runs, name, mode, world):
    entry = _ok(runs[world]["parity"][f"{name}/{mode}"], f"{name} {mode} on {world} ranks")
    assert entry["comm_bytes"] == entry["comm_expected"]
    if mode == "ddp" or name == "adamw":
        assert entry["comm_bytes"] == 0


@pytest.mark.parametrize("world", WORLDS)
@pytest.mark.parametrize("name", list(worker.OPTIMIZERS))
def test_dcp_checkpoint_from_2_ranks_resumes_identically(runs, name, world):
    saved = _ok(runs[2]["checkpoint"][f"{name}/saved"], f"{name}: 2-rank run that saves")
    resumed = _ok(runs[world]["checkpoint"][f"{name}/resumed"], f"{name}: resumed on {world} ranks")
    assert_close_params(resumed, saved, tolerance(name, "fsdp"), f"{name} resumed on {world} ranks")


@pytest.mark.parametrize("world", WORLDS)
def test_helpers_on_real_shards_and_nonfinite_agreement(runs, world):
    ranks = runs[world]["helpers"]["ranks"]
    assert all(r["shards"] for r in ranks), ranks
    # a NaN in the last rank's shard only: every rank raises, or every rank skips that tensor
    assert [r["nonfinite"]["raise"] for r in ranks] == ["raised"] * world
    assert [r["nonfinite"]["skip"] for r in ranks] == ["stepped, target untouched"] * world


@pytest.mark.parametrize("world", WORLDS)
def test_microadam_uneven_shards_are_padded_not_miscut(runs, world):
    # 10 rows over 4 ranks: 3+3+3+1, the last shard padded with zero rows to 3 (over 2 ranks: 5+5)
    assert_close_params(runs[world]["uneven"], worker.train_uneven(), 1e-9, f"MicroAdam, uneven shards, {world} ranks")


@pytest.mark.parametrize("world", WORLDS)
def test_swan_fp32_fsdp2_with_rank_deficient_gradients_matches_one_process(runs, world):
    """Issue 23: a float32 model whose matrices see fewer tokens than their width (rank-deficient
    gradients), SWAN at its defaults, 4 steps under FSDP2 against one process: within 1e-4 of each
    parameter's norm. The 11-step whitening this replaced drifted by 1e-2 here (it whitened the rounding
    in the gradients' null directions); measured now: <= 9e-6 on 2 and on 4 ranks."""
    got = _ok(runs[world]["swan_fp32"], f"SWAN fp32 FSDP2 on {world} ranks")
    want = worker.train_swan_fp32()
    assert got.keys() == want.keys()
    for name, w in want.items():
        assert w.dtype == torch.float32
        err = ((got[name] - w).norm() / w.norm()).item()
        assert err <= 1e-4, f"{name} differs by {err:.2e} relative to its norm on {world} ranks"
