"""Communication each optimizer adds per step under FSDP2 sharding, beyond the gradient reduction.

The method's own part comes from its registry spec's ``comm`` hook (``OptimizerSpec.comm``); the
shared part (one int32 non-finite flag per sharded gradient the optimizer checks: see
``SlimOptimizer.checks_nonfinite``) from here.
"""

from __future__ import annotations

import math

import torch

from .core.base import SlimOptimizer
from .core.distributed import global_shape, is_sharded, local, shard_mesh_dims
from .registry import spec_of

__all__ = ["comm_bytes_per_step"]


def comm_bytes_per_step(optimizer: torch.optim.Optimizer, world: int | None = None) -> dict[str, int]:
    """Bytes this rank contributes to collectives per optimizer step, beyond gradient reduction.

    All-reduces count their buffer; SWAN's gather counts the bytes received. Computed from the global
    shapes and placements of the parameters the optimizer holds and the method's own rules: zero under
    DDP (replicated parameters), nothing for torch's optimizers. With ``world`` given, plain parameters
    are counted as if FSDP2 sharded each on dim 0 over ``world`` ranks (for planning, e.g. on a model
    built on the meta device; the numbers are rank 0's, which holds the largest shard). Keys: ``"total"``
    and one per kind of collective. The distributed tests hold these numbers against what the
    collectives issued through this module moved (:data:`COMM`).
    """
    found = spec_of(optimizer)
    hook = found.comm_hook() if found is not None else None
    out: dict[str, int] = {}
    for group in optimizer.param_groups:
        for index, p in enumerate(group["params"]):
            shape = global_shape(p)
            if is_sharded(p):
                hops = len(shard_mesh_dims(p))  # one all-reduce per mesh dimension that shards p
                local_numel = local(p).numel()
            elif world is not None and world > 1 and p.ndim:
                hops = 1
                local_numel = -(-shape[0] // world) * math.prod(shape[1:])
            else:
                continue
            checked = isinstance(optimizer, SlimOptimizer) and optimizer.checks_nonfinite(group)
            parts = {"finite": 4 * hops} if checked else {}
            if hook is not None:
                parts.update(hook(group, index, shape, hops, local_numel, p))
            for kind, n in parts.items():
                out[kind] = out.get(kind, 0) + n
    out["total"] = sum(out.values())
    return out
