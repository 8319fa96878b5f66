"""What slimopt's optimizers need to know about DDP and FSDP2, in one place.

Under DDP every rank holds whole parameters and identical, already averaged gradients: an optimizer runs
as on one device and every helper here is a no-op. Under FSDP2 (``torch.distributed.fsdp.fully_shard``)
parameters, gradients and ``zeros_like(p)`` state are DTensors sharded on dim 0: each rank holds a block
of rows. Two rules follow, and these helpers implement them so the optimizers do not have to:

* **Decisions come from global shapes.** ``p.shape`` of a DTensor is already the global shape (plans use
  it); the arithmetic runs on ``local(t)``, the rank's own rows.
* **A reduction that crosses shards becomes a local partial plus one all-reduce.** "Sum of g² over this
  block" (Adam-mini), "column sums of squares" (SinkGD, under row sharding), "Gram matrix GᵀG" (SWAN) are
  each a local partial sum and a single all-reduce of a vector or a small matrix -- never a gather of
  the parameter.

State that is shaped like its parameter is best made with ``zeros_like(p)`` (a DTensor with the
parameter's placements, which DCP saves and reshards). State of another shape that is per rank (MicroAdam
compresses each local shard on its own) is wrapped by :func:`shard_state` as a DTensor whose global
tensor is the rank-by-rank concatenation; state that every rank holds identically (Adam-mini's one value
per block) stays a plain tensor, which DCP treats as replicated.

Every collective issued here is counted in :data:`COMM` (bytes, per process), which the tests hold
against ``slimopt.comm.comm_bytes_per_step``, the analytic count of what each optimizer adds per step.
"""

from __future__ import annotations

import contextlib
import math
import sys
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field
from typing import Any

import torch
import torch.distributed as dist
from torch import Tensor

__all__ = [
    "COMM",
    "column_sq_sums",
    "exactly_finite",
    "full",
    "global_shape",
    "gram",
    "is_sharded",
    "local",
    "shard_mesh_dims",
    "local_offset",
    "local_part",
    "local_rows",
    "local_slice",
    "nonfinite_flags",
    "partial_sums",
    "rebind_params",
    "row_sq_sums",
    "shard_row_offset",
    "shard_sizes",
    "shard_state",
    "sq_sum",
    "sq_sums_along",
    "sum_across_shards",
]


# --------------------------------------------------------------------------------------------------
# what a tensor is: global shape, local part, where the local part sits


def _acc(x: Tensor) -> torch.dtype:
    """Accumulation dtype of reductions: float32, or float64 for float64 tensors."""
    return torch.promote_types(x.dtype, torch.float32) if x.is_floating_point() else torch.float32


def is_dtensor(t: Any) -> bool:
    # torch.distributed.tensor takes seconds to import; no tensor can be a DTensor before it is imported
    module = sys.modules.get("torch.distributed.tensor")
    return module is not None and isinstance(t, module.DTensor)


def local(t: Tensor) -> Tensor:
    """The rank's own part of ``t`` (the tensor itself unless it is a DTensor). In-place ops on the
    result change ``t``."""
    return t._local_tensor if is_dtensor(t) else t


def global_shape(t: Tensor) -> tuple[int, ...]:
    """The shape of the whole tensor, whatever its sharding (a DTensor's ``shape`` is already global)."""
    return tuple(int(s) for s in t.shape)


def shard_mesh_dims(t: Tensor, dim: int | None = None) -> list[int]:
    """Mesh dimensions whose placement shards ``t`` (along tensor dim ``dim``, when given)."""
    if not is_dtensor(t):
        return []
    out = []
    for mesh_dim, placement in enumerate(t.placements):
        if placement.is_shard() and (dim is None or placement.dim % max(t.ndim, 1) == dim % max(t.ndim, 1)):
            out.append(mesh_dim)
        elif placement.is_partial():
            raise ValueError(f"slimopt.core.distributed: a Partial placement ({placement}) is a pending sum, not a "
                             "shard; redistribute the tensor first")
    return out


def is_sharded(t: Tensor, dim: int | None = None) -> bool:
    """Whether ``t`` is split across ranks (along tensor dim ``dim``, when given)."""
    return bool(shard_mesh_dims(t, dim))


def local_offset(t: Tensor) -> tuple[int, ...]:
    """Global index of the first element of the local part, per dimension (zeros when not sharded)."""
    if not is_sharded(t):
        return (0,) * t.ndim
    from torch.distributed.tensor._utils import compute_local_shape_and_global_offset

    _, offset = compute_local_shape_and_global_offset(t.shape, t.device_mesh, t.placements)
    return tuple(int(o) for o in offset)


