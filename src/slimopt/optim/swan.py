"""SWAN: SGD with Whitening And Normalization (Ma, Gong, Scetbon, Meeds, et al.; "SWAN: SGD with
Normalization and Whitening Enables Stateless LLM Training", arXiv 2412.13148, ICML 2025).

Algorithm 1 for each hidden matrix W (m x n, m <= n; a tall matrix is handled transposed):

    G~ = GradNorm(G)               # each row minus its mean, divided by its standard deviation
    X  = GradWhitening(G~)         # ~ (G~ G~^T)^(-1/2) G~ with a cutoff: 5 polynomial steps on G~ itself
    X <- sqrt(mn) X / ||X||_F      # optional: entry-RMS 1, the same step scale as SinkGD and Adam
    W <- W - lr * scale * X        # stateless

Embeddings, the output head, norms and biases take AdamW (``slimopt.optim.hybrid``).

The whitening (``slimopt.ops.newton_schulz``) is U F(S / s) V^T for G~ = U S V^T, with s an upper bound
on the largest singular value and F a fixed odd polynomial: singular values at and above 2e-3 s come out
within 3% of 1 (whitened, as the paper's U V^T), those far below go towards 0 (F(x) <= 683 x), as a
pseudo-inverse with a relative cutoff does. So directions that only rounding puts into G~ (a rank-
deficient gradient's null directions: small batches, wide matrices) cannot steer the update, and the
update is a stable function of the gradient (FSDP2, whose gathered gradient differs from one process's
by rounding, gives the one-process result). Five steps, fp32 on CPU and TF32 operands with fp32
accumulation on CUDA (``tf32=False``: full fp32).

Which axis GradNorm standardises. The paper states the algorithm for m <= n, rows being the short side,
and takes a tall matrix as its transpose; so does this module, for both steps. For a wide matrix
(``out <= in``: q/k/v/o of most models, the MLP's down projection) each row, one output neuron's
weights, is standardised over the n inputs; for a tall one (the MLP's gate and up projections, m = the
intermediate size > n) each *column* is, over the m outputs. Why the transpose rather than the output
rows every time: the whitening (G G^T)^(-1/2) G works on the short side (an m x m Gram, m the smaller
dimension) and equalises the short side's directions; GradNorm is its first half, the same rows,
centred and scaled so that the Gram's diagonal is n (the long side's length) before the directions are
decorrelated. Standardising the other axis of a tall matrix would give each output neuron unit scale
and then whiten a different set of rows against each other. Keeping the paper's convention also keeps
every row statistic over the long side (thousands of entries), never over the short one.

A step: same-shaped matrices (a tall one counted by its transpose's shape, so that the MLP's gate, up
and down projections share one) are stacked, up to ``stack_numel`` elements a stack, standardised
(``row_standardize_stacked_``) and whitened together (``whiten_stacked_``): a fixed number of launches
per stack whatever its size, the whitening's 15 batched matmuls included (its cost is flops, 10 m^2 n +
5 m^3 per matrix, not bytes). ``update_matrix``, one matrix at a time, is the reference the stacked path is
tested against. FSDP2-sharded matrices take the stacked path too, on their gathered gradients (one
all-gather each, as before), so that every rank computes what a single process computes; each rank
then adds its own rows of the update.

Never a non-finite weight: on both paths an update with a NaN or inf (a non-finite gradient, or the
whitening overflowing) leaves that matrix unchanged, weight decay included, branch-free (the update's
norm, which any NaN or inf makes non-finite, gates it on the device; no host sync).
"""

from __future__ import annotations

import math
from collections.abc import Callable
from typing import Any, NamedTuple

import torch
from torch import Tensor

from ..core.base import check_positive, check_positive_int
from ..core.distributed import full, is_dtensor, local_part
from ..core.distributed import local as local_tensor
from ..ops.newton_schulz import DEFAULT_ITERS, whiten, whiten_stacked_
from ..ops.normalize import add_stacked_, decay_factors, row_standardize, row_standardize_stacked_
from ..plans.param_plan import ParamInfo
from .hybrid import MatrixAdamWHybrid, MatrixView, matrix_dims, routed_state_bytes

__all__ = ["SWAN", "comm_bytes", "state_bytes_formula", "swan_direction"]


