"""One rank of the distributed parity tests (tests/test_distributed.py starts WORLD of these).

Every rank trains the same tiny LLaMA-style decoder, in float64, on its slice of a fixed batch, with
each optimizer, under DDP and under FSDP2 (optimizer built before sharding and rebound, as Accelerate
does, or built after sharding). Rank 0 saves the full final parameters; the test compares them with a
single-process run of the same functions (``train_single``). Then DCP: a 2-rank run saves a checkpoint
mid-training and keeps going; 2- and 4-rank runs resume from it and must land on the same parameters.

Usage: python _dist_worker.py RANK WORLD PORT OUT_DIR
"""

from __future__ import annotations

import datetime
import os
import sys
import traceback
from typing import Any

import torch
import torch.distributed as dist
from torch import nn

import slimopt
from slimopt.bench.model import build_model
from slimopt.comm import comm_bytes_per_step
from slimopt.core import distributed as sd

STEPS = 5  # > MicroAdam's window (m=3) so that ring rows are overwritten
CKPT_STEP = 3  # the DCP tests save after this many steps, then train STEPS - CKPT_STEP more
BATCH, SEQ = 8, 8  # BATCH splits evenly over 1, 2 and 4 ranks

# A decoder whose every shard, on 2 and on 4 ranks, is a whole number of MicroAdam Top-K blocks and
# quantisation buckets (all row widths and row counts are multiples of 4, block = bucket = 4): then
# MicroAdam's per-shard compression equals the unsharded one. Two kv heads of head_dim 8 over 4 ranks
# put half a head on each rank, so Adam-mini's per-head blocks straddle shards.
MODEL = dict(vocab_size=32, hidden_size=16, intermediate_size=24, num_hidden_layers=1, num_attention_heads=2,
             num_key_value_heads=1, head_dim=8, max_position_embeddings=SEQ)

OPTIMIZERS: dict[str, dict[str, Any]] = {
    "adamw": dict(lr=1e-2, weight_decay=0.1),
    "microadam": dict(lr=1e-2, weight_decay=0.1, m=3, k_init=0.25, topk_block_size=4, quant_block_size=4),
    "adammini": dict(lr=1e-2, weight_decay=0.1),
    "sinkgd": dict(lr=0.05, weight_decay=0.1),
    "swan": dict(lr=0.05, weight_decay=0.1),
}
MODES = ("ddp", "fsdp_after", "fsdp_before")
STATELESS = ("sinkgd", "swan")


def make_model() -> nn.Module:
    torch.manual_seed(1234)
    return build_model("tiny", **MODEL).double()


def batches(steps: int = STEPS) -> list[torch.Tensor]:
    gen = torch.Generator().manual_seed(99)
    return [torch.randint(0, MODEL["vocab_size"], (BATCH, SEQ + 1), generator=gen) for _ in range(steps)]


def make_optimizer(model: nn.Module, name: str) -> torch.optim.Optimizer:
    kwargs = dict(OPTIMIZERS[name])
    if name == "adamw":  # named, so that rebind_params can swap in the shards by name
        return torch.optim.AdamW(list(model.named_parameters()), **kwargs)
    return slimopt.create_optimizer(model, name, **kwargs)


def loss_fn(model: nn.Module, tokens: torch.Tensor) -> torch.Tensor:
    logits = model(tokens[:, :-1])
    return nn.functional.cross_entropy(logits.reshape(-1, logits.shape[-1]), tokens[:, 1:].reshape(-1))


def train(model: nn.Module, opt: torch.optim.Optimizer, data: list[torch.Tensor], rank: int = 0,
          world: int = 1) -> None:
    per_rank = BATCH // world
    for tokens in data:
        opt.zero_grad(set_to_none=True)
        loss_fn(model, tokens[rank * per_rank:(rank + 1) * per_rank]).backward()
        opt.step()


def full_params(model: nn.Module) -> dict[str, torch.Tensor]:
    out = {}
    for name, p in model.named_parameters():
        t = p.full_tensor() if sd.is_dtensor(p) else p
        out[name.removeprefix("module.")] = t.detach().clone()
    return out


def train_single(name: str, steps: int = STEPS) -> dict[str, torch.Tensor]:
    """The single-process reference run."""
    model = make_model()
    opt = make_optimizer(model, name)
    train(model, opt, batches(steps))
    return full_params(model)


