"""``slimopt bench pretrain --nproc 2``: torchrun workers on CPU (gloo) against one process."""

from __future__ import annotations

import argparse
import json
import math
import random
import subprocess
import sys

import pytest
import torch

from slimopt.bench import torchrun
from slimopt.bench.data import make_token_data
from slimopt.bench.pretrain import main

# Same global batch for both runs; --eval-batches 2 of 4 windows are full batches, so the ranks' validation
# rows together are exactly the one-process validation set.
ARGS = ["--preset", "tiny", "--steps", "3", "--optimizers", "adamw,sinkgd", "--batch-size", "4", "--seq-len", "32",
        "--eval-every", "3", "--eval-batches", "2", "--threads", "1", "--no-progress"]


def _text_file(tmp_path):
    rng = random.Random(0)
    words = ["the", "cat", "sat", "on", "a", "mat", "and", "dog", "ran", "to", "house", "red", "blue"]
    path = tmp_path / "corpus.txt"
    path.write_text(" ".join(rng.choice(words) for _ in range(12_000)) + "\n")
    return path


@pytest.fixture(scope="module")
def one_process(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("one")
    assert main([*ARGS, "--text", str(_text_file(tmp)), "--out", str(tmp / "out")]) == 0
    return json.loads((tmp / "out" / "results.json").read_text())


@pytest.mark.slow
@pytest.mark.parametrize("mode", ["fsdp2", "ddp"])
def test_two_ranks_match_one_process(tmp_path, one_process, mode):
    out = tmp_path / "out"
    command = [sys.executable, "-m", "slimopt", "bench", "pretrain", "--nproc", "2", "--dist", mode, *ARGS,
               "--text", str(_text_file(tmp_path)), "--out", str(out)]
    done = subprocess.run(command, capture_output=True, text=True, timeout=240)
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    assert done.stdout.count("step 3/3") == 2  # rank 0 alone reports: one line per optimizer
    result = json.loads((out / "results.json").read_text())

    info = result["distributed"]
    assert (info["world_size"], info["mode"], info["backend"], info["per_rank_batch_size"]) == (2, mode, "gloo", 2)
    # AdamW adds no collective; SinkGD all-reduces column sums under FSDP2 and nothing under DDP.
    assert info["comm_bytes_per_step"]["adamw"]["total"] == 0
    sinkgd_bytes = info["comm_bytes_per_step"]["sinkgd"]["total"]
    assert sinkgd_bytes > 0 if mode == "fsdp2" else sinkgd_bytes == 0

    # Same initial weights, same global batches, gradients averaged over two equal halves: the runs differ
    # only in the order of fp32 sums (the loss split in halves, the gradient reduction, SinkGD's column-sum
    # all-reduce). Observed: <= 1e-6 absolute on losses of 2.5-5.6. A wrong split (both ranks on the same
    # rows, a missing gradient average) moves the step-1 loss or the later ones by 1e-2 or more, so 1e-4
    # relative (hundreds of fp32 ulps after 3 steps) separates the two.
    for single, multi in zip(one_process["runs"], result["runs"], strict=True):
        assert multi["optimizer"] == single["optimizer"]
        assert multi["tokens_seen"] == single["tokens_seen"] == 3 * 4 * 32  # global tokens
        multi_losses = [loss for *_, loss in multi["train_curve"]] + [multi["final_val_loss"]]
        single_losses = [loss for *_, loss in single["train_curve"]] + [single["final_val_loss"]]
        assert all(math.isfinite(v) for v in multi_losses)
        assert multi_losses == pytest.approx(single_losses, rel=1e-4)
        assert multi["final_val_loss"] < multi["val_curve"][0][3] - 1.0  # it did learn


def test_each_rank_gets_its_own_rows_of_the_global_batch():
    text = " ".join(["the cat sat on the mat"] * 2000)
    data = make_token_data(text, chunk_tokens=1000, val_every=5)
    whole = data.train_batch(6, 16, torch.Generator().manual_seed(3))
    parts = [torchrun._RankSlices(data, rank, 3).train_batch(6, 16, torch.Generator().manual_seed(3))
             for rank in range(3)]
    assert all(p[0].shape == (2, 16) for p in parts)
    assert torch.equal(torch.cat([p[0] for p in parts]), whole[0])
    assert torch.equal(torch.cat([p[1] for p in parts]), whole[1])
    # A short last validation batch is cut to a multiple of the world, so every rank scores as many windows.
    whole_val = data.val_batches(6, 15, 1000)
    assert whole_val[-1][0].shape[0] % 2 == 1  # this text has an odd last batch
    halves = [torchrun._RankSlices(data, rank, 2).val_batches(6, 15, 1000) for rank in range(2)]
    for (inputs, _), first, second in zip(whole_val, *halves, strict=True):
        kept = inputs.shape[0] // 2 * 2
        assert first[0].shape[0] == second[0].shape[0] == kept // 2
        assert torch.equal(torch.cat([first[0], second[0]]), inputs[:kept])


def test_launcher_checks_the_batch_and_forwards_the_command_line(monkeypatch, capsys):
    monkeypatch.delenv("RANK", raising=False)
    args = argparse.Namespace(nproc=3, batch_size=16, device=None, dist="fsdp2")
    assert torchrun.start(args) == 2  # 16 rows do not split over 3 ranks; nothing was launched
    assert "must be divisible" in capsys.readouterr().err
    assert torchrun.start(argparse.Namespace(nproc=1, batch_size=16, device=None, dist="fsdp2")) is None
    monkeypatch.setattr(sys, "argv", ["slimopt", "bench", "pretrain", "--nproc", "2", "--steps", "3", "--nproc=2"])
    assert torchrun._worker_argv() == ["--steps", "3"]  # torchrun would read --nproc as its --nproc-per-node