def shard_row_offset(t: Tensor) -> int:
    """Global index of the first local row (dim 0)."""
    return local_offset(t)[0] if t.ndim else 0


def local_rows(t: Tensor) -> tuple[int, int]:
    """``(start, stop)`` of the global rows (dim 0) held by this rank."""
    start = shard_row_offset(t)
    return start, start + (local(t).shape[0] if t.ndim else 1)


def shard_sizes(t: Tensor, dim: int = 0) -> list[int]:
    """Length along ``dim`` of every rank's part, in rank order of a 1-D mesh (``[len]`` when not sharded).

    FSDP2 and DTensor cut like ``torch.chunk``: ``ceil(n / world)`` per rank, the last ones shorter or
    empty. Computed from the global shape alone, so every rank gets the same answer without talking.
    """
    n = global_shape(t)[dim]
    mesh_dims = shard_mesh_dims(t, dim)
    if not mesh_dims:
        return [n]
    if len(mesh_dims) > 1:
        raise NotImplementedError("slimopt.core.distributed: a dimension sharded over several mesh dimensions")
    world = t.device_mesh.size(mesh_dims[0])
    chunk = -(-n // world)
    return [max(0, min(chunk, n - r * chunk)) for r in range(world)]


def local_slice(vector: Tensor, t: Tensor, dim: int) -> Tensor:
    """The part of a global-length ``vector`` along ``t``'s dim ``dim`` that this rank's part covers."""
    if not is_sharded(t, dim):
        return vector
    start = local_offset(t)[dim]
    return vector.narrow(0, start, local(t).shape[dim])


# --------------------------------------------------------------------------------------------------
# collectives: a partial sum plus one all-reduce


@dataclass
class CommCounter:
    """Bytes this process sent into all-reduces issued by slimopt (not gradient reduction), and how many."""

    bytes: int = 0
    calls: int = 0
    by_tag: dict[str, int] = field(default_factory=dict)

    def add(self, x: Tensor, tag: str) -> None:
        n = x.numel() * x.element_size()
        self.bytes += n
        self.calls += 1
        self.by_tag[tag] = self.by_tag.get(tag, 0) + n

    def reset(self) -> None:
        self.bytes, self.calls, self.by_tag = 0, 0, {}


COMM = CommCounter()


def _all_reduce(x: Tensor, t: Tensor, mesh_dims: Sequence[int], op: Any, tag: str) -> Tensor:
    for mesh_dim in mesh_dims:
        COMM.add(x, tag)
        dist.all_reduce(x, op=op, group=t.device_mesh.get_group(mesh_dim))
    return x


def sum_across_shards(partial: Tensor, t: Tensor, dims: Sequence[int] | None = None, *, tag: str = "sum") -> Tensor:
    """Complete, in place, a sum over ``t``'s dims ``dims`` (default: all) of which each rank holds the
    part over its own shard. A no-op unless ``t`` is sharded along one of those dims."""
    dims = range(t.ndim) if dims is None else dims
    mesh_dims = sorted({m for d in dims for m in shard_mesh_dims(t, d)})
    return _all_reduce(partial, t, mesh_dims, dist.ReduceOp.SUM, tag) if mesh_dims else partial


def partial_sums(t: Tensor, *, tag: str = "sums") -> Callable[[Tensor, tuple[int, ...]], Tensor]:
    """``complete(partial, dims)`` for kernels that take one: completes a sum over ``t``'s ``dims``."""

    def complete(partial: Tensor, dims: tuple[int, ...]) -> Tensor:
        return sum_across_shards(partial, t, dims, tag=tag)

    return complete


def sq_sum(x: Tensor, t: Tensor | None = None, *, tag: str = "sq_sum") -> Tensor:
    """Σ x² over the whole (global) tensor, in float32 (float64 for float64 input); ``x`` may be
    ``t``'s local part or ``t`` itself."""
    t = x if t is None else t
    total = torch.linalg.vector_norm(local(x), dtype=_acc(local(x))).square()
    return sum_across_shards(total, t, tag=tag)


def sq_sums_along(x: Tensor, t: Tensor | None = None, dim: int = 0, *, tag: str = "sq_sums") -> Tensor:
    """Σ x² over every dimension but ``dim``, as a float32 (float64) vector of the *global* length of ``dim``.

    Each rank sums its own part; one all-reduce completes the sums when ``t`` is sharded. Where ``dim``
    itself is the sharded one, each rank fills its own stretch of a zero vector first, so every rank ends
    up with the whole vector. (Adam-mini's per-neuron sums, before they are grouped into blocks.)
    """
    t = x if t is None else t
    x_local = local(x)
    other = [d for d in range(x_local.ndim) if d != dim]
    sums = torch.linalg.vector_norm(x_local, dim=other, dtype=_acc(x_local)).square_() if other else \
        x_local.to(_acc(x_local)).square()
    if not is_sharded(t):
        return sums
    if is_sharded(t, dim):
        full = sums.new_zeros(global_shape(t)[dim])
        full.narrow(0, local_offset(t)[dim], sums.shape[0]).copy_(sums)
        sums = full
    return sum_across_shards(sums, t, tag=tag)


def column_sq_sums(x: Tensor, t: Tensor | None = None, *, tag: str = "column_sq_sums") -> Tensor:
    """Σ_i x[i, j]² for the columns ``j`` of the local part (float32 or float64, length = local columns).

    Under row sharding (FSDP2) a column is spread over all ranks: one all-reduce of an n-vector. Row
    sums need no communication there (:func:`row_sq_sums`).
    """
    t = x if t is None else t
    sums = torch.linalg.vector_norm(local(x), dim=0, dtype=_acc(local(x))).square_()
    return sum_across_shards(sums, t, [0], tag=tag)


def row_sq_sums(x: Tensor, t: Tensor | None = None, *, tag: str = "row_sq_sums") -> Tensor:
    """Σ_j x[i, j]² for the rows ``i`` of the local part (float32 or float64); local under row sharding."""
    t = x if t is None else t
    sums = torch.linalg.vector_norm(local(x), dim=1, dtype=_acc(local(x))).square_()
    return sum_across_shards(sums, t, [1], tag=tag)


def gram(x: Tensor, t: Tensor | None = None, *, tag: str = "gram") -> Tensor:
    """XᵀX (n x n, float32 or float64) of the whole matrix, from the local rows plus one all-reduce of n² values.

    Under row sharding ``Σ_ranks X_rᵀ X_r = XᵀX``, so SWAN's whitening ``X (XᵀX)^{-1/2}`` needs no
    gather: each rank then multiplies its own rows.
    """
    t = x if t is None else t
    if is_sharded(t, 1):
        raise NotImplementedError("gram: columns sharded across ranks (tensor parallel) are not supported")
    xl = local(x).to(_acc(local(x)))
    return sum_across_shards(xl.T @ xl, t, [0], tag=tag)


def full(t: Tensor, *, tag: str = "gather") -> Tensor:
    """The whole tensor on every rank (an all-gather of the shards; ``t`` itself when not sharded).

    For methods that need the full matrix and where that is the cheapest way to get it (SWAN whitens
    on the short side of a wide matrix: gathering its m x n values costs less than an n x n Gram).
    """
    if not is_sharded(t):
        return local(t)
    whole = t.full_tensor()
    received = whole.numel() - local(t).numel()
    COMM.bytes += received * whole.element_size()
    COMM.calls += 1
    COMM.by_tag[tag] = COMM.by_tag.get(tag, 0) + received * whole.element_size()
    return whole


def local_part(whole: Tensor, t: Tensor) -> Tensor:
    """The part of the global-shaped ``whole`` that this rank holds of ``t`` (``whole`` if unsharded)."""
    if not is_sharded(t):
        return whole
    offset, shape = local_offset(t), local(t).shape
    for d in range(whole.ndim):
        if shape[d] != whole.shape[d]:
            whole = whole.narrow(d, offset[d], shape[d])
    return whole


def nonfinite_flags(grads: Sequence[Tensor]) -> Tensor:
    """One flag per gradient, on the gradients' device, True where it holds a NaN or an inf; no host sync.

    The gradients share one device and dtype. One multi-tensor l2 norm (``torch._foreach_norm``: NaN and
    inf propagate into it) covers them all; a norm that overflows (finite entries above ~1.8e19 in fp32 or
    bf16) counts as non-finite too, which callers that must be exact check again on the host
    (:func:`exactly_finite`). Sharded gradients are completed across the ranks of their mesh by one
    all-reduce (MAX) of their flags, so that every rank decides alike for every tensor.
    """
    if not grads:
        raise ValueError("nonfinite_flags: no gradients")
    norms = torch.stack(torch._foreach_norm([local(g) for g in grads], 2))
    bad = torch.sub(norms, norms).ne(0)  # x - x is NaN exactly for NaN and inf: 2 launches (isfinite takes 4)
    meshes: dict[int, tuple[Tensor, list[int]]] = {}
    for i, g in enumerate(grads):
        if is_sharded(g):
            meshes.setdefault(id(g.device_mesh), (g, []))[1].append(i)
    for example, indices in meshes.values():
        flags = bad[indices].to(torch.int32)
        _all_reduce(flags, example, shard_mesh_dims(example), dist.ReduceOp.MAX, "finite")
        bad[indices] = flags.bool()
    return bad


def exactly_finite(grads: Sequence[Tensor]) -> list[bool]:
    """Whether each gradient holds no NaN and no inf, exactly, read on the host (a sync on a GPU): min and
    max are finite iff every element is (exact, and much cheaper on CPU than ``isfinite(g).all()``).
    Sharded gradients agree across their ranks (one all-reduce, MIN): every rank must call this for the
    same tensors."""
    out = []
    for g in grads:
        part = local(g)
        ok = (torch.isfinite(torch.stack(torch.aminmax(part))).all() if part.numel()
              else torch.ones((), dtype=torch.bool, device=part.device)).to(torch.int32).reshape(1)
        if is_sharded(g):
            _all_reduce(ok, g, shard_mesh_dims(g), dist.ReduceOp.MIN, "finite")
        out.append(bool(ok.item()))
    return out


# --------------------------------------------------------------------------------------------------
# per-rank state as DTensors, so that DCP saves every rank's part


def shard_state(state: Tensor, p: Tensor, dim: int = 0) -> Tensor:
    """Wrap the rank-local ``state`` of sharded parameter ``p`` as a DTensor split along ``dim``.

    The global tensor is the concatenation of every rank's ``state`` in rank order, so DCP saves each
    rank's part (a plain tensor would be saved from one rank only, as if replicated). Every rank must
    hold the same ``state`` shape (:func:`padded_rows` makes sure of it). Returns ``state`` itself when
    ``p`` is not sharded.
    """
    if not is_sharded(p):
        return state
    from torch.distributed.tensor import DTensor, Replicate, Shard

    mesh_dims = shard_mesh_dims(p)
    placements = [Replicate()] * p.device_mesh.ndim
    for m in mesh_dims:
        placements[m] = Shard(dim)
    shape = list(state.shape)
    shape[dim] *= math.prod(p.device_mesh.size(m) for m in mesh_dims)
    stride = torch.empty(shape, device="meta").stride()
    return DTensor.from_local(state, p.device_mesh, placements, run_check=False, shape=torch.Size(shape),
                              stride=stride)


def padded_rows(p: Tensor) -> int:
    """Rows every rank's part of ``p`` is treated as having: the largest shard (FSDP2's padded size)."""
    return max(shard_sizes(p, 0)) if is_sharded(p, 0) else (global_shape(p)[0] if p.ndim else 1)


@contextlib.contextmanager
def padded_local(p: Tensor, grad: Tensor) -> Iterator[tuple[Tensor, Tensor]]:
    """Yield ``(p_local, grad_local)`` padded with zero rows to :func:`padded_rows`; write ``p`` back.

    Equal shapes on every rank let per-rank state (MicroAdam's) form one DTensor. Only the shorter,
    last ranks of an uneven split copy; everyone else works on ``p``'s own storage.
    """
    p_local, g_local = local(p), local(grad)
    rows = padded_rows(p)
    if not is_sharded(p, 0) or p_local.shape[0] == rows:
        yield p_local, g_local
        return
    shape = (rows, *p_local.shape[1:])
    p_work = p_local.new_zeros(shape)
    g_work = g_local.new_zeros(shape)
    p_work[: p_local.shape[0]].copy_(p_local)
    g_work[: g_local.shape[0]].copy_(g_local)
    yield p_work, g_work
    p_local.copy_(p_work[: p_local.shape[0]])


# --------------------------------------------------------------------------------------------------
# trainers that shard after the optimizer exists


def rebind_params(optimizer: torch.optim.Optimizer, model: torch.nn.Module) -> int:
    """Point ``optimizer``'s param groups at ``model``'s current parameters, matched by name.

    ``fully_shard`` replaces every parameter by a DTensor; an optimizer built before sharding still
    holds the old tensors. Accelerate and the HF Trainer swap them in the param groups (by data
    pointer); this does the same by the names slimopt keeps in ``group["param_names"]``. Everything else
    the optimizer knows lives in the groups, so nothing is lost. State must still be empty (it is keyed by
    the old tensors). Returns the number of tensors swapped.
    """
    if optimizer.state:
        raise RuntimeError("rebind_params: the optimizer already has state; rebind before the first step")
    current = dict(model.named_parameters(remove_duplicate=False))
    swapped = 0
    for gi, group in enumerate(optimizer.param_groups):
        names = group.get("param_names")
        if names is None:
            raise ValueError(f"rebind_params: param group {gi} has no 'param_names'; build the optimizer from "
                             "model.named_parameters()")
        missing = [n for n in names if n not in current]
        if missing:
            raise KeyError(f"rebind_params: the model has no parameter(s) {', '.join(missing)}")
        new = [current[n] for n in names]
        swapped += sum(a is not b for a, b in zip(group["params"], new))
        group["params"] = new
    return swapped