def swan_direction(grad: Tensor, ns_iters: int, rescale: bool = True, eps: float = 1e-8, tf32: bool = True
                   ) -> Tensor:
    """GradWhitening(GradNorm(G)) for one matrix, fp32; rows are the shorter side (transposed if tall:
    a tall matrix's columns are standardised, see the module docstring). ``tf32``: TF32 matmul operands
    in the whitening on CUDA."""
    tall = grad.shape[0] > grad.shape[1]
    g = grad.t() if tall else grad
    x = whiten(row_standardize(g, eps), ns_iters, tf32=tf32)
    if rescale:
        x.mul_(x.norm().clamp_min(eps).reciprocal().mul_(math.sqrt(x.numel())))
    return x.t() if tall else x


def state_bytes_formula(t: ParamInfo, *, param_bytes: int = 4, conv_as_matrix: bool = False) -> int:
    """State bytes of one tensor (registry formula): none for a matrix (SWAN is stateless), AdamW's for a tensor
    the routing sends to AdamW (``hybrid.routed_state_bytes``)."""
    return routed_state_bytes(t, param_bytes=param_bytes, conv_as_matrix=conv_as_matrix)


def comm_bytes(group: dict[str, Any], index: int, shape: tuple[int, ...], hops: int, local_numel: int,
               p: Tensor) -> dict[str, int]:
    """Collectives of one sharded tensor per step: SWAN gathers the whole matrix (bytes received)."""
    if matrix_dims(group, index, shape) is None:
        return {}
    return {"gather": (math.prod(shape) - local_numel) * p.element_size()}


