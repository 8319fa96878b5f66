"""Adam-mini's kernels: per-block mean of g², and the block-wise Adam update.

A *layout* is the dict a parameter plan stores for each tensor (``slimopt.plans.param_plan.adam_mini_layout``):
``rule`` is ``elementwise`` (a block per element), ``whole`` (one block), ``rows`` / ``heads`` (blocks of
``unit`` consecutive output neurons, along ``out_dim``) or ``qkv`` (output neurons cut into ``segments``
``[start, length, unit]``). Every block keeps one second-moment value ``v_b``.

``block_mean_sq_reference`` and ``adam_mini_step_reference`` are the obvious versions: an explicit
element-to-block index and ``scatter_add``; they are what the tests hold the fast path to.

The fast path never materialises ``g²``: per-output-neuron sums of squares come from
``torch.linalg.vector_norm`` (a reduction, no temporary), grouped into blocks on vectors that are as small
as the output dimension. The update is then three in-place ops per tensor (decay, ``m``, ``p``), the
block denominators broadcast, never expanded to the tensor's size.
"""

from __future__ import annotations

import math
from typing import Any

import torch
from torch import Tensor

__all__ = [
    "adam_mini_multi",
    "adam_mini_step",
    "adam_mini_step_reference",
    "block_index",
    "block_mean_sq",
    "block_mean_sq_reference",
    "block_state_shape",
    "neuron_repeats",
]

LayoutDict = dict[str, Any]

def block_state_shape(layout: LayoutDict, shape: tuple[int, ...]) -> tuple[int, ...]:
    """Shape of the second-moment state: the tensor's shape (elementwise), ``()`` (whole), or ``(n_blocks,)``."""
    rule = layout["rule"]
    if rule == "elementwise":
        return tuple(shape)
    if rule == "whole":
        return ()
    return (int(layout["n_blocks"]),)


def _segments(layout: LayoutDict, shape: tuple[int, ...]) -> list[tuple[int, int, int]]:
    """``(start, length, unit)`` runs along the output dimension; ``unit`` neurons share one block."""
    if layout["rule"] == "qkv":
        return [tuple(s) for s in layout["segments"]]
    return [(0, shape[layout["out_dim"]], int(layout.get("unit", 1)))]


