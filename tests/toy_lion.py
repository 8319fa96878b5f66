"""A toy optimizer added the way docs/architecture.md says: this one module and one registry entry.

Lion (Chen et al., 2023, "Symbolic Discovery of Optimization Algorithms", Algorithm 2), per tensor:

    c = beta1 m + (1 - beta1) g
    p <- p (1 - lr wd) - lr sign(c)
    m <- beta2 m + (1 - beta2) g

``tests/test_add_an_optimizer.py`` registers it and holds it to the conformance suite, ``slimopt memory``,
``slimopt plan`` and ``slimopt bench throughput``.
"""

from __future__ import annotations

from typing import Any

import torch
from torch import Tensor

from slimopt.core.base import STEP_BYTES, SlimOptimizer, check_betas, check_lr, check_nonnegative
from slimopt.plans import ParamInfo
from slimopt.registry import OptimizerSpec

SPEC = OptimizerSpec("toy-lion", "toy_lion:Lion", 1e-3, "Lion: the sign of an interpolated momentum (a toy)",
                     "toy_lion:state_bytes_formula", state_note="one momentum in the parameter dtype")


def lion_update_(p: Tensor, grad: Tensor, exp_avg: Tensor, lr: float | Tensor, beta1: float, beta2: float,
                 weight_decay: float) -> None:
    """One Lion step of one tensor, in place (the kernel: tensors and numbers only)."""
    direction = exp_avg.mul(beta1).add_(grad, alpha=1 - beta1).sign_()
    if weight_decay:
        p.mul_(1 - lr * weight_decay)
    p.sub_(direction.mul_(lr))
    exp_avg.mul_(beta2).add_(grad, alpha=1 - beta2)


def state_bytes_formula(t: ParamInfo, *, param_bytes: int = 4) -> int:
    return t.numel * param_bytes + STEP_BYTES


class Lion(SlimOptimizer):
    def __init__(self, params: Any, lr: float | Tensor = 1e-4, betas: tuple[float, float] = (0.9, 0.99),
                 weight_decay: float = 0.0, *, nonfinite: str = "skip") -> None:
        check_lr(lr)
        check_betas(betas)
        check_nonnegative("weight_decay", weight_decay)
        super().__init__(params, {"lr": lr, "betas": betas, "weight_decay": weight_decay, "nonfinite": nonfinite})

    def update_group(self, group: dict[str, Any]) -> None:
        beta1, beta2 = group["betas"]
        for _, p, grad in self.grads(group):
            state = self.state[p]
            if not state:
                state["exp_avg"] = torch.zeros_like(p)
            self.advance_step(state)
            lion_update_(p, grad, state["exp_avg"], group["lr"], beta1, beta2, group["weight_decay"])
