"""SinkGD: stateless Sinkhorn gradient descent (Scetbon, Ma, Gong, Meeds; "Gradient Multi-Normalization
for Stateless and Scalable LLM Training", arXiv 2502.06742, NeurIPS 2025).

Algorithm 4 for each hidden matrix W (m x n) with gradient G:

    X = SR-Sinkhorn(G, L)          # L times: rows to l2 norm sqrt(n), then columns to sqrt(m)
    W <- W - lr * scale * X        # no momentum, no second moment: no state at all

SR-Sinkhorn's iterates are all diag(r) G diag(c), so it is computed through two scale vectors
(``slimopt.ops.normalize.sinkhorn_scales``). Embeddings, the output head, norms and biases take AdamW
(``slimopt.optim.hybrid``); only they hold optimizer state.
"""

from __future__ import annotations

from typing import Any

from torch import Tensor

from ..core.base import check_positive, check_positive_int
from ..core.distributed import global_shape, local, partial_sums
from ..ops.normalize import add_scaled_, sinkhorn_scales
from .hybrid import HybridStatelessOptimizer, matrix_dims

__all__ = ["SinkGD", "comm_bytes"]


def comm_bytes(group: dict[str, Any], index: int, shape: tuple[int, ...], hops: int, local_numel: int,
               p: Tensor) -> dict[str, int]:
    """Collectives of one sharded tensor per step: the fp32 scale vectors; row sums stay local under row
    sharding, each iteration's column sums take an all-reduce (+ one for the final norm)."""
    dims = matrix_dims(group, index, shape)
    if dims is None:
        return {}
    rows, cols, transposed = dims
    iters = group["iters"]
    return {"sums": 4 * hops * (iters * rows if transposed else iters * cols + 1)}


class SinkGD(HybridStatelessOptimizer):
    """SinkGD with the papers' hybrid routing (AdamW for non-hidden tensors).

    Args:
        params: tensors, ``(name, tensor)`` pairs or param groups (see ``slimopt.optim.hybrid`` for routing).
        lr: global learning rate (0.02 in the papers' GaLore-benchmark convention). AdamW tensors use it
            unless ``adamw_lr`` is given; SinkGD matrices move by ``lr * scale`` per unit-RMS update.
        iters: L, the number of row-then-column normalisation rounds (5 in the paper).
        scale: alpha, the multiplier on ``lr`` for the matrices (0.05: effective step 1e-3).
        weight_decay: decoupled weight decay, W <- W (1 - lr * scale * weight_decay) on the matrices; also
            AdamW's unless ``adamw_weight_decay`` is given. The paper uses none.
        eps: clamp on row and column norms (a zero row or column stays zero).
        adamw_lr, adamw_betas, adamw_eps, adamw_weight_decay: the AdamW fallback's hyper-parameters.
        conv_as_matrix: update 3-D+ weights (convolutions) as (out, in*kh*kw) matrices instead of AdamW.
        triton: run CUDA matrices through the Triton twin (``slimopt.ops.sinkhorn_triton``: G*G squared on
            the fly, no fp32 scratch). Off by default: so far validated under Triton's interpreter only.
        nonfinite: ``"raise"`` (default) or ``"skip"`` tensors whose gradient has a NaN/inf.
    """

    def __init__(self, params: Any, lr: float | Tensor = 0.02, iters: int = 5, scale: float = 0.05,
                 weight_decay: float = 0.0, eps: float = 1e-8, *, adamw_lr: float | None = None,
                 adamw_betas: tuple[float, float] = (0.9, 0.999), adamw_eps: float = 1e-8,
                 adamw_weight_decay: float | None = None, conv_as_matrix: bool = False, triton: bool = False,
                 nonfinite: str = "raise") -> None:
        check_positive_int("iters", iters)
        check_positive("scale", scale)
        check_positive("eps", eps)
        defaults = {"lr": lr, "iters": iters, "scale": scale, "weight_decay": weight_decay, "eps": eps,
                    "triton": bool(triton), "nonfinite": nonfinite}
        super().__init__(params, defaults, adamw_lr=adamw_lr, adamw_betas=adamw_betas, adamw_eps=adamw_eps,
                         adamw_weight_decay=adamw_weight_decay, conv_as_matrix=conv_as_matrix)

    def update_matrix(self, param: Tensor, grad: Tensor, group: dict[str, Any], state: None) -> None:
        step_size = group["lr"] * group["scale"]  # a 0-d tensor when the lr is one (kept so: no sync)
        # Under FSDP2 each rank holds some rows: row sums are local, column sums take one all-reduce of
        # an n-vector per iteration (slimopt.core.distributed; no-ops for unsharded tensors).
        param_local, grad_local = local(param), local(grad)
        if group["weight_decay"] != 0:
            param_local.mul_(1 - step_size * group["weight_decay"])
        if group.get("triton") and grad_local.is_cuda and param_local.stride(-1) == 1:
            from ..ops.sinkhorn_triton import sinkgd_update_triton  # imports triton only when asked

            sinkgd_update_triton(param_local, grad_local, group["iters"], float(step_size), eps=group["eps"],
                                 complete=partial_sums(grad), shape=global_shape(grad))
            return
        scratch = self.scratch(grad_local)
        r, c = sinkhorn_scales(grad_local, group["iters"], group["eps"], complete=partial_sums(grad),
                               shape=global_shape(grad), out=scratch)  # SR-Sinkhorn(G, L) = diag(r) G diag(c)
        add_scaled_(param_local, grad_local, r, c, -step_size, out=scratch)  # W <- W - lr * scale * X
