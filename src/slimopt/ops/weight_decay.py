"""Decoupled weight decay's factor, W <- W * (1 - lr * scale * weight_decay): written once for every path.

The torch paths, the per-tensor references and the Triton kernels' host code all take the factor from
``decay_factor``, so that each rounds it the same way. (The kernels that read a tensor lr on the device
compute it there, from the same formula.)
"""

from __future__ import annotations

from torch import Tensor

__all__ = ["decay_factor"]


def decay_factor(lr: float | Tensor, weight_decay: float, scale: float = 1.0) -> float | Tensor:
    """``1 - lr * scale * weight_decay``: a Python float for a number ``lr`` (doubles, as torch's optimizers
    compute it; ``scale`` 1 leaves ``lr * scale`` exact), a 0-d tensor for a tensor ``lr``, never read on the
    host (``(lr * scale) * -weight_decay + 1``, the same bits as ``1 - lr * scale * weight_decay``: negation is
    exact). ``scale``: a multiplier on the lr that the step applies too (a matrix update's alpha)."""
    if isinstance(lr, Tensor):
        return (lr if scale == 1 else lr * scale).mul(-weight_decay).add_(1.0)  # lr * 1 is lr: no launch for it
    return 1 - lr * scale * weight_decay