class SWAN(MatrixAdamWHybrid):
    """SWAN with the papers' hybrid routing (AdamW for non-hidden tensors).

    Args:
        params: tensors, ``(name, tensor)`` pairs or param groups (see ``slimopt.optim.hybrid`` for routing).
        lr: global learning rate; AdamW tensors use it unless ``adamw_lr`` is given.
        ns_iters: polynomial (Newton-Schulz-type) steps of the whitening, 3 matmuls each (default 5,
            ``ops.newton_schulz.DEFAULT_ITERS``). At the default, singular values at and above 2e-3 of
            the scale s (an upper bound on the largest, at most ~1.5x it) come out within 3% of 1 and
            those below map towards 0 (F(x) <= 683 x; 0.5 at 7.7e-4 s): >= 0.97 cosine to the exact
            whitening on full-rank gradients whose spectra reach down to 1e-3. Fewer steps move the
            cutoff up (~3-8x a step); more steps polish the top and sharpen the cutoff, never growing
            small singular values.
        scale: multiplier on ``lr`` for the matrices (0.05, the GaLore-benchmark convention).
        rescale: scale each update to entry-RMS 1 (sqrt(mn) / Frobenius norm) before the step.
        weight_decay: decoupled, W <- W (1 - lr * scale * weight_decay) on the matrices; also AdamW's
            unless ``adamw_weight_decay`` is given.
        eps: guards the row standard deviations and norms (zero rows stay zero).
        adamw_lr, adamw_betas, adamw_eps, adamw_weight_decay: the AdamW fallback's hyper-parameters.
        conv_as_matrix: update 3-D+ weights (convolutions) as (out, in*kh*kw) matrices instead of AdamW.
        nonfinite: ``"skip"`` (default) or ``"raise"`` on tensors whose gradient has a NaN/inf (see ``SlimOptimizer``).
        tf32: on CUDA, the whitening's matmuls take TF32 operands with fp32 accumulation (default; tested
            in emulation against the same accuracy targets as fp32); False: full fp32. CPU always
            computes in fp32.
    """

    added_group_keys = ("tf32",)  # 0.2.0's whitening: a 0.1 state dict takes this optimizer's value

    def __init__(self, params: Any, lr: float | Tensor = 0.02, ns_iters: int = DEFAULT_ITERS, scale: float = 0.05,
                 rescale: bool = True, weight_decay: float = 0.0, eps: float = 1e-8, *,
                 adamw_lr: float | None = None, adamw_betas: tuple[float, float] = (0.9, 0.999),
                 adamw_eps: float = 1e-8, adamw_weight_decay: float | None = None,
                 conv_as_matrix: bool = False, nonfinite: str = "skip", tf32: bool = True) -> None:
        check_positive_int("ns_iters", ns_iters)
        check_positive("scale", scale)
        check_positive("eps", eps)
        defaults = {"lr": lr, "ns_iters": ns_iters, "scale": scale, "rescale": bool(rescale),
                    "weight_decay": weight_decay, "eps": eps, "nonfinite": nonfinite, "tf32": bool(tf32)}
        super().__init__(params, defaults, adamw_lr=adamw_lr, adamw_betas=adamw_betas, adamw_eps=adamw_eps,
                         adamw_weight_decay=adamw_weight_decay, conv_as_matrix=conv_as_matrix)

    def bucket_key(self, view: MatrixView) -> tuple[Any, ...]:
        """A tall matrix goes with the wide ones of its transpose's shape (it is whitened transposed);
        FSDP2-sharded matrices form buckets of their own."""
        rows, cols = view.param.shape
        return ((min(rows, cols), max(rows, cols)), view.param.dtype, str(view.param.device),
                is_dtensor(view.param))

    def update_matrices(self, views: list[MatrixView], group: dict[str, Any]) -> None:
        """A bucket of matrices whose short x long shape is the same: stacks of up to ``stack_numel``
        elements, tall ones first (stacked transposed), standardised, whitened and applied together.

        FSDP2-sharded matrices take the same stacked computation on their gathered gradients (one
        all-gather each, as ``update_matrix`` does), so that every rank computes exactly what one process
        computes, and each rank adds its own rows of the update."""
        h, w = sorted(views[0].param.shape)
        if h * w == 0:
            return  # nothing to update (and nothing to decay)
        views = [v for v in views if v.param.shape[0] > v.param.shape[1]] + \
                [v for v in views if v.param.shape[0] <= v.param.shape[1]]
        device = local_tensor(views[0].param).device
        decay = self.decay_factor(group)
        for chunk in self.stack_chunks(views, h * w):
            tall = sum(1 for v in chunk if v.param.shape[0] > v.param.shape[1])
            k = len(chunk)
            work = self.workspace(device, ("swan", tall, k - tall, h, w), (2 * k + tall) * h * w,
                                  _StackBuffers.build(tall, k - tall, h, w))
            self._update_stack(chunk, tall, work, decay, group)

    def _update_stack(self, chunk: list[MatrixView], tall: int, work: _StackBuffers,
                      decay: float | Tensor | None, group: dict[str, Any]) -> None:
        x, y = work.stack, work.work
        _, h, w = x.shape
        sharded = is_dtensor(chunk[0].param)
        grads = [full(view.grad) for view in chunk] if sharded else [view.grad for view in chunk]
        if tall:  # a tall matrix's transpose, written in place by the stacking copy
            torch.stack(grads[:tall], out=work.stack_tall_t)
        if tall < len(chunk):
            torch.stack(grads[tall:], out=work.stack_wide)
        # GradNorm, divided by sqrt(hw) so that every matrix has Frobenius norm <= 1 for the whitening
        row_standardize_stacked_(x, group["eps"], scale=1.0 / math.sqrt(h * w))
        out = whiten_stacked_(x, group["ns_iters"], work=y, transposes=work.transposes,  # y if ns_iters is odd, else x
                              tf32=group.get("tf32", True))  # (a group from an older state dict has no key)
        # the per-matrix factor: -lr scale sqrt(hw) / ||X||_F (rescale) or -lr scale; NaN for a matrix whose
        # update has a NaN or inf (its norm is then NaN or inf), which nan_to_num turns into a zero update
        norm = torch.linalg.vector_norm(out, dim=(1, 2), keepdim=True)
        bad = torch.sub(norm, norm).ne(0)  # NaN or inf: left alone, no decay either
        self._count_skips(bad)
        # (lr and scale multiply separately: a tensor lr and the same float give the same bits)
        if group["rescale"]:  # X <- sqrt(hw) X / ||X||_F, folded into the step
            factor = norm.clamp_min_(group["eps"]).reciprocal_().mul_(-group["scale"] * math.sqrt(h * w))
        else:
            factor = norm.mul_(0.0).add_(-group["scale"])  # 0 * NaN keeps the NaN
        factor.mul_(group["lr"])
        torch.mul(out, factor, out=x)
        x.nan_to_num_(0.0, 0.0, 0.0)
        if tall:
            work.tall_updates.copy_(work.stack_tall_t)  # the tall matrices' updates in their own (rows, cols) shape
        params = [view.param for view in chunk]
        factors = None if decay is None else decay_factors(factor, decay, bad)
        if sharded:  # each rank its own rows (FSDP2 shards the stored tensor's first dimension)
            for j, (view, update) in enumerate(zip(chunk, [*work.tall_update_rows, *work.wide_update_rows])):
                param = local_tensor(view.param)
                if factors is not None:
                    param.mul_(factors[j])
                param.add_(local_part(update, view.grad))
            return
        if factors is None and all(p.dtype == torch.float32 for p in params):  # tall and wide in one launch
            torch._foreach_add_(params, [*work.tall_update_rows, *work.wide_update_rows])
            return
        if tall:
            add_stacked_(params[:tall], work.tall_updates, None if factors is None else factors[:tall],
                         work=work.work_tall, updates=work.tall_update_rows, work_rows=work.work_tall_rows)
        if tall < len(chunk):
            add_stacked_(params[tall:], work.stack_wide, None if factors is None else factors[tall:],
                         work=work.work_wide, updates=work.wide_update_rows, work_rows=work.work_wide_rows)

    def update_matrix(self, param: Tensor, grad: Tensor, group: dict[str, Any], state: None) -> None:
        """The reference: one matrix, ``swan_direction``; a non-finite update leaves the matrix unchanged,
        decay included, without a host sync."""
        step_size = group["lr"] * group["scale"]  # a 0-d tensor when the lr is one (kept so: no sync)
        # Under FSDP2 each rank gathers the whole gradient, whitens it as on one device and keeps its
        # own rows (slimopt.core.distributed.full / local_part; no-ops for unsharded tensors).
        param = local_tensor(param)
        update = swan_direction(full(grad), group["ns_iters"], group["rescale"], group["eps"], group.get("tf32", True))
        ok = torch.isfinite(update).all()  # the whole update, the same on every rank
        self._count_skips(ok.logical_not())
        self.decay_where(param, group, ok)
        param.sub_(torch.where(ok, local_part(update, grad), 0.0).mul_(step_size))


