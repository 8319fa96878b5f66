"""Bad input and faults: non-finite gradients skipped for many steps, and state dicts that do not fit.

The promise under test: a refused state dict raises ``ValueError`` naming what is wrong and leaves the
optimizer *exactly* as it was (its serialised state dict is byte-identical before and after, and the
next steps are the same as if nothing had been attempted). Checks run over every registered slimopt
optimizer (torch's AdamW, the baseline, is not ours to validate).
"""

from __future__ import annotations

import copy
import io
import itertools
import warnings

import pytest
import torch
from torch import nn

import slimopt
from test_conformance import ToyConfig, ToyModel, loss_fn, make, toy_data, train

OURS = [n for n in slimopt.get_supported_optimizers() if n != "adamw"]



def serialised(obj) -> bytes:
    buf = io.BytesIO()
    torch.save(obj, buf)
    return buf.getvalue()


def trained(name: str, steps: int = 3, **kwargs):
    model, opt = make(name, **kwargs)
    train(model, opt, toy_data(), steps=steps)
    return model, opt


def assert_refused_and_untouched(name, model, opt, bad_state_dict, match: str, train_on: bool = False) -> None:
    """Loading ``bad_state_dict`` raises ValueError matching ``match``; afterwards the optimizer holds the
    very same state objects with the same bytes. With ``train_on``, the next two steps also equal those
    of an untouched twin (a copy of the model with a fresh optimizer loaded from the good state dict)."""
    before = serialised(opt.state_dict())
    objects = [(id(group), id(p)) for group in opt.param_groups for p in group["params"]]
    state_objects = {id(p): {k: id(v) for k, v in s.items()} for p, s in opt.state.items()}
    if train_on:
        twin_model = copy.deepcopy(model)
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            twin_opt = slimopt.create_optimizer(twin_model, name, lr=1.0)
        twin_opt.load_state_dict(opt.state_dict())
    with pytest.raises(ValueError, match=match):
        opt.load_state_dict(bad_state_dict)
    assert serialised(opt.state_dict()) == before
    assert objects == [(id(group), id(p)) for group in opt.param_groups for p in group["params"]]
    assert state_objects == {id(p): {k: id(v) for k, v in s.items()} for p, s in opt.state.items()}
    if train_on:
        data = toy_data(seed=5)
        train(model, opt, data, steps=2)
        train(twin_model, twin_opt, data, steps=2)
        for (n, a), b in zip(model.named_parameters(), twin_model.parameters()):
            assert torch.equal(a, b), n


# -- non-finite gradients ---------------------------------------------------------------------------


@pytest.mark.parametrize("name", OURS)
def test_skip_keeps_every_piece_of_state_across_several_steps(name):
    """A tensor whose gradient is non-finite for several steps in a row keeps its value and *all* of its
    state (MicroAdam's window, 4-bit error codes and bucket ranges, Adam-mini's block moments, step
    counters), bit for bit, while the other tensors keep training; then it resumes from where it was."""
    model, opt = trained(name, nonfinite="skip")
    data = toy_data()
    w = model.layers[0].mlp.up_proj.weight
    frozen_w, frozen_state = w.detach().clone(), serialised(opt.state[w])
    other = model.lm_head.weight
    other_state = serialised(opt.state[other])
    for step in range(4):
        before_other = other.detach().clone()
        opt.zero_grad()
        loss_fn(model, data).backward()
        w.grad.view(-1)[step] = (float("nan"), float("inf"), -float("inf"), float("nan"))[step]
        opt.step()
        assert torch.equal(w, frozen_w)
        assert serialised(opt.state[w]) == frozen_state
        assert not torch.equal(other, before_other)
    assert serialised(opt.state[other]) != other_state
    # A finite gradient again: the tensor steps again, its counter counting only applied steps.
    opt.zero_grad()
    loss_fn(model, data).backward()
    opt.step()
    assert not torch.equal(w, frozen_w)
    if "step" in opt.state[w]:  # stateless updates (SinkGD's matrices) keep no counter
        assert int(opt.state[w]["step"]) == 4  # 3 steps before, 4 skipped, 1 after