# --------------------------------------------------------------------------------------------------
# distributed set-ups


def shard(model: nn.Module) -> nn.Module:
    from torch.distributed.fsdp import fully_shard

    for layer in model.layers:
        fully_shard(layer)
    fully_shard(model)
    return model


def setup(name: str, mode: str) -> tuple[nn.Module, torch.optim.Optimizer]:
    model = make_model()
    if mode == "ddp":
        opt = make_optimizer(model, name)
        model = nn.parallel.DistributedDataParallel(model)
    elif mode == "fsdp_after":
        model = shard(model)
        opt = make_optimizer(model, name)
    elif mode == "fsdp_before":  # the Accelerate / HF Trainer order
        opt = make_optimizer(model, name)
        model = shard(model)
        sd.rebind_params(opt, model)
    else:
        raise ValueError(mode)
    return model, opt


def run_parity(rank: int, world: int) -> dict[str, Any]:
    results: dict[str, Any] = {}
    data = batches()
    for name in OPTIMIZERS:
        for mode in MODES:
            key = f"{name}/{mode}"
            try:
                model, opt = setup(name, mode)
                train(model, opt, data[:1], rank, world)  # state exists from here on
                sd.COMM.reset()
                train(model, opt, data[1:], rank, world)
                results[key] = {"params": full_params(model), "comm_bytes": sd.COMM.bytes,
                                "comm_expected": comm_bytes_per_step(opt)["total"] * (STEPS - 1)}
            except Exception:
                results[key] = {"error": traceback.format_exc()}
            dist.barrier()
    return results


def run_checkpoint(rank: int, world: int, ckpt_root: str) -> dict[str, Any]:
    """World 2 saves after CKPT_STEP steps and trains on; any world resumes and trains the same steps."""
    import torch.distributed.checkpoint as dcp
    from torch.distributed.checkpoint.state_dict import (
        StateDictOptions,
        get_model_state_dict,
        get_optimizer_state_dict,
        set_model_state_dict,
        set_optimizer_state_dict,
    )

    results: dict[str, Any] = {}
    data = batches()
    for name in OPTIMIZERS:
        path = os.path.join(ckpt_root, name)
        try:
            model, opt = setup(name, "fsdp_after")
            if world == 2:  # the run that saves, then goes on: its end point is the reference
                train(model, opt, data[:CKPT_STEP], rank, world)
                state = {"model": get_model_state_dict(model), "optim": get_optimizer_state_dict(model, opt)}
                dcp.save(state, checkpoint_id=path)
                train(model, opt, data[CKPT_STEP:], rank, world)
                results[f"{name}/saved"] = full_params(model)
                model, opt = setup(name, "fsdp_after")  # a fresh job resumes on the same world size
            state = {"model": get_model_state_dict(model), "optim": get_optimizer_state_dict(model, opt)}
            dcp.load(state, checkpoint_id=path)
            set_model_state_dict(model, state["model"])
            # SinkGD/SWAN matrices have no state at all: DCP's strict check would call that missing
            options = StateDictOptions(strict=name not in STATELESS)
            set_optimizer_state_dict(model, opt, state["optim"], options=options)
            train(model, opt, data[CKPT_STEP:], rank, world)
            results[f"{name}/resumed"] = full_params(model)
        except Exception:
            results[f"{name}/resumed"] = {"error": traceback.format_exc()}
        dist.barrier()
    return results


UNEVEN = dict(lr=1e-2, m=3, k_init=0.25, topk_block_size=2, quant_block_size=2)


def train_uneven(rank: int = 0, world: int = 1) -> dict[str, torch.Tensor]:
    """MicroAdam on a 10-row matrix: 3+3+3+1 rows over 4 ranks, so the last shard is padded. Rows of 6
    entries and blocks/buckets of 2 keep every real block whole, so the result must equal one process."""
    torch.manual_seed(5)
    model = nn.Sequential(nn.Linear(6, 10, bias=False)).double()
    if world > 1:
        from torch.distributed.fsdp import fully_shard

        fully_shard(model)
    opt = slimopt.MicroAdam(list(model.named_parameters()), **UNEVEN)
    gen = torch.Generator().manual_seed(7)
    for _ in range(STEPS):
        x = torch.randn(BATCH, 6, generator=gen, dtype=torch.float64)
        opt.zero_grad()
        per_rank = BATCH // world
        model(x[rank * per_rank:(rank + 1) * per_rank]).pow(2).mean().backward()
        opt.step()
    return full_params(model)


