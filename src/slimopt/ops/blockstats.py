"""Block-wise Adam: per-block mean of g², and the Adam update with one second moment per block.

A *partition* (``Partition``) is the dict of facts a parameter plan stores for each tensor, saying how it is cut
into blocks: ``rule`` is ``elementwise`` (a block per element), ``whole`` (one block), ``rows`` / ``heads``
(blocks of ``unit`` consecutive output neurons, along ``out_dim``) or ``qkv`` (output neurons cut into
``segments`` ``[start, length, unit]``). Every block keeps one second-moment value ``v_b``.

Three versions of the same step, each held to the one before it by the tests:

* ``block_mean_sq_reference`` / ``block_adam_step_reference``: the obvious version, an explicit
  element-to-block index, ``scatter_add`` in float64.
* ``block_mean_sq`` / ``block_adam_step``: one tensor at a time (the optimizer's reference path, and its
  path for FSDP2 shards). It never materialises ``g²``: per-output-neuron sums of squares come from
  ``torch.linalg.vector_norm`` (a reduction, no temporary), grouped into blocks on vectors as small as the
  output dimension; the block denominators broadcast, never expanded to the tensor's size.
* ``block_sq_sums`` / ``block_adam_foreach``: all tensors of a param group at once, a fixed number of
  launches per step whatever the number of tensors: ``torch._foreach_*`` ops over the tensors, and the
  blocks of all tensors as one flat vector (bias corrections from the step counters as device tensors,
  no host sync, no branch on a device value).

On CUDA a fourth version takes the tensors whose blocks are runs of contiguous rows: three Triton launches
over pointer tables (``ops.block_moments_triton``), held to ``block_adam_foreach`` by the tests.
"""

from __future__ import annotations

import math
from typing import Any

import numpy as np
import torch
from torch import Tensor

from .tables import upload
from .weight_decay import decay_factor

__all__ = [
    "block_adam_foreach",
    "block_adam_step",
    "block_adam_step_reference",
    "block_index",
    "block_mean_sq",
    "block_mean_sq_reference",
    "block_sq_sums",
    "block_state_shape",
    "neuron_repeats",
]

Partition = dict[str, Any]  # how a tensor is cut into blocks (see the module docstring)


def block_state_shape(partition: Partition, shape: tuple[int, ...]) -> tuple[int, ...]:
    """Shape of the second-moment state: the tensor's shape (elementwise), ``()`` (whole), or ``(n_blocks,)``."""
    rule = partition["rule"]
    if rule == "elementwise":
        return tuple(shape)
    if rule == "whole":
        return ()
    return (int(partition["n_blocks"]),)


def _segments(partition: Partition, shape: tuple[int, ...]) -> list[tuple[int, int, int]]:
    """``(start, length, unit)`` runs along the output dimension; ``unit`` neurons share one block."""
    if partition["rule"] == "qkv":
        return [tuple(s) for s in partition["segments"]]
    return [(0, shape[partition["out_dim"]], int(partition.get("unit", 1)))]


