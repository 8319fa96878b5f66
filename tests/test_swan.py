"""SWAN: GradNorm + GradWhitening against a float64 SVD reference, routing, state, stability."""

from __future__ import annotations

import math

import pytest
import torch
from torch import nn

import slimopt
from slimopt import SWAN
from slimopt.bench.model import build_model
from slimopt.ops.newton_schulz import DEFAULT_ITERS, whiten_cutoff_reference, whiten_reference
from slimopt.optim.hybrid import ADAMW, STATELESS
from slimopt.optim.swan import swan_direction


def well_conditioned_gradient(m, n, seed=0):
    """A gradient whose row-standardised version has singular values within a small range."""
    g = torch.Generator().manual_seed(seed)
    return torch.randn(m, n, generator=g) * torch.rand(m, 1, generator=g).add(0.5) + torch.rand(m, 1, generator=g)


def reference_direction(grad, rescale=True, iters=None, exact=False):
    """Algorithm 1 in float64: row standardisation, the whitening's definition U F(S / s) V^T by SVD (or
    the exact U V^T), optional RMS-1 rescale (rows = short side)."""
    g = grad.double()
    tall = g.shape[0] > g.shape[1]
    if tall:
        g = g.t()
    g = (g - g.mean(dim=1, keepdim=True)) / g.std(dim=1, unbiased=False, keepdim=True)
    x = whiten_reference(g) if exact else whiten_cutoff_reference(g, iters)
    if rescale:
        x = x * math.sqrt(x.numel()) / x.norm()
    return x.t() if tall else x


@pytest.mark.parametrize("shape", [(16, 96), (96, 16), (32, 200)], ids=["wide", "tall", "wider"])
def test_whitened_update_matches_svd_and_has_unit_singular_values(shape):
    # Rectangular Gaussian-like gradients: singular values within a factor ~2-4, all far above the cut.
    grad = well_conditioned_gradient(*shape)
    # fp32 iteration against the float64 SVD of the same definition, on unit-scale entries.
    x = swan_direction(grad, DEFAULT_ITERS, rescale=False)
    torch.testing.assert_close(x.double(), reference_direction(grad, rescale=False), rtol=0, atol=5e-5)
    s = torch.linalg.svdvals(x.double())
    assert ((s - 1).abs() <= 0.03).all()  # the default: within 3% of 1
    torch.testing.assert_close(swan_direction(grad, DEFAULT_ITERS).double(), reference_direction(grad), rtol=0,
                               atol=5e-5 * math.sqrt(max(shape)))
    # Three polishing steps more: the paper's U V^T itself.
    x = swan_direction(grad, DEFAULT_ITERS + 3, rescale=False)
    s = torch.linalg.svdvals(x.double())
    torch.testing.assert_close(s, torch.ones_like(s), rtol=0, atol=5e-5)
    torch.testing.assert_close(x.double(), reference_direction(grad, rescale=False, exact=True), rtol=0, atol=5e-5)


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
    assert (reference_direction(grad, rescale=False, exact=True) - plain).norm() > 0.1 * plain.norm()


def rank_deficient_gradient(m, n, rank, seed=0):
    """A sum of ``rank`` outer products (``rank`` tokens' worth of a linear layer's gradient)."""
    g = torch.Generator().manual_seed(seed)
    return torch.randn(m, rank, generator=g) @ torch.randn(rank, n, generator=g)


@pytest.mark.parametrize("shape, rank", [((64, 64), 16), ((32, 128), 8), ((128, 48), 12)])
def test_update_of_a_rank_deficient_gradient_is_stable(shape, rank):
    # The stability target (<= 1e-2 under a 1e-6 relative perturbation), through GradNorm;
    # measured <= 5e-4. Row centring makes the square one's rank 15 (the all-ones direction is removed).
    grad = rank_deficient_gradient(*shape, rank)
    gen = torch.Generator().manual_seed(5)
    noise = torch.randn(shape, generator=gen)
    perturbed = grad + noise * (1e-6 * grad.norm() / noise.norm())
    x = swan_direction(grad, DEFAULT_ITERS)
    assert ((swan_direction(perturbed, DEFAULT_ITERS) - x).norm() / x.norm()).item() <= 1e-3
    torch.testing.assert_close(x.double(), reference_direction(grad), rtol=0, atol=1e-4 * math.sqrt(max(shape)))


def test_tf32_option_is_kept_and_older_groups_default_to_it():
    w = nn.Parameter(torch.randn(12, 40))
    opt = SWAN([w], tf32=False)
    assert opt.param_groups[0]["tf32"] is False
    del opt.param_groups[0]["tf32"]  # a param group saved before the option existed
    w.grad = well_conditioned_gradient(12, 40)
    opt.step()
    assert torch.isfinite(w).all()