@pytest.mark.parametrize("name", OURS)
def test_a_step_with_every_gradient_nonfinite_changes_nothing(name):
    model, opt = trained(name, nonfinite="skip")
    params = [p.detach().clone() for p in model.parameters()]
    state = serialised(opt.state_dict())
    for _ in range(3):
        for p in model.parameters():
            p.grad = torch.full_like(p, float("nan"))
        opt.step()
    assert all(torch.equal(a, b) for a, b in zip(params, model.parameters()))
    assert serialised(opt.state_dict()) == state


@pytest.mark.parametrize("name", OURS)
def test_raise_policy_leaves_everything_untouched_after_training(name):
    """Not only on the first step (the conformance suite checks that): with state present too."""
    model, opt = trained(name, nonfinite="raise")
    params = [p.detach().clone() for p in model.parameters()]
    state = serialised(opt.state_dict())
    loss_fn(model, toy_data()).backward()
    model.norm.weight.grad[0] = float("inf")
    with pytest.raises(FloatingPointError, match="norm.weight"):
        opt.step()
    assert all(torch.equal(a, b) for a, b in zip(params, model.parameters()))
    assert serialised(opt.state_dict()) == state


# -- state dicts that do not fit ----------------------------------------------------------------------


@pytest.mark.parametrize("source, target", [(a, b) for a, b in itertools.permutations(["adamw", *OURS], 2)
                                            if b != "adamw"])
def test_state_dict_from_another_optimizer_is_refused(source, target):
    _, other = trained(source)
    model, opt = trained(target)
    assert_refused_and_untouched(target, model, opt, other.state_dict(),
                                 match="another optimizer|keeps|keys|param groups")


@pytest.mark.parametrize("name", OURS)
def test_state_dict_from_another_model_is_refused(name):
    model, opt = trained(name)
    # Same structure, other widths: every count matches, shapes do not.
    torch.manual_seed(0)
    wide = ToyModel(ToyConfig(hidden_size=24, intermediate_size=40, head_dim=12))
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        wide_opt = slimopt.create_optimizer(wide, name, lr=1e-2)
    data = toy_data()
    tokens, x, target = data
    for _ in range(2):
        wide_opt.zero_grad()
        (wide(tokens, torch.randn(len(tokens), 24)) - target).pow(2).mean().backward()
        wide_opt.step()
    assert_refused_and_untouched(name, model, opt, wide_opt.state_dict(),
                                 match="another model|keeps|shape|param groups", train_on=True)


@pytest.mark.parametrize("name", OURS)
def test_state_dict_with_other_parameter_names_is_refused(name):
    model, opt = trained(name)
    sd = opt.state_dict()
    if "param_names" not in sd["param_groups"][0]:
        pytest.skip(f"{name} keeps no parameter names")
    renamed = copy.deepcopy(sd)
    names = renamed["param_groups"][0]["param_names"]
    names[0] = "model.transformer.wte.weight"
    assert_refused_and_untouched(name, model, opt, renamed, match="another model.*wte")


def _first_state_tensor(sd, want=lambda key, t: t.dim() > 0):
    for pid, entry in sd["state"].items():
        for key, value in entry.items():
            if torch.is_tensor(value) and want(key, value):
                return pid, key
    raise AssertionError("no state tensor found")


def _damage(kind: str, sd):
    sd = copy.deepcopy(sd)
    if kind == "truncated tensor":
        pid, key = _first_state_tensor(sd)
        sd["state"][pid][key] = sd["state"][pid][key].flatten()[:-1]
        return sd, "shape"
    if kind == "wrong dtype":
        pid, key = _first_state_tensor(sd)
        t = sd["state"][pid][key]
        sd["state"][pid][key] = t.to(torch.float64 if t.dtype != torch.float64 else torch.float32)
        return sd, "dtype"
    if kind == "missing key":
        pid, key = _first_state_tensor(sd)
        del sd["state"][pid][key]
        return sd, "keys"
    if kind == "extra key":
        pid = next(iter(sd["state"]))
        sd["state"][pid]["exp_avg_sq_typo"] = torch.zeros(3)
        return sd, "keys"
    if kind == "nan in state":
        pid, key = _first_state_tensor(sd, lambda key, t: t.is_floating_point() and t.numel() > 0)
        sd["state"][pid][key].view(-1)[0] = float("nan")
        return sd, "NaN"
    if kind == "state for an unknown parameter":
        sd["state"][999] = copy.deepcopy(next(iter(sd["state"].values())))
        return sd, "no group lists"
    if kind == "missing hyper-parameter":
        del sd["param_groups"][0]["lr"]
        return sd, "lacks lr"
    if kind == "fewer parameters":
        sd["param_groups"][0]["params"] = sd["param_groups"][0]["params"][:-1]
        return sd, "parameters there"
    if kind == "not a state dict":
        return {"model": sd}, "expected a dict"
    raise AssertionError(kind)