def neuron_repeats(partition: Partition, shape: tuple[int, ...]) -> list[int]:
    """For each block (in order), how many consecutive output neurons it covers."""
    reps: list[int] = []
    for _, length, unit in _segments(partition, shape):
        reps += [unit] * (length // unit)
    return reps


# --------------------------------------------------------------------------------------------------
# reference: explicit block index, float64 scatter


def block_index(partition: Partition, shape: tuple[int, ...]) -> Tensor:
    """The block of every element of a tensor of ``shape`` (int64, same shape)."""
    rule = partition["rule"]
    numel = math.prod(shape)
    if rule == "elementwise":
        return torch.arange(numel).reshape(shape)
    if rule == "whole":
        return torch.zeros(shape, dtype=torch.long)
    out_dim = partition["out_dim"]
    of_neuron = torch.repeat_interleave(torch.arange(partition["n_blocks"]),
                                        torch.tensor(neuron_repeats(partition, shape)))
    view = [1] * len(shape)
    view[out_dim] = shape[out_dim]
    return of_neuron.reshape(view).expand(shape).contiguous()


def block_mean_sq_reference(grad: Tensor, partition: Partition) -> Tensor:
    """mean(g²) over each block, in float64 (shape :func:`block_state_shape`)."""
    shape = tuple(grad.shape)
    state_shape = block_state_shape(partition, shape)
    if partition["rule"] == "elementwise":
        return grad.double() ** 2
    index = block_index(partition, shape).reshape(-1)
    n_blocks = math.prod(state_shape)
    g2 = grad.double().reshape(-1) ** 2
    sums = torch.zeros(n_blocks, dtype=torch.float64).scatter_add_(0, index, g2)
    counts = torch.zeros(n_blocks, dtype=torch.float64).scatter_add_(0, index, torch.ones_like(g2))
    return (sums / counts.clamp_min_(1)).reshape(state_shape)  # a block of no elements: mean 0


def block_adam_step_reference(param: Tensor, grad: Tensor, exp_avg: Tensor, exp_avg_sq: Tensor, step: float,
                             partition: Partition, *, lr: float, beta1: float, beta2: float, eps: float,
                             weight_decay: float) -> None:
    """One step of block-wise Adam on one tensor, in place (Adam-mini's Algorithm 1; ``step`` = t >= 1, advanced).

    ``exp_avg`` is full size, ``exp_avg_sq`` holds one value per block (float32).
    """
    if weight_decay != 0:
        param.mul_(decay_factor(lr, weight_decay))  # decoupled weight decay, as AdamW
    exp_avg.lerp_(grad.to(exp_avg.dtype), 1 - beta1)  # m <- beta1 m + (1 - beta1) g
    mean_sq = block_mean_sq_reference(grad, partition).to(exp_avg_sq.dtype)
    exp_avg_sq.mul_(beta2).add_(mean_sq, alpha=1 - beta2)  # v_b <- beta2 v_b + (1 - beta2) mean_b(g²)
    bias_correction1 = 1 - beta1**step
    bias_correction2 = 1 - beta2**step
    denom_blocks = (exp_avg_sq.sqrt() / math.sqrt(bias_correction2)).add_(eps)  # sqrt(v_hat_b) + eps
    if partition["rule"] == "elementwise":
        denom = denom_blocks
    else:
        denom = denom_blocks.reshape(-1)[block_index(partition, tuple(param.shape))]
    param.addcdiv_(exp_avg, denom, value=-lr / bias_correction1)  # p <- p - lr m_hat / (sqrt(v_hat_b) + eps)


# --------------------------------------------------------------------------------------------------
# one tensor at a time


def block_mean_sq(grad: Tensor, partition: Partition, *, sums: Tensor | None = None,
                  shape: tuple[int, ...] | None = None) -> Tensor:
    """mean(g²) over each block in float32, without a g² temporary (shape :func:`block_state_shape`).

    Not for ``elementwise`` partitions (that is plain Adam's ``g²``). When ``grad`` is one device's part of
    a sharded tensor, pass the tensor's global ``shape`` and ``sums``: Σ g² over the whole tensor (``whole``)
    or per output neuron along ``out_dim`` (``slimopt.core.distributed.sq_sum`` / ``sq_sums_along``).
    A block of no elements has mean 0.
    """
    rule = partition["rule"]
    shape = tuple(grad.shape) if shape is None else tuple(shape)
    acc = torch.promote_types(grad.dtype, torch.float32)  # float32, or float64 for float64 gradients
    if rule == "whole":
        total = torch.linalg.vector_norm(grad, dtype=acc).square_() if sums is None else sums
        return total.float().div_(max(math.prod(shape), 1))
    if rule == "elementwise":
        raise ValueError("block_mean_sq: an elementwise partition has no blocks to average over")
    out_dim = partition["out_dim"]
    other = [d for d in range(grad.dim()) if d != out_dim]
    per_neuron = math.prod(shape[d] for d in other)
    if sums is None:  # (shape[out_dim],)
        sums = torch.linalg.vector_norm(grad, dim=other, dtype=acc).square_()
    sums = sums.float()
    segments = _segments(partition, shape)
    if len(segments) == 1:  # rows (unit 1) or heads (unit head_dim): blocks of equal size
        unit = segments[0][2]
        blocks = sums if unit == 1 else sums.view(-1, unit).sum(1)
        return blocks.div_(max(unit * per_neuron, 1))
    parts, sizes = [], []
    for start, length, unit in segments:
        part = sums[start:start + length]
        parts.append(part if unit == 1 else part.view(-1, unit).sum(1))
        sizes.append(torch.full((length // unit,), float(max(unit * per_neuron, 1)), device=grad.device))
    return torch.cat(parts).div_(torch.cat(sizes))


def _denominator_view(denom_blocks: Tensor, partition: Partition, shape: tuple[int, ...]) -> Tensor:
    """Per-block denominators as a tensor that broadcasts against the parameter (no full-size copy)."""
    rule = partition["rule"]
    if rule == "whole":
        return denom_blocks
    segments = _segments(partition, shape)
    if len(segments) == 1 and segments[0][2] > 1:  # heads
        denom_blocks = denom_blocks.repeat_interleave(segments[0][2])
    elif len(segments) > 1:  # fused qkv
        reps = torch.tensor(neuron_repeats(partition, shape), device=denom_blocks.device)
        denom_blocks = denom_blocks.repeat_interleave(reps, output_size=shape[partition["out_dim"]])
    view = [1] * len(shape)
    view[partition["out_dim"]] = shape[partition["out_dim"]]
    return denom_blocks.view(view)


def block_adam_step(param: Tensor, grad: Tensor, exp_avg: Tensor, exp_avg_sq: Tensor, step: float,
                   partition: Partition, *, lr: float, beta1: float, beta2: float, eps: float, weight_decay: float,
                   mean_sq: Tensor | None = None,
                   offset: tuple[int, ...] | None = None, full_shape: tuple[int, ...] | None = None) -> None:
    """``block_adam_step_reference`` without temporaries of the tensor's size, one tensor (``step`` = t >= 1).

    Same algorithm; the block means are computed as squared norms (a reduction, no ``g²`` tensor) and the
    per-block denominators broadcast along the output dimension, so each of ``p``, ``m``, ``g`` is read
    about twice per step (AdamW: about five times). Agrees with the reference to float32 rounding, not
    bit for bit. Elementwise partitions are torch's for-loop AdamW op for op (bit for bit).

    For one device's part of a sharded tensor (``param``, ``grad``, ``exp_avg`` local; ``exp_avg_sq``
    holding every block): ``mean_sq`` the blocks' means over the whole tensor, ``full_shape`` its global
    shape and ``offset`` where the local part starts in it.
    """
    bias_correction1 = 1 - beta1**step
    bias_correction2 = 1 - beta2**step
    if partition["rule"] == "elementwise":  # plain AdamW, op for op as torch's for-loop AdamW
        if weight_decay != 0:
            param.mul_(decay_factor(lr, weight_decay))
        exp_avg.lerp_(grad if grad.dtype == exp_avg.dtype else grad.to(exp_avg.dtype), 1 - beta1)
        exp_avg_sq.mul_(beta2).addcmul_(grad, grad, value=1 - beta2)  # float32 v, also for bf16 grads
        denom = (exp_avg_sq.sqrt() / math.sqrt(bias_correction2)).add_(eps)
        param.addcdiv_(exp_avg, denom, value=-lr / bias_correction1)
        return
    if mean_sq is None:
        mean_sq = block_mean_sq(grad, partition)
    exp_avg_sq.mul_(beta2).add_(mean_sq, alpha=1 - beta2)  # v_b <- beta2 v_b + (1 - beta2) mean_b(g²)
    denom = (exp_avg_sq.sqrt() / math.sqrt(bias_correction2)).add_(eps)  # sqrt(v_hat_b) + eps
    shape = tuple(param.shape)
    denom = _denominator_view(denom, partition, shape if full_shape is None else tuple(full_shape))
    out_dim = partition.get("out_dim", 0)
    if full_shape is not None and denom.dim() and denom.shape[out_dim] != shape[out_dim]:
        denom = denom.narrow(out_dim, offset[out_dim], shape[out_dim])  # a shard's own neurons
    if weight_decay != 0:
        param.mul_(decay_factor(lr, weight_decay))  # decoupled weight decay
    exp_avg.lerp_(grad if grad.dtype == exp_avg.dtype else grad.to(exp_avg.dtype), 1 - beta1)
    # p <- p - lr m_hat / (sqrt(v_hat_b) + eps), the block's denominator broadcast over the block
    param.addcdiv_(exp_avg, denom, value=-lr / bias_correction1)


# --------------------------------------------------------------------------------------------------
# all tensors of a group at once

# Gradients of up to this many elements share one reduction: they are concatenated along their output
# dimension (same other dims) first. For such tensors a launch costs more than the copy (on a GPU a
# launch is ~5 us, the copy of 64k floats ~0.2 us); larger tensors get a reduction of their own, which
# reads g once and allocates nothing (on CPU a fresh multi-MB temporary per step costs page faults).
CAT_MAX_NUMEL = 1 << 16
CAT_CHUNK_NUMEL = 1 << 22  # at most this many elements per concatenation (bounds the temporary)


class _GroupPlan:
    """How the tensors of a group are laid out for the multi-tensor step (derived from shapes and partitions).

    ``order`` permutes the tensors: block tensors (rows, heads, qkv) first, sorted so that those whose
    gradients are concatenated are neighbours; then ``whole`` tensors; then ``elementwise`` ones. In that
    order, the *neurons* (output neurons of block tensors, then one per whole tensor) and the *blocks*
    (``K`` of them) of all tensors are two flat vectors; every tensor's neurons and blocks are contiguous.
    """

    def __init__(self, sig: tuple[tuple[tuple[int, ...], tuple[Any, ...]], ...], device: torch.device) -> None:
        kinds = {"elementwise": [], "whole": [], "blocks": []}
        for i, (_, key) in enumerate(sig):
            kinds[key[0] if key[0] in ("elementwise", "whole") else "blocks"].append(i)

        def sort_key(i: int) -> tuple[Any, ...]:
            shape, (_, out_dim, segments) = sig[i]
            units = {u for _, _, u in segments}
            unit = -next(iter(units)) if len(units) == 1 else 0  # runs of equal block sizes; mixed (qkv) last
            return (len(shape), out_dim, _other(shape, out_dim), math.prod(shape) > CAT_MAX_NUMEL, unit, i)

        blocks = sorted(kinds["blocks"], key=sort_key)
        self.order = blocks + kinds["whole"] + kinds["elementwise"]
        self.n_block, self.n_whole, self.n_elem = len(blocks), len(kinds["whole"]), len(kinds["elementwise"])
        # one norm per part: (positions in `order`, output dim, dims reduced over)
        self.parts: list[tuple[list[int], int, tuple[int, ...]]] = []
        runs: list[list[int]] = []  # [neurons, unit] along the neuron vector
        self.blocks_per_tensor: list[int] = []
        counts: list[int] = []  # elements per block
        tensor_of_block: list[int] = []
        neuron_block: list[int] = []
        self.kinds: list[tuple[list[int], list[int], int]] = []  # (rows per tensor, view shape, dim) per kind
        joinable, filled = None, 0
        for pos, i in enumerate(blocks):
            shape, (_, out_dim, segments) = sig[i]
            numel, rows = math.prod(shape), shape[out_dim]
            reduce = tuple(d for d in range(len(shape)) if d != out_dim)
            key = (len(shape), out_dim, _other(shape, out_dim))
            if numel <= CAT_MAX_NUMEL and key == joinable and filled + numel <= CAT_CHUNK_NUMEL:
                self.parts[-1][0].append(pos)
                filled += numel
            else:
                self.parts.append(([pos], out_dim, reduce))
                joinable, filled = (key if numel <= CAT_MAX_NUMEL else None), numel
            kind_shape = [1] * len(shape)
            kind_shape[out_dim] = -1
            if not self.kinds or self.kinds[-1][1:] != (kind_shape, out_dim):
                self.kinds.append(([], kind_shape, out_dim))
            self.kinds[-1][0].append(rows)
            per_neuron = numel // rows if rows else 0
            start_check, n_blocks = 0, 0
            for start, length, unit in segments:
                if start != start_check or length % unit:
                    raise ValueError(f"segments {segments} do not cut {rows} output neurons into whole blocks")
                start_check += length
                runs.append([length, unit])
                for b in range(length // unit):
                    neuron_block += [len(counts) + b] * unit
                counts += [max(unit * per_neuron, 1)] * (length // unit)
                n_blocks += length // unit
            if start_check != rows:
                raise ValueError(f"segments {segments} do not cover {rows} output neurons")
            self.blocks_per_tensor.append(n_blocks)
            tensor_of_block += [pos] * n_blocks
        for pos, i in enumerate(kinds["whole"], start=len(blocks)):
            neuron_block.append(len(counts))
            counts.append(max(math.prod(sig[i][0]), 1))
            tensor_of_block.append(pos)
        runs += [[self.n_whole + self.n_elem, 1]]  # whole tensors' sums, then elementwise tensors' (for the check)
        merged: list[list[int]] = []
        for length, unit in runs:
            if merged and merged[-1][1] == unit:
                merged[-1][0] += length
            elif length:
                merged.append([length, unit])
        self.runs = None if all(u == 1 for _, u in merged) else [tuple(r) for r in merged]
        self.n_blocks = len(counts)  # K
        # uploaded pinned and non-blocking: a blocking copy would wait for the device in the first step
        self.counts = upload(np.array(counts, dtype=np.float32), device)
        self.tensor_of_block = upload(np.array(tensor_of_block, dtype=np.int64), device)
        identity = neuron_block == list(range(len(neuron_block)))
        self.neuron_block = None if identity else upload(np.array(neuron_block, dtype=np.int64), device)
        self.neurons_per_kind = [sum(rows) for rows, _, _ in self.kinds]
        # a (1,)-shaped value broadcasts against any tensor of >= 1 dimension: whole tensors' values can then
        # come out of the same split as the kinds' chunks (0-d parameters need 0-d values: one unbind more)
        self.whole_split = [1] * self.n_whole if all(sig[i][0] for i in kinds["whole"]) else None


def _other(shape: tuple[int, ...], out_dim: int) -> tuple[int, ...]:
    return tuple(s for d, s in enumerate(shape) if d != out_dim)


def _partition_key(partition: Partition, shape: tuple[int, ...]) -> tuple[Any, ...]:
    rule = partition["rule"]
    if rule in ("elementwise", "whole"):
        return (rule,)
    if len(shape) < 2:
        raise ValueError(f"rule {rule!r} needs a matrix, got shape {shape}")
    segments = tuple(tuple(int(x) for x in s) for s in _segments(partition, shape))
    return (rule, partition["out_dim"] % len(shape), segments)


_PLANS: dict[Any, _GroupPlan] = {}


def _group_plan(tensors: list[Tensor], partitions: list[Partition]) -> _GroupPlan:
    """The cached plan of these tensors (built once per partition and device: its index tensors are copied to
    the device then, never during later steps)."""
    sig = tuple((tuple(t.shape), _partition_key(part, tuple(t.shape))) for t, part in zip(tensors, partitions))
    key = (sig, tensors[0].device)
    plan = _PLANS.get(key)
    if plan is None:
        if len(_PLANS) >= 64:
            _PLANS.pop(next(iter(_PLANS)))
        plan = _PLANS[key] = _GroupPlan(sig, tensors[0].device)
    return plan


def block_sq_sums(grads: list[Tensor], partitions: list[Partition]) -> Tensor:
    """Σ g² of every block of every tensor, as one float32 vector: the ``K`` blocks of the non-elementwise
    tensors in :class:`_GroupPlan` order, then one total per elementwise tensor (for the non-finite check).

    A fixed number of ops, whatever the number of tensors: one squared-norm reduction per run of small
    gradients (concatenated) and per large gradient, one ``torch._foreach_norm`` over the whole and
    elementwise tensors, and for blocks of several neurons (heads, qkv) one sum per run of equal block
    sizes. Sums of g² are formed exactly as :func:`block_mean_sq` forms them. Every element of ``g`` is
    read once (4 B per fp32 element; a small gradient is also copied once, +8 B).
    """
    plan = _group_plan(grads, partitions)
    g = [grads[i] for i in plan.order]
    acc = torch.float64 if any(x.dtype == torch.float64 for x in g) else torch.float32
    norms = []
    for positions, dim, reduce in plan.parts:
        x = g[positions[0]] if len(positions) == 1 else torch.cat([g[k] for k in positions], dim)
        norms.append(torch.linalg.vector_norm(x, dim=reduce, dtype=acc))
    if plan.n_whole + plan.n_elem:
        norms.append(torch.stack(torch._foreach_norm(g[plan.n_block:], 2, dtype=acc)))
    sums = (norms[0] if len(norms) == 1 else torch.cat(norms)).square_()
    if sums.dtype != torch.float32:
        sums = sums.float()
    if plan.runs is None:  # every block is one neuron (rows) or one tensor (whole)
        return sums
    pieces = sums.split([n for n, _ in plan.runs])
    return torch.cat([p if u == 1 else p.view(-1, u).sum(1) for p, (_, u) in zip(pieces, plan.runs)])


def _float64(device: torch.device) -> torch.dtype:
    return torch.float32 if device.type == "mps" else torch.float64  # MPS has no float64


def block_adam_foreach(params: list[Tensor], grads: list[Tensor], exp_avgs: list[Tensor], exp_avg_sqs: list[Tensor],
                      steps: list[Tensor], partitions: list[Partition], *, lr: float | Tensor, beta1: float,
                      beta2: float, eps: float, weight_decays: list[float], sq_sums: Tensor | None = None) -> None:
    """One step of block-wise Adam on many tensors of one device, in place: :func:`block_adam_step` for each, in a
    number of ops that does not grow with the number of tensors (46 per step for the 1b preset's 219
    tensors, check included; ``tests/test_launches_adammini.py``). Exceptions: a gradient larger than
    ``CAT_MAX_NUMEL`` adds its own reduction; ``m`` in another dtype than ``g`` adds a cast per tensor;
    and on CUDA the last op, whose per-block factors are broadcasting views, runs torch's per-tensor
    fallback (one kernel per tensor), as the broadcast views of the per-tensor path did. (On CUDA the
    optimizer steps the tensors that ``ops.block_moments_triton`` takes there, in three launches and
    24 B/param; this function steps the rest, e.g. GPT-2's Conv1D columns and elementwise blocks.)

    ``steps`` are the tensors' own step counters (0-d float32 tensors on the tensors' device); they are
    advanced here, and the bias corrections come from them as float64 device vectors, so no value goes to
    the host and nothing branches on a device value. ``lr`` may be a tensor. ``sq_sums`` is
    :func:`block_sq_sums` of ``grads`` when already computed (the optimizer's non-finite check does).

    Algorithm (the elementwise partitions are plain AdamW with per-element v)::

        t <- t + 1;  s = lr / (1 - beta1^t);  c = sqrt(1 - beta2^t)         per tensor, on the device
        p <- p (1 - lr lambda)                                               _foreach_mul_
        m <- beta1 m + (1 - beta1) g                                          _foreach_lerp_
        v_b <- beta2 v_b + (1 - beta2) mean_b(g²)                             _foreach_mul_, _foreach_add_
        r_b = s / (sqrt(v_b) / c + eps)                                       on the flat K-vector of blocks
        p <- p - m r                                                          _foreach_addcmul_, r a broadcast view

    Bytes per parameter (fp32 p, g, m; one pass is one read or write of 4 B per element): block sums read g
    (4 B; a gradient small enough to be concatenated is also copied, +8 B), weight decay reads and writes p
    (8 B, only for decayed tensors), the m update reads m, g and writes m (12 B), the p update reads p, m
    and writes p (12 B): 28 B/param without weight decay, 36 B with it, against 28 B for fused AdamW (which
    fuses the decay but also reads and writes a full v) and a floor of 20 B (p, g, m read; p, m written)
    that only a fused kernel computing a block's sums and its update in one pass reaches. v, the bias
    corrections and the block values are O(blocks), not O(params).

    Differs from :func:`block_adam_step` in rounding only: the update is p - m·(s/d) (one rounding of s/d per
    block) where the per-tensor step computes p + (-s·m)/d; a GPU also contracts p - m·r into one FMA. v and
    m are bit-identical on CPU.
    """
    if not params:
        return
    plan = _group_plan(grads, partitions)
    if sq_sums is None:
        sq_sums = block_sq_sums(grads, partitions)
    order = plan.order
    P, G, M, V, S = ([x[i] for i in order] for x in (params, grads, exp_avgs, exp_avg_sqs, steps))
    W = [weight_decays[i] for i in order]
    nb, nw, ne = plan.n_block, plan.n_whole, plan.n_elem
    nbw = nb + nw
    device = P[0].device
    f64 = _float64(device)
    if isinstance(lr, Tensor):  # stays a tensor: a CPU scalar, or moved once to the device, never read
        lr = lr.to(device if lr.device.type != "cpu" else lr.device, f64).reshape(())
    r_dtype = torch.float64 if P[0].dtype == torch.float64 else torch.float32  # opmath of p (bf16 -> fp32)

    # t <- t + 1; the bias corrections from each tensor's own counter, as float64 device vectors
    torch._foreach_add_(S, 1)
    t = torch.stack(S).to(f64)
    sqrt_bc2 = (1 - torch.pow(beta2, t)).sqrt_()  # sqrt(1 - beta2^t)
    step_size = (1 - torch.pow(beta1, t)).reciprocal_().mul_(lr)  # lr / (1 - beta1^t)

    # decoupled weight decay: p <- p (1 - lr lambda)
    for wd in sorted(set(W) - {0.0}):
        # a tensor lr: one launch (rsub), not decay_factor's three (the step's launch count is held by a test)
        factor = decay_factor(lr, wd) if not isinstance(lr, Tensor) else torch.rsub(lr, 1, alpha=wd)
        if isinstance(factor, Tensor) and factor.device.type != "cpu" and P[0].dtype in (torch.float32, torch.float64):
            factor = factor.to(P[0].dtype)  # torch's fused multi-tensor mul takes a device scalar of p's dtype
        torch._foreach_mul_([p for p, w in zip(P, W) if w == wd], factor)

    # m <- beta1 m + (1 - beta1) g
    torch._foreach_lerp_(M, [g if g.dtype == m.dtype else g.to(m.dtype) for g, m in zip(G, M)], 1 - beta1)

    updates: list[Tensor] = []  # r per tensor, broadcasting against p
    if nbw:
        # v_b <- beta2 v_b + (1 - beta2) mean_b(g²)
        means = (sq_sums if ne == 0 else sq_sums[:plan.n_blocks]) / plan.counts
        pieces = list(means.split(plan.blocks_per_tensor + ([nw] if nw else [])))
        if nw:
            pieces[-1:] = pieces[-1].unbind()
        torch._foreach_mul_(V[:nbw], beta2)
        torch._foreach_add_(V[:nbw], pieces, alpha=1 - beta2)
        # r_b = lr / (1 - beta1^t) / (sqrt(v_b) / sqrt(1 - beta2^t) + eps), on all K blocks at once
        v = torch.cat([*V[:nb], torch.stack(V[nb:nbw])] if nw else V[:nb]) if nb else torch.stack(V[nb:nbw])
        coef = torch.stack([sqrt_bc2, step_size])
        if r_dtype == v.dtype:
            coef = coef.to(v.dtype)
        corr, step_b = coef.index_select(1, plan.tensor_of_block).unbind()
        denom = v.sqrt_().div_(corr if corr.dtype == v.dtype else corr.to(v.dtype)).add_(eps)
        r = torch.div(step_b, denom)
        # one value per output neuron (heads, qkv: the block's value repeated), split into broadcast views
        if plan.neuron_block is not None:
            r = r.index_select(0, plan.neuron_block)
        tail = plan.whole_split or ([nw] if nw else [])
        chunks = r.split(plan.neurons_per_kind + tail) if len(plan.kinds) + len(tail) > 1 else [r]
        for chunk, (rows, view, dim) in zip(chunks, plan.kinds):
            updates += chunk.view(view).split(rows, dim)
        if nw:
            updates += chunks[len(plan.kinds):] if plan.whole_split else chunks[-1].unbind()
    if ne:  # plain AdamW: v per element
        Ve, Ge = V[nbw:], G[nbw:]
        torch._foreach_mul_(Ve, beta2)
        torch._foreach_addcmul_(Ve, Ge, Ge, value=1 - beta2)
        denom_e = torch._foreach_sqrt(Ve)
        torch._foreach_div_(denom_e, sqrt_bc2[nbw:].to(Ve[0].dtype).unbind())
        torch._foreach_add_(denom_e, eps)
        updates += torch._foreach_div(step_size[nbw:].to(r_dtype).unbind(), denom_e)
    # p <- p - m r  (= p - lr m_hat / (sqrt(v_hat_b) + eps), r broadcast over each block)
    torch._foreach_addcmul_(P, M, updates, value=-1)
