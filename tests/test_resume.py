"""Interrupting training at any step and resuming from the last checkpoint reproduces the uninterrupted run
bit for bit (CPU, every optimizer, fp32 and bf16 parameters, with an LR scheduler).

A checkpoint is what a training script writes: model weights, optimizer and scheduler state, through
``torch.save`` and back through ``torch.load(weights_only=True)``. Each step's batch is a pure function of
the step number, as a resumable data loader provides. The crash can come between steps or in the middle
of ``optimizer.step`` (some tensors already updated, others not): the live objects are then thrown away
and a fresh process-like set is rebuilt from the checkpoint.
"""

from __future__ import annotations

import io
import warnings

import pytest
import torch

import slimopt
from slimopt.registry import spec
from test_conformance import ToyModel, loss_fn

NAMES = slimopt.get_supported_optimizers()
STEPS, EVERY = 6, 2



def batch(step: int, dtype: torch.dtype):
    g = torch.Generator().manual_seed(1000 + step)
    tokens = torch.randint(0, 32, (32,), generator=g)
    x = torch.randn(32, 16, generator=g)
    target = torch.sin(x[:, :4].sum(-1)) + 0.1 * (tokens % 5).float()
    return tokens, x.to(dtype), target.to(dtype)


def fresh(name: str, dtype: torch.dtype, seed: int = 0):
    torch.manual_seed(seed)
    model = ToyModel().to(dtype)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        opt = slimopt.create_optimizer(model, name, lr=spec(name).example_lr, weight_decay=0.01)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda s: 1.0 / (1.0 + 0.3 * s))
    return model, opt, sched


def one_step(model, opt, sched, step: int, dtype: torch.dtype) -> None:
    opt.zero_grad(set_to_none=True)
    loss_fn(model, batch(step, dtype)).backward()
    opt.step()
    sched.step()


def checkpoint(model, opt, sched, step: int) -> bytes:
    buf = io.BytesIO()
    torch.save({"step": step, "model": model.state_dict(), "optim": opt.state_dict(),
                "sched": sched.state_dict()}, buf)
    return buf.getvalue()


def restore(name: str, dtype: torch.dtype, blob: bytes):
    model, opt, sched = fresh(name, dtype, seed=99)  # another init: all must come from the checkpoint
    ckpt = torch.load(io.BytesIO(blob), weights_only=True)
    model.load_state_dict(ckpt["model"])
    opt.load_state_dict(ckpt["optim"])
    sched.load_state_dict(ckpt["sched"])
    return model, opt, sched, ckpt["step"]


def final_bits(model, opt) -> tuple[list[torch.Tensor], bytes]:
    buf = io.BytesIO()
    torch.save(opt.state_dict(), buf)
    return [p.detach().clone() for p in model.parameters()], buf.getvalue()


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["fp32", "bf16"])
@pytest.mark.parametrize("name", NAMES)
def test_interrupt_at_any_step_and_resume_is_bit_exact(name, dtype):
    # The uninterrupted run, writing a checkpoint every EVERY steps (and one before the first step).
    model, opt, sched = fresh(name, dtype)
    checkpoints = {0: checkpoint(model, opt, sched, 0)}
    for step in range(1, STEPS + 1):
        one_step(model, opt, sched, step, dtype)
        if step % EVERY == 0:
            checkpoints[step] = checkpoint(model, opt, sched, step)
    reference_params, reference_state = final_bits(model, opt)

    for crash_after in range(1, STEPS):
        last = max(s for s in checkpoints if s <= crash_after)
        model, opt, sched, step = restore(name, dtype, checkpoints[last])
        assert step == last
        for step in range(last + 1, STEPS + 1):
            one_step(model, opt, sched, step, dtype)
        params, state = final_bits(model, opt)
        for (n, _), a, b in zip(ToyModel().named_parameters(), params, reference_params):
            assert torch.equal(a, b), f"{name}: {n} differs after a crash after step {crash_after}"
        assert state == reference_state, f"{name}: optimizer state differs (crash after step {crash_after})"


class Crash(RuntimeError):
    pass


@pytest.mark.parametrize("name", NAMES)
def test_crash_inside_step_then_resume_is_bit_exact(name):
    """The process dies half-way through ``optimizer.step`` (the first param group updated, or the first
    tensors of it): the checkpoint on disk is intact and resuming from it gives the uninterrupted bits."""
    dtype = torch.float32
    model, opt, sched = fresh(name, dtype)
    one_step(model, opt, sched, 1, dtype)
    blob = checkpoint(model, opt, sched, 1)
    for step in (2, 3):
        one_step(model, opt, sched, step, dtype)
    reference_params, reference_state = final_bits(model, opt)

    model, opt, sched, _ = restore(name, dtype, blob)
    opt.zero_grad()
    loss_fn(model, batch(2, dtype)).backward()
    touched = []
    real_update = getattr(opt, "update_group", None)
    if real_update is not None:  # slimopt optimizers: die after the first group's update
        def update_then_crash(group):
            real_update(group)
            touched.append(group)
            raise Crash

        opt.update_group = update_then_crash
    else:  # torch AdamW: die after it updated everything but before the scheduler and the next save
        opt.register_step_post_hook(lambda *a: (_ for _ in ()).throw(Crash()))
    with pytest.raises(Crash):
        opt.step()
    del model, opt, sched  # the live objects are gone with the process

    model, opt, sched, step = restore(name, dtype, blob)
    for step in (2, 3):
        one_step(model, opt, sched, step, dtype)
    params, state = final_bits(model, opt)
    assert all(torch.equal(a, b) for a, b in zip(params, reference_params))
    assert state == reference_state
    assert touched or real_update is None
