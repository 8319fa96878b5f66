"""Shared by tests/test_sinkgd.py and tests/test_swan.py: the same matrices stepped by the stacked path and
by the per-matrix reference (``update_matrix``) of a hybrid optimizer."""

from __future__ import annotations

import torch
from torch import nn

from slimopt.optim.hybrid import HybridStatelessOptimizer

FP32_ULP = 2.0**-23


def per_matrix(opt):
    """Make ``opt`` update its matrices one at a time, through the reference ``update_matrix``."""
    opt.update_matrices = lambda views, group: HybridStatelessOptimizer.update_matrices(opt, views, group)
    return opt


def twins(cls, shapes, dtype=torch.float32, seed=0, **kwargs):
    """Two copies of the same matrices: one ``cls`` optimizer on the stacked path, one on the per-matrix path."""
    g = torch.Generator().manual_seed(seed)
    values = [torch.randn(s, generator=g).to(dtype) for s in shapes]
    a = [nn.Parameter(v.clone()) for v in values]
    b = [nn.Parameter(v.clone()) for v in values]
    return (a, cls([{"params": a, "update": "stateless"}], **kwargs),
            b, per_matrix(cls([{"params": b, "update": "stateless"}], **kwargs)))
