"""slimopt.core.distributed on one process: every helper is a no-op (or the obvious reduction) for plain
tensors, rebind_params swaps by name, and the communication planner counts what the rules say.
The multi-rank behaviour is tested in tests/test_distributed.py."""

from __future__ import annotations

import warnings

import pytest
import torch
from torch import nn

import slimopt
from slimopt.bench.model import build_model
from slimopt.comm import comm_bytes_per_step
from slimopt.core import distributed as sd


def test_helpers_are_identities_on_plain_tensors():
    torch.manual_seed(0)
    x = torch.randn(5, 3, dtype=torch.float64)
    assert sd.local(x) is x and sd.full(x) is x and sd.local_part(x, x) is x
    assert not sd.is_sharded(x)
    assert sd.global_shape(x) == (5, 3) and sd.local_offset(x) == (0, 0) and sd.local_rows(x) == (0, 5)
    assert sd.shard_sizes(x) == [5] and sd.padded_rows(x) == 5
    assert torch.equal(sd.local_slice(torch.arange(3), x, 1), torch.arange(3))
    # the reductions against their definitions, in float64 for float64 input
    torch.testing.assert_close(sd.sq_sum(x), (x * x).sum(), rtol=1e-14, atol=0)
    torch.testing.assert_close(sd.sq_sums_along(x, dim=0), (x * x).sum(1), rtol=1e-14, atol=0)
    torch.testing.assert_close(sd.column_sq_sums(x), (x * x).sum(0), rtol=1e-14, atol=0)
    torch.testing.assert_close(sd.row_sq_sums(x), (x * x).sum(1), rtol=1e-14, atol=0)
    torch.testing.assert_close(sd.gram(x), x.T @ x, rtol=1e-14, atol=0)
    complete = sd.partial_sums(x)
    partial = torch.ones(3)
    assert complete(partial, (0,)) is partial


def test_exactly_finite_per_tensor():
    grads = [torch.zeros(3), torch.tensor([1.0, float("nan")]), torch.tensor([float("inf")]), torch.ones(2, 2)]
    assert sd.exactly_finite(grads) == [True, False, False, True]
    assert sd.exactly_finite([]) == []


def test_padded_local_yields_the_tensors_themselves_when_unsharded():
    p, g = torch.zeros(4, 2), torch.ones(4, 2)
    with sd.padded_local(p, g) as (pw, gw):
        assert pw is p and gw is g


def test_rebind_params_swaps_by_name_and_refuses_state():
    model = nn.Sequential(nn.Linear(3, 4), nn.Linear(4, 2))
    opt = slimopt.MicroAdam(list(model.named_parameters()), lr=1e-2)
    fresh = nn.Sequential(nn.Linear(3, 4), nn.Linear(4, 2))  # stands in for the sharded model
    assert sd.rebind_params(opt, fresh) == 4
    assert [id(p) for p in opt.param_groups[0]["params"]] == [id(p) for p in fresh.parameters()]
    fresh(torch.randn(2, 3)).sum().backward()
    opt.step()
    with pytest.raises(RuntimeError, match="already has state"):
        sd.rebind_params(opt, model)
    unnamed = torch.optim.AdamW(model.parameters())
    with pytest.raises(ValueError, match="param_names"):
        sd.rebind_params(unnamed, model)


def test_comm_plan_is_zero_unsharded_and_follows_each_rule_when_planned():
    with torch.device("meta"):
        model = build_model("tiny")
    cfg = model.config
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        opts = {name: slimopt.create_optimizer(model, name, lr=1e-3) for name in slimopt.get_supported_optimizers()}
    for opt in opts.values():
        assert comm_bytes_per_step(opt)["total"] == 0  # DDP / one device: nothing added
    world = 4
    n_tensors = sum(1 for _ in model.parameters())
    planned = {name: comm_bytes_per_step(opt, world=world) for name, opt in opts.items()}
    assert planned["adamw"]["total"] == 0
    assert planned["microadam"] == {"finite": 4 * n_tensors, "total": 4 * n_tensors}
    # Adam-mini: per tensor, one fp32 value per output neuron (rows, heads, ...) or one for a whole tensor
    mini = opts["adammini"]
    expected = sum(4 * (1 if lay["rule"] == "whole" else p.shape[lay["out_dim"]])
                   for g in mini.param_groups for p, lay in zip(g["params"], g["param_layouts"])
                   if lay["rule"] != "elementwise")
    assert planned["adammini"]["sq_sums"] + planned["adammini"].get("sq_sum", 0) == expected
    # SinkGD: per hidden matrix (m, n), L all-reduces of n column sums plus one scalar
    hidden = [p for g in opts["sinkgd"].param_groups if g["update"] == "stateless" for p in g["params"]]
    assert len(hidden) == 7 * cfg.num_hidden_layers
    assert planned["sinkgd"]["sums"] == sum(4 * (5 * p.shape[1] + 1) for p in hidden)
    # SWAN: the rows of each hidden matrix this rank does not hold (rank 0 holds ceil(m / world) rows)
    assert planned["swan"]["gather"] == sum((p.shape[0] - -(-p.shape[0] // world)) * p.shape[1] * 4 for p in hidden)