def check_helpers(rank: int, world: int) -> dict[str, Any]:
    """Facts every rank checks about the helpers on real FSDP2 shards; rank 0 reports all ranks' answers."""
    model = shard(make_model())
    facts = {}
    for name, p in model.named_parameters():
        sizes = sd.shard_sizes(p)
        start, stop = sd.local_rows(p)
        facts[name] = (sum(sizes) == p.shape[0] and sizes[rank] == sd.local(p).shape[0] == stop - start
                       and torch.equal(sd.local_part(sd.full(p), p), sd.local(p))
                       and torch.equal(sd.full(p)[start:stop], sd.local(p)))
    # one NaN in one rank's shard: every rank must refuse the step ("raise") or skip the tensor ("skip")
    outcome = {}
    for policy in ("raise", "skip"):
        model = shard(make_model())
        opt = slimopt.create_optimizer(model, "adammini", lr=1e-2, nonfinite=policy)
        loss_fn(model, batches(1)[0][rank:rank + 1]).backward()
        target = model.layers[0].mlp.up_proj.weight
        before = sd.full(target).clone()
        if rank == world - 1:
            sd.local(target.grad)[0, 0] = float("nan")
        try:
            opt.step()
            outcome[policy] = "stepped, target untouched" if torch.equal(sd.full(target), before) else "stepped"
        except FloatingPointError:
            outcome[policy] = "raised"
    everyone: list[Any] = [None] * world
    dist.all_gather_object(everyone, {"shards": all(facts.values()), "nonfinite": outcome})
    return {"ranks": everyone}


# SWAN on a float32 model whose matrices see fewer tokens than their width (issue 23): every hidden
# matrix's gradient has rank <= 32 of 64, so its null directions hold only fp32 rounding, which the
# reduce-scatter rounds differently from one process's backward. The whitening must not amplify that.
SWAN_FP32_MODEL = dict(vocab_size=64, hidden_size=64, intermediate_size=96, num_hidden_layers=2,
                       num_attention_heads=4, num_key_value_heads=2, head_dim=16, max_position_embeddings=SEQ)
SWAN_FP32_STEPS = 4
SWAN_FP32_BATCH = 4  # x SEQ = 32 tokens < hidden_size; splits evenly over 1, 2 and 4 ranks


def train_swan_fp32(rank: int = 0, world: int = 1) -> dict[str, torch.Tensor]:
    """SWAN (its defaults, lr 0.05, weight decay 0.1) on the float32 model; FSDP2 when ``world`` > 1."""
    torch.manual_seed(4321)
    model = build_model("tiny", **SWAN_FP32_MODEL)
    if world > 1:
        shard(model)
    opt = slimopt.create_optimizer(model, "swan", lr=0.05, weight_decay=0.1)
    gen = torch.Generator().manual_seed(77)
    per_rank = SWAN_FP32_BATCH // world
    for _ in range(SWAN_FP32_STEPS):
        tokens = torch.randint(0, SWAN_FP32_MODEL["vocab_size"], (SWAN_FP32_BATCH, SEQ + 1), generator=gen)
        opt.zero_grad(set_to_none=True)
        loss_fn(model, tokens[rank * per_rank:(rank + 1) * per_rank]).backward()
        opt.step()
    return full_params(model)


def run_swan_fp32(rank: int, world: int) -> dict[str, Any]:
    try:
        return train_swan_fp32(rank, world)
    except Exception:
        return {"error": traceback.format_exc()}


def main() -> None:
    rank, world, port, out_dir = int(sys.argv[1]), int(sys.argv[2]), int(sys.argv[3]), sys.argv[4]
    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=world,
                            timeout=datetime.timedelta(seconds=60))
    try:
        results = {"helpers": check_helpers(rank, world), "uneven": train_uneven(rank, world),
                   "parity": run_parity(rank, world),
                   "checkpoint": run_checkpoint(rank, world, os.path.join(out_dir, "ckpt")),
                   "swan_fp32": run_swan_fp32(rank, world)}
        if rank == 0:
            torch.save(results, os.path.join(out_dir, f"results_{world}.pt"))
    finally:
        dist.destroy_process_group()


if __name__ == "__main__":
    main()