def test_a_state_dict_saved_before_the_tf32_option_loads():
    """0.1 saved SWAN's groups without ``tf32``: they load and take this optimizer's setting; the other keys are
    still checked."""
    w, bias = nn.Parameter(torch.randn(12, 40)), nn.Parameter(torch.randn(40))
    opt = SWAN([("q_proj.weight", w), ("norm.weight", bias)], lr=0.01, tf32=False)
    w.grad, bias.grad = well_conditioned_gradient(12, 40), torch.randn(40)
    opt.step()
    saved = opt.state_dict()
    for group in saved["param_groups"]:
        group.pop("tf32", None)
    opt.load_state_dict(saved)
    assert opt.param_groups[0]["update"] == "stateless" and opt.param_groups[0]["tf32"] is False
    assert len(opt.state) == 1  # the norm's AdamW state came back
    del saved["param_groups"][0]["ns_iters"]
    with pytest.raises(ValueError, match="lacks ns_iters"):
        opt.load_state_dict(saved)


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


# -- the stacked path against the per-matrix reference ---------------------------------------------------
#
# SWAN.update_matrices stacks the matrices whose short x long shape is the same (a tall one transposed),
# standardises them with one reduction per statistic (row_standardize_stacked_, the variance as a norm)
# and whitens them as one batch without whiten's max-abs/Frobenius prologue (whiten_stacked_ on the
# standardised stack divided by sqrt(mn)); update_matrix, one matrix at a time (swan_direction), is the
# reference. Both are fp32; the input to the polar iteration differs by rounding (~1e-7 relative), and the
# iteration amplifies that along the small singular directions (the newton_schulz docstring): measured
# <= 1.2e-5 of the step size on these well-conditioned gradients, hence atol = 5e-5 * step. rtol: 4 fp32
# ulps of W (decay factor rounded from a double vs fp32 products, the final rounding, a GPU's FMA).
from _hybrid_twins import FP32_ULP, step_in_lockstep  # noqa: E402
from _hybrid_twins import twins as _twins  # noqa: E402


def twins(shapes, dtype=torch.float32, seed=0, **kwargs):
    return _twins(SWAN, shapes, dtype, seed, **kwargs)


def set_grads(a, b, seed):
    for i, (x, y) in enumerate(zip(a, b)):
        grad = well_conditioned_gradient(*x.shape, seed=seed * 100 + i) if x.numel() else torch.zeros(x.shape)
        x.grad, y.grad = grad.to(x.dtype), grad.to(x.dtype).clone()


# one bucket of (12, 40) and (40, 12) matrices (tall ones whitened transposed), odd shapes, a single row
# and a single column (one bucket), empty matrices. No square matrix: its standardised rows are singular
# (centring removes a direction), and that null direction's fp32 noise, whitened, is not a reproducible
# quantity (the newton_schulz docstring); the two paths agree there only to ~1e-3 of the step.
MIXED = [(40, 12), (12, 40), (40, 12), (12, 40), (12, 40), (21, 23), (23, 21), (1, 9), (9, 1), (0, 5), (7, 0)]


@pytest.mark.parametrize("weight_decay", [0.0, 0.1], ids=["no_wd", "wd"])
@pytest.mark.parametrize("tensor_lr", [False, True], ids=["float_lr", "tensor_lr"])
@pytest.mark.parametrize("options", [{}, {"rescale": False}, {"stack_numel": 1000}],
                         ids=["default", "no_rescale", "chunked"])
def test_stacked_path_equals_the_per_matrix_reference_fp32(weight_decay, tensor_lr, options):
    options = dict(options)
    stack_numel = options.pop("stack_numel", None)
    lr = torch.tensor(0.1) if tensor_lr else 0.1
    a, opt_a, b, opt_b = twins(MIXED, lr=lr, scale=0.5, weight_decay=weight_decay, **options)
    if stack_numel:  # 1000 elements: two matrices of the (12, 40) bucket per stack, tall and wide mixed
        opt_a.stack_numel = {"cpu": stack_numel}
    step_in_lockstep(a, opt_a, b, opt_b, set_grads, atol=5e-5 * 0.05)
    assert len(opt_a.state) == 0


def test_stacked_path_equals_the_per_matrix_reference_bf16():
    a, opt_a, b, opt_b = twins(MIXED, dtype=torch.bfloat16, seed=2, lr=0.1, scale=0.5)
    set_grads(a, b, seed=9)
    opt_a.step()
    opt_b.step()
    for x, y in zip(a, b):
        assert x.dtype == torch.bfloat16
        torch.testing.assert_close(x, y, rtol=2.0**-7, atol=1e-6)  # at most one bf16 rounding apart


