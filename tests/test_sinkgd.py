"""SinkGD: the update against the paper's algorithm written out, routing, AdamW fallback, state."""

from __future__ import annotations

import math

import pytest
import torch
from torch import nn

import slimopt
from slimopt import SinkGD
from slimopt.bench.model import build_model
from slimopt.ops.normalize import sr_sinkhorn_reference
from slimopt.optim.hybrid import ADAMW, STATELESS

HIDDEN = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")


def tiny_llama():
    torch.manual_seed(0)
    return build_model("tiny")


def lm_loss(model, seed=0):
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(0, model.config.vocab_size, (2, 16), generator=g)
    logits = model(ids)
    return nn.functional.cross_entropy(logits[:, :-1].flatten(0, 1).float(), ids[:, 1:].flatten())


def naive_sinkgd_step(w, g, lr, scale, iters, weight_decay=0.0):
    """Algorithm 4 written out with the L-copies reference, in float64."""
    x = sr_sinkhorn_reference(g.double(), iters).double()
    return w.double() * (1 - lr * scale * weight_decay) - lr * scale * x


@pytest.mark.parametrize("shape", [(24, 40), (40, 24)], ids=["wide", "tall"])
def test_matrix_update_is_algorithm_4(shape):
    gen = torch.Generator().manual_seed(0)
    w = nn.Parameter(torch.randn(shape, generator=gen))
    opt = SinkGD([w], lr=0.1, iters=5, scale=0.5, weight_decay=0.2)
    for _ in range(3):
        w0 = w.detach().clone()
        w.grad = torch.randn(shape, generator=gen) * torch.rand(shape[0], 1, generator=gen) * 10
        opt.step()
        # fp32 against float64 of a unit-RMS update times 0.05: ~1e-6 absolute.
        torch.testing.assert_close(w.detach().double(), naive_sinkgd_step(w0, w.grad, 0.1, 0.5, 5, 0.2),
                                   rtol=0, atol=2e-6)
    assert len(opt.state) == 0  # stateless: not even a step counter


def test_update_has_entry_rms_one_times_step_size():
    w = nn.Parameter(torch.zeros(30, 50))
    w.grad = torch.randn(30, 50)
    SinkGD([w], lr=0.02, scale=0.05).step()
    # Last step normalises columns to sqrt(m): ||X||_F = sqrt(mn) exactly, so RMS(step) = lr * scale.
    torch.testing.assert_close(w.detach().square().mean().sqrt(), torch.tensor(1e-3), rtol=1e-5, atol=0)


def test_bf16_params_zero_rows_and_no_nan():
    w = nn.Parameter(torch.randn(16, 12).bfloat16())
    g = torch.randn(16, 12).bfloat16()
    g[2] = 0
    g[:, 7] = 0
    w0 = w.detach().clone()
    w.grad = g
    SinkGD([w], lr=0.1, scale=1.0).step()
    assert w.dtype == torch.bfloat16 and torch.isfinite(w).all()
    assert torch.equal(w[2], w0[2]) and torch.equal(w[:, 7], w0[:, 7])
    expected = (w0.double() - 0.1 * sr_sinkhorn_reference(g.float(), 5).double()).bfloat16()
    torch.testing.assert_close(w.detach(), expected, rtol=0, atol=2e-2)  # within one bf16 rounding


def test_from_model_routes_hidden_matrices_stateless_and_the_rest_to_adamw(capsys):
    model = tiny_llama()
    opt = slimopt.create_optimizer(model, "sinkgd", lr=0.02, print_plan=True)
    table = capsys.readouterr().out
    assert "embed_tokens.weight" in table and "stateless" in table
    routes = {n: g["update"] for g in opt.param_groups for n in g["param_names"]}
    assert set(routes) == {n for n, _ in model.named_parameters()}
    for name, update in routes.items():
        expected = STATELESS if any(h in name for h in HIDDEN) else ADAMW
        assert update == expected, name
    assert routes["embed_tokens.weight"] == routes["lm_head.weight"] == routes["norm.weight"] == ADAMW
    assert opt.plan is not None and "sinkgd/swan routing" in opt.plan.table()
    assert "elements stateless" in opt.routing_table()


def test_adamw_part_equals_torch_adamw_and_state_bytes_count_only_it():
    model = tiny_llama()
    opt = slimopt.create_optimizer(model, "sinkgd", lr=0.01, weight_decay=0.0, adamw_lr=3e-3,
                                   adamw_betas=(0.8, 0.95), adamw_eps=1e-7, adamw_weight_decay=0.1)
    adamw_names = [n for g in opt.param_groups if g["update"] == ADAMW for n in g["param_names"]]
    twin = {n: nn.Parameter(p.detach().clone()) for n, p in model.named_parameters() if n in adamw_names}
    # The fallback runs torch's fused AdamW kernel on CPU (1 ulp from the for-loop: tests/test_ops_adamw.py)
    ref = torch.optim.AdamW(list(twin.values()), lr=3e-3, betas=(0.8, 0.95), eps=1e-7, weight_decay=0.1,
                            fused=True)
    params = dict(model.named_parameters())
    for step in range(3):
        opt.zero_grad()
        lm_loss(model, seed=step).backward()
        for n, p in twin.items():
            p.grad = params[n].grad.clone()
        opt.step()
        ref.step()
    for n, p in twin.items():
        assert torch.equal(params[n].detach(), p.detach()), n
    adamw_numel = sum(p.numel() for p in twin.values())
    assert slimopt.state_bytes(opt) == 2 * 4 * adamw_numel + 4 * len(twin)  # m, v in fp32 + step counters
    for g in opt.param_groups:
        if g["update"] == STATELESS:
            assert all(p not in opt.state or not opt.state[p] for p in g["params"])


