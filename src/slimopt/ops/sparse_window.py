"""Adam's moments, rebuilt at every step from a window of the last m sparse (Top-K) gradients.

The window is a ring of m rows; row r holds the Top-K (position, value) pairs written at some step.
At step t (counted per tensor, from 1) row ``(t - 1) % m`` is the newest; a row written ``age`` steps
ago enters the first moment with weight beta1**age and the second with beta2**age, rows not yet
written (t < m) with weight 0. With Adam's bias corrections this is

    m_hat = (1 - beta1) / (1 - beta1**t) * sum_rows beta1**age * V
    v_hat = (1 - beta2) / (1 - beta2**t) * sum_rows beta2**age * V**2
    u     = m_hat / (sqrt(v_hat) + eps)

which is exactly bias-corrected Adam when every coordinate is in every row and m >= t, and otherwise
an EMA truncated to the window. The update is zero wherever no row holds a coordinate.

Past t = m the window holds only 1 - beta**m of an EMA's weight, but the paper's corrections (1 - beta)/(1 -
beta**t) treat it as the whole history: for a coordinate selected at every step with the same gradient the
step grows from 1x (t <= m) to (1 - beta1**m) / sqrt(1 - beta2**m), 6.5x at m = 10 and betas (0.9, 0.999).
``bias_correction="window"`` divides by the weight the window holds instead, (1 - beta)/(1 - beta**min(t, m)):
the same for t <= m, and a step that does not grow with t (beyond the paper; an option).
"""

from __future__ import annotations

import torch
from torch import Tensor

from .weight_decay import decay_factor

TINY = torch.finfo(torch.float32).tiny  # the smallest normal fp32

__all__ = ["BIAS_CORRECTIONS", "adam_update_from_window", "apply_window_update_", "bias_corrections",
           "dense_update_", "row_weights", "window_weights"]


def row_weights(step: int, m: int, beta: float) -> list[float]:
    """beta**age of each ring row at ``step`` (1-based); 0 for rows not written yet."""
    newest = (step - 1) % m
    return [beta ** ((newest - r) % m) if r < step else 0.0 for r in range(m)]


BIAS_CORRECTIONS = ("paper", "window")


def bias_corrections(step: int, beta1: float, beta2: float, mode: str = "paper", m: int | None = None
                     ) -> tuple[float, float]:
    """(1 - beta1) / (1 - beta1**t) and (1 - beta2) / (1 - beta2**t); with ``mode="window"`` t is capped at
    the window's ``m`` rows (the weight the window itself holds)."""
    if mode not in BIAS_CORRECTIONS:
        raise ValueError(f"Invalid bias_correction: {mode!r} (must be one of {', '.join(BIAS_CORRECTIONS)})")
    t = step if mode == "paper" else min(step, m)
    return (1 - beta1) / (1 - beta1**t), (1 - beta2) / (1 - beta2**t)


def adam_update_from_window(positions: Tensor, values: Tensor, n: int, step: int, betas: tuple[float, float],
                            eps: float, bias_correction: str = "paper") -> Tensor:
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
    c1, c2 = bias_corrections(step, beta1, beta2, mode=bias_correction, m=m)
    return first.mul_(c1).div_(second.mul_(c2).sqrt_().add_(eps))


def window_weights(step: int, m: int, betas: tuple[float, float], device: torch.device | str = "cpu",
                   bias_correction: str = "paper") -> tuple[Tensor, Tensor]:
    """fp32 per-row weights with Adam's bias corrections folded in: c1 * beta1**age and c2 * beta2**age."""
    c1, c2 = bias_corrections(step, *betas, mode=bias_correction, m=m)
    w1 = torch.tensor(row_weights(step, m, betas[0]), dtype=torch.float32, device=device).mul_(c1)
    w2 = torch.tensor(row_weights(step, m, betas[1]), dtype=torch.float32, device=device).mul_(c2)
    return w1, w2


def apply_window_update_(p: Tensor, positions: Tensor, values: Tensor, weights: tuple[Tensor, Tensor],
                         eps: float, lr: float, weight_decay: float, moments: Tensor) -> None:
    """p <- p * (1 - lr * wd) - lr * u in place, with u from the window (``weights``: ``window_weights``).

    The moments of ``adam_update_from_window`` with the bias corrections folded into the row weights,
    and the update as one fused dense pass, p += -lr * m_hat / (sqrt(v_hat) + eps), which is zero off
    the window (m_hat = 0 there): on CPU, gathering u at the window positions and scattering it back
    costs more than a few dense passes over a cache-sized chunk. ``positions``: int64 (m, k) positions
    in 0..p.numel()-1. ``moments``: zeroed fp32 (2, >= p.numel()), left zeroed.

    Both moments come from one scatter_add_ over the (2, n) buffer (rows in order 0..m-1, as the
    reference): on CPU that is cheaper than two 1-D ones, and runs its two rows on two threads
    (scatter_add_ rather than index_add_ / advanced indexing: several times faster on CPU).
    """
    w1, w2 = weights
    m, k = values.shape
    v = values.float()
    terms = torch.empty(2, m, k, dtype=torch.float32, device=v.device)
    torch.mul(v, w1[:, None], out=terms[0])
    torch.mul(v.mul_(v), w2[:, None], out=terms[1])
    moments = moments[:, : p.numel()]
    moments.scatter_add_(1, positions.view(1, -1).expand(2, -1), terms.view(2, -1))
    m_hat, v_hat = moments
    # + TINY: on x86 CPUs sqrt of an exact 0 (everywhere off the window) is ~30x slower than of a normal
    # number; it also keeps 0 / 0 out when eps = 0, and changes no v_hat above ~1e-31.
    denominator = v_hat.add_(TINY).sqrt_().add_(eps)
    work = p if p.dtype == torch.float32 else p.float()
    if weight_decay:
        work.mul_(decay_factor(lr, weight_decay))
    work.addcdiv_(m_hat, denominator, value=-lr)
    if work is not p:
        p.copy_(work)  # one rounding to p's dtype
    moments.zero_()


def dense_update_(p: Tensor, u: Tensor, lr: float, weight_decay: float) -> None:
    """p <- p * (1 - lr * wd) - lr * u, rounded once to p's dtype: with ``adam_update_from_window``, the
    slow reference that ``apply_window_update_`` is tested against."""
    if p.dtype == torch.float32:
        if weight_decay:
            p.mul_(decay_factor(lr, weight_decay))
        p.add_(u, alpha=-lr)
    else:
        work = p.float()
        if weight_decay:
            work.mul_(decay_factor(lr, weight_decay))
        p.copy_(work.add_(u, alpha=-lr))