def test_a_nonfinite_update_leaves_that_weight_unchanged(monkeypatch):
    """Force the whitening to return NaN for one matrix of a bucket: that weight is not touched (nor
    decayed), the others step as the reference steps them, nothing non-finite is written."""
    import slimopt.optim.swan as swan_module

    real_stacked, real_whiten = swan_module.whiten_stacked_, swan_module.whiten

    def poisoned_stacked(x, iters=None, **kwargs):
        out = real_stacked(x, iters, **kwargs)
        out[1, 0, 0] = float("nan")  # the second matrix of the stack
        return out

    calls = []

    def poisoned_whiten(g, iters=None, **kwargs):
        out = real_whiten(g, iters, **kwargs)
        calls.append(out)
        if len(calls) % 3 == 2:  # the second matrix of each step
            out[0, 0] = float("inf")
        return out

    a, opt_a, b, opt_b = twins([(12, 40)] * 3, lr=0.1, scale=0.5, weight_decay=0.1)
    set_grads(a, b, seed=4)
    before = [p.detach().clone() for p in a]
    monkeypatch.setattr(swan_module, "whiten_stacked_", poisoned_stacked)
    monkeypatch.setattr(swan_module, "whiten", poisoned_whiten)
    opt_a.step()
    opt_b.step()
    for params in (a, b):
        assert torch.equal(params[1], before[1])
        assert all(torch.isfinite(p).all() for p in params)
    for i in (0, 2):
        assert not torch.equal(a[i], before[i])
        torch.testing.assert_close(a[i], b[i], rtol=4 * FP32_ULP, atol=5e-5 * 0.05)


def test_skip_policy_leaves_a_matrix_with_a_nonfinite_gradient_alone():
    a, opt_a, _, _ = twins([(40, 12), (12, 40), (12, 40)], lr=0.1, weight_decay=0.1, nonfinite="skip")
    set_grads(a, a, seed=6)
    a[0].grad[5, 5] = float("nan")
    a[2].grad[0, 1] = -float("inf")
    before = [p.detach().clone() for p in a]
    opt_a.step()
    assert torch.equal(a[0], before[0]) and torch.equal(a[2], before[2])
    assert not torch.equal(a[1], before[1]) and torch.isfinite(a[1]).all()


def test_tall_matrices_are_standardised_along_their_columns():
    """The module docstring's convention, on the stacked path: a tall matrix's update is that of its
    transpose (each column of G standardised over the long side, then whitened)."""
    g = well_conditioned_gradient(12, 40, seed=8)
    w_wide = nn.Parameter(torch.zeros(12, 40))
    w_tall = nn.Parameter(torch.zeros(40, 12))
    opt = SWAN([{"params": [w_wide, w_tall], "update": "stateless"}], lr=1.0, scale=1.0)
    w_wide.grad, w_tall.grad = g, g.t().contiguous()
    opt.step()
    assert torch.equal(w_tall, w_wide.t())  # the same stack row, transposed back
    torch.testing.assert_close(-w_tall.detach().double(), reference_direction(g.t()), rtol=0, atol=1e-4)


NONFINITE_SETTINGS = [dict(ns_iters=k, rescale=r, weight_decay=wd) for k in (1, 2, 5, 6, 12) for r in (True, False)
                      for wd in (0.0, 0.1)]


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("settings", NONFINITE_SETTINGS, ids=lambda s: "-".join(f"{k}{v}" for k, v in s.items()))
def test_no_setting_writes_a_nonfinite_weight(settings, dtype):
    """Gradients from fp32's subnormal range to near its overflow, zero, constant, rank-one and rank-
    deficient ones, and a NaN (skipped), on the stacked path and the per-matrix reference."""
    grads = [rank_deficient_gradient(12, 40, 1) * 1e-41, rank_deficient_gradient(40, 12, 3) * 3e37,
             torch.zeros(12, 40), torch.full((40, 12), 7.0), rank_deficient_gradient(12, 40, 4),
             well_conditioned_gradient(40, 12), well_conditioned_gradient(12, 40)]
    grads[-1][3, 3] = float("nan")
    shapes = [tuple(g.shape) for g in grads]
    a, opt_a, b, opt_b = twins(shapes, dtype=dtype, lr=0.5, scale=1.0, nonfinite="skip", **settings)
    for params in (a, b):
        for p, g in zip(params, grads):
            p.grad = g.to(dtype)
    before = [p.detach().clone() for p in a]
    opt_a.step()
    opt_b.step()
    for params in (a, b):
        assert all(torch.isfinite(p).all() for p in params)
        assert torch.equal(params[-1], before[-1])  # the NaN gradient's matrix: untouched
    assert not torch.equal(a[4], before[4]) and not torch.equal(b[4], before[4])
