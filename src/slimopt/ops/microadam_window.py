"""MicroAdam's moments, rebuilt at every step from the window of the last m sparse gradients.

The window is a ring of m rows; row r holds the Top-K (position, value) pairs written at some step.
At step t (counted per tensor, from 1) row ``(t - 1) % m`` is the newest; a row written ``age`` steps
ago enters the first moment with weight beta1**age and the second with beta2**age, rows not yet
written (t < m) with weight 0. With Adam's bias corrections this is

    m_hat = (1 - beta1) / (1 - beta1**t) * sum_rows beta1**age * V
    v_hat = (1 - beta2) / (1 - beta2**t) * sum_rows beta2**age * V**2
    u     = m_hat / (sqrt(v_hat) + eps)

which is exactly bias-corrected Adam when every coordinate is in every row and m >= t, and otherwise
an EMA truncated to the window. The update is zero wherever no row holds a coordinate.
"""

from __future__ import annotations

import torch
from torch import Tensor

__all__ = ["adam_update_from_window", "apply_window_update_", "bias_corrections", "dense_update_", "row_weights"]


def row_weights(step: int, m: int, beta: float) -> list[float]:
    """beta**age of each ring row at ``step`` (1-based); 0 for rows not written yet."""
    newest = (step - 1) % m
    return [beta ** ((newest - r) % m) if r < step else 0.0 for r in range(m)]


def bias_corrections(step: int, beta1: float, beta2: float) -> tuple[float, float]:
    """(1 - beta1) / (1 - beta1**t) and (1 - beta2) / (1 - beta2**t)."""
    return (1 - beta1) / (1 - beta1**step), (1 - beta2) / (1 - beta2**step)


def adam_update_from_window(positions: Tensor, values: Tensor, n: int, step: int, betas: tuple[float, float],
                            eps: float) -> Tensor:
    """Dense fp32 Adam direction u (length ``n``) from the window.

    ``positions``: int64 (m, k) positions in 0..n-1; ``values``: (m, k) window values. Duplicate
    positions across rows add up; rows are summed in order 0..m-1.
    """
    beta1, beta2 = betas
    m = positions.shape[0]
    w1 = torch.tensor(row_weights(step, m, beta1), dtype=torch.float32, device=values.device)
    w2 = torch.tensor(row_weights(step, m, beta2), dtype=torch.float32, device=values.device)
    v = values.float()
    first = torch.zeros(n, dtype=torch.float32, device=values.device)
    second = torch.zeros(n, dtype=torch.float32, device=values.device)
    flat = positions.reshape(-1)
    first.index_add_(0, flat, (v * w1[:, None]).view(-1))
    second.index_add_(0, flat, (v * v * w2[:, None]).view(-1))
    c1, c2 = bias_corrections(step, beta1, beta2)
    return first.mul_(c1).div_(second.mul_(c2).sqrt_().add_(eps))


def apply_window_update_(p: Tensor, positions: Tensor, values: Tensor, step: int, betas: tuple[float, float],
                         eps: float, lr: float, weight_decay: float, scratch: tuple[Tensor, Tensor]) -> None:
    """p <- p * (1 - lr * wd) - lr * u in place, with u from the window, touching only window positions.

    Same arithmetic as ``adam_update_from_window`` followed by the dense update (tested), but u is
    only evaluated where the window has entries (at most m*k of the n positions), which is where it is
    non-zero. ``scratch``: two zeroed fp32 buffers of at least p.numel() entries, left zeroed.
    (index_select / scatter_ / scatter_add_ rather than advanced indexing: several times faster on CPU.)
    Duplicate positions (one per row holding them) scatter the same u.
    """
    beta1, beta2 = betas
    m = positions.shape[0]
    w1 = torch.tensor(row_weights(step, m, beta1), dtype=torch.float32, device=values.device)
    w2 = torch.tensor(row_weights(step, m, beta2), dtype=torch.float32, device=values.device)
    v = values.float()
    flat = positions.reshape(-1)
    first, second = scratch[0][: p.numel()], scratch[1][: p.numel()]
    first.scatter_add_(0, flat, (v * w1[:, None]).view(-1))  # rows in order 0..m-1, as the reference
    second.scatter_add_(0, flat, v.mul_(v).mul_(w2[:, None]).view(-1))
    c1, c2 = bias_corrections(step, beta1, beta2)
    u = first.index_select(0, flat).mul_(c1).div_(second.index_select(0, flat).mul_(c2).sqrt_().add_(eps))
    second.zero_()
    # spread u back to a dense vector (zero off the window) and update p densely, as the reference does:
    # cheaper than a gather + scatter of p, and rounds exactly like it
    first.zero_().scatter_(0, flat, u)
    dense_update_(p, first, lr, weight_decay)
    first.zero_()


def dense_update_(p: Tensor, u: Tensor, lr: float, weight_decay: float) -> None:
    """p <- p * (1 - lr * wd) - lr * u, rounded once to p's dtype."""
    if p.dtype == torch.float32:
        if weight_decay:
            p.mul_(1 - lr * weight_decay)
        p.add_(u, alpha=-lr)
    else:
        work = p.float()
        if weight_decay:
            work.mul_(1 - lr * weight_decay)
        p.copy_(work.add_(u, alpha=-lr))
