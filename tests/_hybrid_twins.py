"""Shared by tests/test_sinkgd.py and tests/test_swan.py: the same matrices stepped by the stacked path and
by the per-matrix reference (``update_matrix``) of a hybrid optimizer."""

from __future__ import annotations

import torch
from torch import nn

from slimopt.optim.hybrid import MatrixAdamWHybrid

FP32_ULP = 2.0**-23


def per_matrix(opt):
    """Make ``opt`` update its matrices one at a time, through the reference ``update_matrix``."""
    opt.update_matrices = lambda views, group: MatrixAdamWHybrid.update_matrices(opt, views, group)
    return opt


def twins(cls, shapes, dtype=torch.float32, seed=0, **kwargs):
    """Two copies of the same matrices: one ``cls`` optimizer on the stacked path, one on the per-matrix path."""
    g = torch.Generator().manual_seed(seed)
    values = [torch.randn(s, generator=g).to(dtype) for s in shapes]
    a = [nn.Parameter(v.clone()) for v in values]
    b = [nn.Parameter(v.clone()) for v in values]
    return (a, cls([{"params": a, "update": "stateless"}], **kwargs),
            b, per_matrix(cls([{"params": b, "update": "stateless"}], **kwargs)))


def step_in_lockstep(a, opt_a, b, opt_b, set_grads, atol, steps=3):
    """``steps`` steps of both twins from the same weights and gradients (``set_grads(a, b, seed=step)``);
    after each, the stacked path's weights equal the reference's within 4 fp32 ulps (relative) and ``atol``.
    The reference's weights are reset to the stacked path's before each step, so errors do not compound."""
    for step in range(steps):
        set_grads(a, b, seed=step)
        with torch.no_grad():
            for x, y in zip(a, b):
                y.copy_(x)
        opt_a.step()
        opt_b.step()
        for x, y in zip(a, b):
            torch.testing.assert_close(x, y, rtol=4 * FP32_ULP, atol=atol)