class _StackBuffers(NamedTuple):
    """The work buffers of a stack of ``tall`` (w, h) and ``wide`` (h, w) matrices, h <= w, and the views a step
    takes of them (made once: a view is a dispatched op)."""

    stack: Tensor  # X (k, h, w): the gradients (tall ones transposed), then the updates
    work: Tensor  # Y (k, h, w): the whitening's second buffer
    transposes: tuple[Tensor, Tensor]  # X.mT, Y.mT
    stack_tall_t: Tensor  # X[:tall].mT (tall, w, h): a tall gradient stacked here lands transposed in X
    stack_wide: Tensor  # X[tall:]
    work_tall: Tensor  # Y[:tall] as (tall, w, h)
    work_wide: Tensor  # Y[tall:]
    tall_updates: Tensor  # (tall, w, h): the tall matrices' updates in their own shape
    tall_update_rows: tuple[Tensor, ...]
    wide_update_rows: tuple[Tensor, ...]  # X[tall:]'s matrices
    work_tall_rows: tuple[Tensor, ...]
    work_wide_rows: tuple[Tensor, ...]

    @staticmethod
    def build(tall: int, wide: int, h: int, w: int) -> Callable[[Tensor], _StackBuffers]:
        """The buffers as views of ``flat`` ((2 k + tall) h w fp32 elements, k = tall + wide), for
        ``MatrixAdamWHybrid.workspace``."""
        k = tall + wide

        def build(flat: Tensor) -> _StackBuffers:
            x = flat[: k * h * w].view(k, h, w)
            y = flat[k * h * w: 2 * k * h * w].view(k, h, w)
            v = flat[2 * k * h * w:].view(tall, w, h)
            y_tall = y[:tall].view(tall, w, h)
            return _StackBuffers(x, y, (x.mT, y.mT), x[:tall].mT, x[tall:], y_tall, y[tall:], v, v.unbind(0),
                                 x[tall:].unbind(0), y_tall.unbind(0), y[tall:].unbind(0))
        return build
