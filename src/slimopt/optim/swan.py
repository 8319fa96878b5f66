"""SWAN: SGD with Whitening And Normalization (Ma, Gong, Scetbon, Meeds, et al.; "SWAN: SGD with
Normalization and Whitening Enables Stateless LLM Training", arXiv 2412.13148, ICML 2025).

Algorithm 1 for each hidden matrix W (m x n, m <= n; a tall matrix is handled transposed):

    G~ = GradNorm(G)               # each row minus its mean, divided by its standard deviation
    X  = GradWhitening(G~)         # (G~ G~^T)^(-1/2) G~: a Newton-Schulz polar iteration on G~ itself, fp32
    X <- sqrt(mn) X / ||X||_F      # optional: entry-RMS 1, the same step scale as SinkGD and Adam
    W <- W - lr * scale * X        # stateless

Embeddings, the output head, norms and biases take AdamW (``slimopt.optim.hybrid``).
"""

from __future__ import annotations

import math
from typing import Any

from torch import Tensor

from ..core.base import check_positive, check_positive_int
from ..core.distributed import full, local_part
from ..core.distributed import local as local_tensor
from ..ops.newton_schulz import DEFAULT_ITERS, whiten
from ..ops.normalize import row_standardize
from .hybrid import HybridStatelessOptimizer, matrix_dims

__all__ = ["SWAN", "comm_bytes", "swan_direction"]


def swan_direction(grad: Tensor, ns_iters: int, rescale: bool = True, eps: float = 1e-8) -> Tensor:
    """GradWhitening(GradNorm(G)) for one matrix, fp32; rows are the shorter side (transposed if tall)."""
    tall = grad.shape[0] > grad.shape[1]
    g = grad.t() if tall else grad
    x = whiten(row_standardize(g, eps), ns_iters)
    if rescale:
        x.mul_(x.norm().clamp_min(eps).reciprocal().mul_(math.sqrt(x.numel())))
    return x.t() if tall else x


def comm_bytes(group: dict[str, Any], index: int, shape: tuple[int, ...], hops: int, local_numel: int,
               p: Tensor) -> dict[str, int]:
    """Collectives of one sharded tensor per step: SWAN gathers the whole matrix (bytes received)."""
    if matrix_dims(group, index, shape) is None:
        return {}
    return {"gather": (math.prod(shape) - local_numel) * p.element_size()}


class SWAN(HybridStatelessOptimizer):
    """SWAN with the papers' hybrid routing (AdamW for non-hidden tensors).

    Args:
        params: tensors, ``(name, tensor)`` pairs or param groups (see ``slimopt.optim.hybrid`` for routing).
        lr: global learning rate; AdamW tensors use it unless ``adamw_lr`` is given.
        ns_iters: Newton-Schulz steps of the whitening (default 11, ``ops.newton_schulz.DEFAULT_ITERS``):
            >= 0.9999 cosine to the float64 pseudo-inverse whitening on gradients whose Gram condition
            number reaches 1e10 (singular ones included); fewer steps resolve fewer small singular values.
        scale: multiplier on ``lr`` for the matrices (0.05, the GaLore-benchmark convention).
        rescale: scale each update to entry-RMS 1 (sqrt(mn) / Frobenius norm) before the step.
        weight_decay: decoupled, W <- W (1 - lr * scale * weight_decay) on the matrices; also AdamW's
            unless ``adamw_weight_decay`` is given.
        eps: guards the row standard deviations and norms (zero rows stay zero).
        adamw_lr, adamw_betas, adamw_eps, adamw_weight_decay: the AdamW fallback's hyper-parameters.
        conv_as_matrix: update 3-D+ weights (convolutions) as (out, in*kh*kw) matrices instead of AdamW.
        nonfinite: ``"raise"`` (default) or ``"skip"`` tensors whose gradient has a NaN/inf.
    """

    def __init__(self, params: Any, lr: float | Tensor = 0.02, ns_iters: int = DEFAULT_ITERS, scale: float = 0.05,
                 rescale: bool = True, weight_decay: float = 0.0, eps: float = 1e-8, *,
                 adamw_lr: float | None = None, adamw_betas: tuple[float, float] = (0.9, 0.999),
                 adamw_eps: float = 1e-8, adamw_weight_decay: float | None = None,
                 conv_as_matrix: bool = False, nonfinite: str = "raise") -> None:
        check_positive_int("ns_iters", ns_iters)
        check_positive("scale", scale)
        check_positive("eps", eps)
        defaults = {"lr": lr, "ns_iters": ns_iters, "scale": scale, "rescale": bool(rescale),
                    "weight_decay": weight_decay, "eps": eps, "nonfinite": nonfinite}
        super().__init__(params, defaults, adamw_lr=adamw_lr, adamw_betas=adamw_betas, adamw_eps=adamw_eps,
                         adamw_weight_decay=adamw_weight_decay, conv_as_matrix=conv_as_matrix)

    def update_matrix(self, param: Tensor, grad: Tensor, group: dict[str, Any], state: None) -> None:
        step_size = group["lr"] * group["scale"]  # a 0-d tensor when the lr is one (kept so: no sync)
        # Under FSDP2 each rank gathers the whole gradient, whitens it as on one device and keeps its
        # own rows (slimopt.core.distributed.full / local_part; no-ops for unsharded tensors).
        param = local_tensor(param)
        if group["weight_decay"] != 0:
            param.mul_(1 - step_size * group["weight_decay"])
        update = swan_direction(full(grad), group["ns_iters"], group["rescale"], group["eps"])
        param.sub_(local_part(update, grad).mul_(step_size))