DAMAGE = ["truncated tensor", "wrong dtype", "missing key", "extra key", "nan in state",
          "state for an unknown parameter", "missing hyper-parameter", "fewer parameters", "not a state dict"]


@pytest.mark.parametrize("name", OURS)
def test_damaged_state_dict_is_refused(name):
    model, opt = trained(name)
    for kind in DAMAGE:
        bad, match = _damage(kind, opt.state_dict())
        assert_refused_and_untouched(name, model, opt, bad, match=match)


@pytest.mark.parametrize("name", OURS)
def test_damaged_state_dict_is_refused_by_a_fresh_optimizer_too(name):
    """Before its first step an optimizer has no state to compare with: the layout comes from a probe
    step on shape-only tensors."""
    _, trained_opt = trained(name)
    bad, _ = _damage("truncated tensor", trained_opt.state_dict())
    model, fresh = make(name)
    with pytest.raises(ValueError, match="shape"):
        fresh.load_state_dict(bad)
    assert len(fresh.state) == 0
    fresh.load_state_dict(trained_opt.state_dict())  # the undamaged one loads


@pytest.mark.parametrize("name", OURS)
def test_corrupted_checkpoint_file_raises_and_leaves_the_optimizer_alone(name, tmp_path):
    model, opt = trained(name)
    path = tmp_path / "optim.pt"
    torch.save(opt.state_dict(), path)
    blob = path.read_bytes()
    path.write_bytes(blob[: len(blob) // 2])  # a checkpoint cut short by a crash while writing
    before = serialised(opt.state_dict())
    with pytest.raises((RuntimeError, OSError, EOFError)):  # torch.load's own error for a cut zip archive
        opt.load_state_dict(torch.load(path, weights_only=True))
    assert serialised(opt.state_dict()) == before


def test_validation_does_not_refuse_a_checkpoint_from_an_lr_scheduled_run():
    """Schedulers add keys to param groups (``initial_lr``); a checkpoint from a scheduled run must load
    into a fresh optimizer with or without the scheduler attached yet."""
    name = OURS[0]
    model, opt = trained(name)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda s: 0.5)
    train(model, opt, toy_data(), steps=1, scheduler=sched)
    _, fresh = make(name)
    fresh.load_state_dict(opt.state_dict())
    assert fresh.param_groups[0]["initial_lr"] == opt.param_groups[0]["initial_lr"]


def test_adamw_baseline_keeps_torchs_own_load_state_dict():
    """Our validation is on SlimOptimizer only: the registry's "adamw" is torch.optim.AdamW itself, with
    torch's load_state_dict (which, unlike ours, accepts a state of another shape), and round-trips."""
    model = nn.Linear(3, 3)
    opt = slimopt.create_optimizer(model, "adamw", lr=1e-3)
    assert type(opt) is torch.optim.AdamW
    assert type(opt).load_state_dict is torch.optim.Optimizer.load_state_dict
    model(torch.randn(4, 3)).square().sum().backward()
    opt.step()
    fresh = slimopt.create_optimizer(model, "adamw", lr=1e-3)
    fresh.load_state_dict(opt.state_dict())
    for p in model.parameters():
        for key in ("exp_avg", "exp_avg_sq", "step"):
            assert torch.equal(fresh.state[p][key], opt.state[p][key])
    bad = opt.state_dict()
    bad["state"][0]["exp_avg"] = torch.zeros(7)  # a SlimOptimizer refuses this; torch takes it as it is
    fresh.load_state_dict(bad)
    assert fresh.state[model.weight]["exp_avg"].shape == (7,)