def neuron_repeats(layout: LayoutDict, shape: tuple[int, ...]) -> list[int]:
    """For each block (in order), how many consecutive output neurons it covers."""
    reps: list[int] = []
    for _, length, unit in _segments(layout, shape):
        reps += [unit] * (length // unit)
    return reps


# --------------------------------------------------------------------------------------------------
# reference: explicit block index, float64 scatter


def block_index(layout: LayoutDict, shape: tuple[int, ...]) -> Tensor:
    """The block of every element of a tensor of ``shape`` (int64, same shape)."""
    rule = layout["rule"]
    numel = math.prod(shape)
    if rule == "elementwise":
        return torch.arange(numel).reshape(shape)
    if rule == "whole":
        return torch.zeros(shape, dtype=torch.long)
    out_dim = layout["out_dim"]
    of_neuron = torch.repeat_interleave(torch.arange(layout["n_blocks"]),
                                        torch.tensor(neuron_repeats(layout, shape)))
    view = [1] * len(shape)
    view[out_dim] = shape[out_dim]
    return of_neuron.reshape(view).expand(shape).contiguous()


def block_mean_sq_reference(grad: Tensor, layout: LayoutDict) -> Tensor:
    """mean(g²) over each block, in float64 (shape :func:`block_state_shape`)."""
    shape = tuple(grad.shape)
    state_shape = block_state_shape(layout, shape)
    if layout["rule"] == "elementwise":
        return grad.double() ** 2
    index = block_index(layout, shape).reshape(-1)
    n_blocks = math.prod(state_shape)
    g2 = grad.double().reshape(-1) ** 2
    sums = torch.zeros(n_blocks, dtype=torch.float64).scatter_add_(0, index, g2)
    counts = torch.zeros(n_blocks, dtype=torch.float64).scatter_add_(0, index, torch.ones_like(g2))
    return (sums / counts).reshape(state_shape)


def adam_mini_step_reference(param: Tensor, grad: Tensor, exp_avg: Tensor, exp_avg_sq: Tensor, step: float,
                             layout: LayoutDict, *, lr: float, beta1: float, beta2: float, eps: float,
                             weight_decay: float) -> None:
    """One Adam-mini step on one tensor, in place (paper Algorithm 1; ``step`` = t >= 1, advanced).

    ``exp_avg`` is full size, ``exp_avg_sq`` holds one value per block (float32).
    """
    if weight_decay != 0:
        param.mul_(1 - lr * weight_decay)  # decoupled weight decay, as AdamW
    exp_avg.lerp_(grad.to(exp_avg.dtype), 1 - beta1)  # m <- beta1 m + (1 - beta1) g
    mean_sq = block_mean_sq_reference(grad, layout).to(exp_avg_sq.dtype)
    exp_avg_sq.mul_(beta2).add_(mean_sq, alpha=1 - beta2)  # v_b <- beta2 v_b + (1 - beta2) mean_b(g²)
    bias_correction1 = 1 - beta1**step
    bias_correction2 = 1 - beta2**step
    denom_blocks = (exp_avg_sq.sqrt() / math.sqrt(bias_correction2)).add_(eps)  # sqrt(v_hat_b) + eps
    if layout["rule"] == "elementwise":
        denom = denom_blocks
    else:
        denom = denom_blocks.reshape(-1)[block_index(layout, tuple(param.shape))]
    param.addcdiv_(exp_avg, denom, value=-lr / bias_correction1)  # p <- p - lr m_hat / (sqrt(v_hat_b) + eps)


# --------------------------------------------------------------------------------------------------
# fast path


def block_mean_sq(grad: Tensor, layout: LayoutDict, *, sums: Tensor | None = None,
                  shape: tuple[int, ...] | None = None) -> Tensor:
    """mean(g²) over each block in float32, without a g² temporary (shape :func:`block_state_shape`).

    Not for ``elementwise`` layouts (that is plain Adam's ``g²``). When ``grad`` is one device's part of
    a sharded tensor, pass the tensor's global ``shape`` and ``sums``: Σ g² over the whole tensor (``whole``)
    or per output neuron along ``out_dim`` (``slimopt.core.distributed.sq_sum`` / ``sq_sums_along``).
    """
    rule = layout["rule"]
    shape = tuple(grad.shape) if shape is None else tuple(shape)
    acc = torch.promote_types(grad.dtype, torch.float32)  # float32, or float64 for float64 gradients
    if rule == "whole":
        total = torch.linalg.vector_norm(grad, dtype=acc).square_() if sums is None else sums
        return total.float().div_(max(math.prod(shape), 1))
    if rule == "elementwise":
        raise ValueError("block_mean_sq: an elementwise layout has no blocks to average over")
    out_dim = layout["out_dim"]
    other = [d for d in range(grad.dim()) if d != out_dim]
    per_neuron = math.prod(shape[d] for d in other)
    if sums is None:  # (shape[out_dim],)
        sums = torch.linalg.vector_norm(grad, dim=other, dtype=acc).square_()
    sums = sums.float()
    segments = _segments(layout, shape)
    if len(segments) == 1:  # rows (unit 1) or heads (unit head_dim): blocks of equal size
        unit = segments[0][2]
        blocks = sums if unit == 1 else sums.view(-1, unit).sum(1)
        return blocks.div_(unit * per_neuron)
    parts, sizes = [], []
    for start, length, unit in segments:
        part = sums[start:start + length]
        parts.append(part if unit == 1 else part.view(-1, unit).sum(1))
        sizes.append(torch.full((length // unit,), float(unit * per_neuron), device=grad.device))
    return torch.cat(parts).div_(torch.cat(sizes))


def _denominator_view(denom_blocks: Tensor, layout: LayoutDict, shape: tuple[int, ...]) -> Tensor:
    """Per-block denominators as a tensor that broadcasts against the parameter (no full-size copy)."""
    rule = layout["rule"]
    if rule == "whole":
        return denom_blocks
    segments = _segments(layout, shape)
    if len(segments) == 1 and segments[0][2] > 1:  # heads
        denom_blocks = denom_blocks.repeat_interleave(segments[0][2])
    elif len(segments) > 1:  # fused qkv
        reps = torch.tensor(neuron_repeats(layout, shape), device=denom_blocks.device)
        denom_blocks = denom_blocks.repeat_interleave(reps, output_size=shape[layout["out_dim"]])
    view = [1] * len(shape)
    view[layout["out_dim"]] = shape[layout["out_dim"]]
    return denom_blocks.view(view)


def adam_mini_step(param: Tensor, grad: Tensor, exp_avg: Tensor, exp_avg_sq: Tensor, step: float,
                   layout: LayoutDict, *, lr: float, beta1: float, beta2: float, eps: float, weight_decay: float,
                   mean_sq: Tensor | None = None,
                   offset: tuple[int, ...] | None = None, full_shape: tuple[int, ...] | None = None) -> None:
    """``adam_mini_step_reference`` without temporaries of the tensor's size.

    Same algorithm; the block means are computed as squared norms (a reduction, no ``g²`` tensor) and the
    per-block denominators broadcast along the output dimension, so each of ``p``, ``m``, ``g`` is read
    about twice per step (AdamW: about five times). Agrees with the reference to float32 rounding, not
    bit for bit. (Chunking the three in-place ops to keep rows in cache was measured slower on CPU:
    these ops are not memory-bound at one or two threads, and the splits cost Python time.)

    For one device's part of a sharded tensor (``param``, ``grad``, ``exp_avg`` local; ``exp_avg_sq``
    holding every block): ``mean_sq`` the blocks' means over the whole tensor, ``full_shape`` its global
    shape and ``offset`` where the local part starts in it.
    """
    if layout["rule"] == "elementwise":  # plain AdamW, op for op as torch's for-loop AdamW
        bias_correction1 = 1 - beta1**step
        bias_correction2 = 1 - beta2**step
        step_size = lr / bias_correction1
        if weight_decay != 0:
            param.mul_(1 - lr * weight_decay)
        exp_avg.lerp_(grad if grad.dtype == exp_avg.dtype else grad.to(exp_avg.dtype), 1 - beta1)
        exp_avg_sq.mul_(beta2).addcmul_(grad, grad, value=1 - beta2)  # float32 v, also for bf16 grads
        denom = (exp_avg_sq.sqrt() / math.sqrt(bias_correction2)).add_(eps)
        param.addcdiv_(exp_avg, denom, value=-step_size)
        return
    adam_mini_multi([param], [grad], [exp_avg], [exp_avg_sq], [layout], [step], lr=lr, beta1=beta1, beta2=beta2,
                    eps=eps, weight_decays=[weight_decay], mean_sqs=None if mean_sq is None else [mean_sq],
                    offsets=None if offset is None else [offset],
                    full_shapes=None if full_shape is None else [full_shape])


def adam_mini_multi(params: list[Tensor], grads: list[Tensor], exp_avgs: list[Tensor], exp_avg_sqs: list[Tensor],
                    layouts: list[LayoutDict], steps: list[float], *, lr: float, beta1: float, beta2: float,
                    eps: float, weight_decays: list[float], mean_sqs: list[Tensor | None] | None = None,
                    offsets: list[tuple[int, ...] | None] | None = None,
                    full_shapes: list[tuple[int, ...] | None] | None = None) -> None:
    """:func:`adam_mini_step` on many tensors with block layouts (not ``elementwise``) at once.

    Per tensor only the block means (a reduction) and the broadcast view of the denominators; everything
    else is one multi-tensor (``torch._foreach_*``) op per line of the algorithm, so a step over a
    model's hundred tensors costs a few dozen small kernel launches instead of a thousand.
    """
    n = len(params)
    mean_sqs = mean_sqs or [None] * n
    offsets = offsets or [None] * n
    full_shapes = full_shapes or [None] * n
    means = [block_mean_sq(g, layout) if ms is None else ms for g, layout, ms in zip(grads, layouts, mean_sqs)]
    torch._foreach_mul_(exp_avg_sqs, beta2)  # v_b <- beta2 v_b + (1 - beta2) mean_b(g²)
    torch._foreach_add_(exp_avg_sqs, means, alpha=1 - beta2)
    denoms = torch._foreach_sqrt(exp_avg_sqs)  # sqrt(v_hat_b) + eps
    torch._foreach_div_(denoms, [math.sqrt(1 - beta2**t) for t in steps])
    torch._foreach_add_(denoms, eps)
    views = []
    for p, d, layout, offset, full_shape in zip(params, denoms, layouts, offsets, full_shapes):
        shape = tuple(p.shape)
        d = _denominator_view(d, layout, shape if full_shape is None else tuple(full_shape))
        out_dim = layout.get("out_dim", 0)
        if full_shape is not None and d.dim() and d.shape[out_dim] != shape[out_dim]:
            d = d.narrow(out_dim, offset[out_dim], shape[out_dim])  # a shard's own neurons
        views.append(d)
    for wd in sorted(set(weight_decays) - {0.0}):  # decoupled weight decay
        torch._foreach_mul_([p for p, w in zip(params, weight_decays) if w == wd], 1 - lr * wd)
    grads = [g if g.dtype == m.dtype else g.to(m.dtype) for g, m in zip(grads, exp_avgs)]
    torch._foreach_lerp_(exp_avgs, grads, 1 - beta1)  # m <- beta1 m + (1 - beta1) g
    # p <- p - lr m_hat / (sqrt(v_hat_b) + eps), the block's denominator broadcast over the block
    torch._foreach_addcdiv_(params, exp_avgs, views, [-lr / (1 - beta1**t) for t in steps])