def test_marked_groups_and_auto_groups():
    gen = torch.Generator().manual_seed(1)
    a = nn.Parameter(torch.randn(8, 6, generator=gen))
    b = nn.Parameter(torch.randn(8, 6, generator=gen))
    c = nn.Parameter(torch.randn(6, generator=gen))
    opt = SinkGD([{"params": [a], "use_adamw": True}, {"params": [b, c]}], lr=0.01)
    updates = [(g["update"], len(g["params"])) for g in opt.param_groups]
    assert updates == [(ADAMW, 1), (STATELESS, 1), (ADAMW, 1)]  # the auto group split by shape
    opt2 = SinkGD([{"params": [a], "update": "stateless"}], lr=0.01)
    assert opt2.param_groups[0]["update"] == STATELESS
    with pytest.raises(ValueError, match="update"):
        SinkGD([{"params": [a], "update": "sgd"}])
    with pytest.raises(RuntimeError, match="needs a matrix"):
        opt3 = SinkGD([{"params": [c], "update": "stateless"}])
        c.grad = torch.ones_like(c)
        opt3.step()


def test_named_parameters_route_by_name_without_from_model():
    model = tiny_llama()
    opt = SinkGD(model.named_parameters(), lr=0.02)
    routes = {n: g["update"] for g in opt.param_groups for n in g["param_names"]}
    assert routes["embed_tokens.weight"] == ADAMW and routes["layers.0.mlp.up_proj.weight"] == STATELESS


def test_adamw_lr_defaults_to_the_group_lr_and_follows_schedulers():
    model = tiny_llama()
    opt = slimopt.create_optimizer(model, "sinkgd", lr=0.04)
    assert {g["lr"] for g in opt.param_groups} == {0.04}
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda s: 0.5)
    opt.step()  # no gradients: a no-op, but keeps the scheduler's order check quiet
    sched.step()
    assert {g["lr"] for g in opt.param_groups} == {0.02}


def test_conv_weights_as_matrices():
    torch.manual_seed(2)
    model = nn.Sequential(nn.Conv2d(3, 8, 3), nn.Flatten(), nn.LazyLinear(4))
    model(torch.randn(1, 3, 6, 6))
    default = SinkGD(model.named_parameters(), lr=0.1)
    assert [g["update"] for g in default.param_groups if any(p is model[0].weight for p in g["params"])] == [ADAMW]
    opt = SinkGD(model.named_parameters(), lr=0.1, scale=1.0, conv_as_matrix=True)
    w = model[0].weight
    assert [g["update"] for g in opt.param_groups if any(p is w for p in g["params"])] == [STATELESS]
    w0 = w.detach().clone()
    w.grad = torch.randn_like(w)
    opt.step()
    expected = w0.reshape(8, -1).double() - 0.1 * sr_sinkhorn_reference(w.grad.reshape(8, -1), 5).double()
    torch.testing.assert_close(w.detach().reshape(8, -1).double(), expected, rtol=0, atol=2e-6)


def test_gpt2_conv1d_layout_is_normalised_as_out_by_in():
    class Conv1D(nn.Module):  # GPT-2 stores (in, out)
        def __init__(self, n_in, n_out):
            super().__init__()
            self.weight = nn.Parameter(torch.randn(n_in, n_out))

    class Block(nn.Module):
        def __init__(self):
            super().__init__()
            self.mlp = nn.Module()
            self.mlp.c_fc = Conv1D(6, 10)
            self.mlp.c_proj = Conv1D(10, 10)  # square: only the layout, not the shape, says (in, out)

    model = Block()
    opt = SinkGD.from_model(model, lr=0.1, scale=1.0, iters=1)
    assert opt.param_groups[0]["param_layouts"][0]["out_dim"] == 1
    w = model.mlp.c_fc.weight
    w0 = w.detach().clone()
    w.grad = torch.randn_like(w)
    opt.step()
    # rows of the (out, in) view are w's columns: after one round they have norm sqrt(in) ... then columns
    expected = w0.t().double() - 0.1 * sr_sinkhorn_reference(w.grad.t(), 1).double()
    torch.testing.assert_close(w.detach().t().double(), expected, rtol=0, atol=2e-6)
    sq = model.mlp.c_proj.weight
    sq0 = sq.detach().clone()
    sq.grad = torch.randn_like(sq) * torch.rand(10, 1)  # rows of (in, out) storage scaled differently
    w.grad = None
    opt.step()
    expected = sq0.t().double() - 0.1 * sr_sinkhorn_reference(sq.grad.t(), 1).double()
    torch.testing.assert_close(sq.detach().t().double(), expected, rtol=0, atol=2e-6)


@pytest.mark.parametrize("kwargs, argument", [({"iters": 0}, "iters"), ({"scale": 0.0}, "scale"),
                                              ({"eps": -1.0}, "eps"), ({"adamw_lr": -1.0}, "adamw_lr"),
                                              ({"adamw_betas": (0.9, 1.0)}, "adamw_betas"),
                                              ({"adamw_weight_decay": -1.0}, "adamw_weight_decay")])
def test_invalid_hyperparameters_name_the_argument(kwargs, argument):
    with pytest.raises(ValueError, match=argument):
        SinkGD([nn.Parameter(torch.zeros(2, 2))], **kwargs)


def test_trains_a_tiny_llama():
    model = tiny_llama()
    opt = slimopt.create_optimizer(model, "sinkgd", lr=0.02, scale=0.25)
    first = lm_loss(model).item()
    for _ in range(30):
        opt.zero_grad()
        loss = lm_loss(model)  # one fixed batch: the loss must fall
        loss.backward()
        opt.step()
    assert math.isfinite(loss.item()) and loss.item() < 0.6 * first
