"""SWAN: GradNorm + GradWhitening against a float64 SVD reference, routing and state."""

from __future__ import annotations

import math

import pytest
import torch
from torch import nn

import slimopt
from slimopt import SWAN
from slimopt.bench.model import build_model
from slimopt.ops.newton_schulz import whiten_reference
from slimopt.optim.hybrid import ADAMW, STATELESS
from slimopt.optim.swan import swan_direction


def well_conditioned_gradient(m, n, seed=0):
    """A gradient whose row-standardised version has singular values within a small range."""
    g = torch.Generator().manual_seed(seed)
    return torch.randn(m, n, generator=g) * torch.rand(m, 1, generator=g).add(0.5) + torch.rand(m, 1, generator=g)


def reference_direction(grad, rescale=True):
    """Algorithm 1 in float64: row standardisation, U V^T by SVD, optional RMS-1 rescale (rows = short side)."""
    g = grad.double()
    tall = g.shape[0] > g.shape[1]
    if tall:
        g = g.t()
    g = (g - g.mean(dim=1, keepdim=True)) / g.std(dim=1, unbiased=False, keepdim=True)
    x = whiten_reference(g)
    if rescale:
        x = x * math.sqrt(x.numel()) / x.norm()
    return x.t() if tall else x


@pytest.mark.parametrize("shape", [(16, 96), (96, 16), (32, 200)], ids=["wide", "tall", "wider"])
def test_whitened_update_matches_svd_and_has_unit_singular_values(shape):
    # Rectangular Gaussian-like gradients: singular values within a factor ~2-4, where the default 10
    # Newton-Schulz steps converge (a square Gaussian has near-zero singular values and would not).
    grad = well_conditioned_gradient(*shape)
    x = swan_direction(grad, 10, rescale=False)
    s = torch.linalg.svdvals(x.double())
    # fp32 Newton-Schulz against float64 SVD on unit-scale entries.
    torch.testing.assert_close(s, torch.ones_like(s), rtol=0, atol=5e-5)
    torch.testing.assert_close(x.double(), reference_direction(grad, rescale=False), rtol=0, atol=5e-5)
    torch.testing.assert_close(swan_direction(grad, 10).double(), reference_direction(grad), rtol=0,
                               atol=5e-5 * math.sqrt(max(shape)))


def test_step_is_algorithm_1_and_stateless():
    gen = torch.Generator().manual_seed(1)
    w = nn.Parameter(torch.randn(12, 48, generator=gen))
    opt = SWAN([w], lr=0.1, scale=0.5, weight_decay=0.1)
    for seed in range(3):
        w0 = w.detach().double().clone()
        w.grad = well_conditioned_gradient(12, 48, seed=seed)
        opt.step()
        expected = w0 * (1 - 0.05 * 0.1) - 0.05 * reference_direction(w.grad)
        torch.testing.assert_close(w.detach().double(), expected, rtol=0, atol=1e-5)
    assert len(opt.state) == 0


def test_gradnorm_is_not_a_no_op_before_whitening():
    grad = well_conditioned_gradient(8, 64) * torch.logspace(-2, 2, 8)[:, None]
    plain = whiten_reference(grad)
    assert (reference_direction(grad, rescale=False) - plain).norm() > 0.1 * plain.norm()


def test_bf16_zero_and_constant_rows_stay_finite():
    w = nn.Parameter(torch.randn(6, 20).bfloat16())
    g = well_conditioned_gradient(6, 20).bfloat16()
    g[1] = 0
    g[4] = 3.0  # constant row: standardised to zero
    w.grad = g
    SWAN([w]).step()
    assert w.dtype == torch.bfloat16 and torch.isfinite(w).all()
    w.grad = torch.zeros_like(w)
    before = w.detach().clone()
    SWAN([w]).step()
    assert torch.equal(w, before)


def test_from_model_routing_and_state_bytes_only_adamw():
    torch.manual_seed(0)
    model = build_model("tiny")
    opt = slimopt.create_optimizer(model, "swan", lr=0.02)
    routes = {n: g["update"] for g in opt.param_groups for n in g["param_names"]}
    assert routes["embed_tokens.weight"] == routes["lm_head.weight"] == routes["norm.weight"] == ADAMW
    assert routes["layers.0.self_attn.q_proj.weight"] == routes["layers.1.mlp.down_proj.weight"] == STATELESS
    ids = torch.randint(0, model.config.vocab_size, (2, 12))
    logits = model(ids)
    nn.functional.cross_entropy(logits.flatten(0, 1), ids.flatten()).backward()
    opt.step()
    adamw = [p for g in opt.param_groups if g["update"] == ADAMW for p in g["params"]]
    assert slimopt.state_bytes(opt) == sum(8 * p.numel() + 4 for p in adamw)


@pytest.mark.parametrize("kwargs, argument", [({"ns_iters": 0}, "ns_iters"), ({"scale": -1.0}, "scale"),
                                              ({"lr": -1.0}, "lr"), ({"weight_decay": -1.0}, "weight_decay")])
def test_invalid_hyperparameters_name_the_argument(kwargs, argument):
    with pytest.raises(ValueError, match=argument):
        SWAN([nn.Parameter(torch.zeros(2, 2))], **kwargs)
