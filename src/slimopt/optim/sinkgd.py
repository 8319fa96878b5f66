"""SinkGD: stateless Sinkhorn gradient descent (Scetbon, Ma, Gong, Meeds; "Gradient Multi-Normalization
for Stateless and Scalable LLM Training", arXiv 2502.06742, NeurIPS 2025).

Algorithm 4 for each hidden matrix W (m x n) with gradient G:

    X = SR-Sinkhorn(G, L)          # L times: rows to l2 norm sqrt(n), then columns to sqrt(m)
    W <- W - lr * scale * X        # no momentum, no second moment: no state at all

SR-Sinkhorn's iterates are all diag(r) G diag(c), so it is computed through two scale vectors
(``slimopt.ops.normalize.sinkhorn_scales``). Embeddings, the output head, norms and biases take AdamW
(``slimopt.optim.hybrid``, one fused AdamW call); only they hold optimizer state.

A step has two paths for the matrices of a group (``backend``):

* Triton (CUDA tensors under ``"auto"``; any device under ``"triton"``, CPU tensors through the interpreter):
  ``slimopt.ops.sinkhorn_triton.SinkhornScaledAdd`` steps all the group's matrices of one dtype and storage order
  together, 2L + 1 launches whatever their number and shapes: each half-step a weighted sum of squares read
  straight from G, then one pass W <- W decay - lr scale diag(r) G diag(c). 52 B per element at L = 5 for
  fp32 G and W (26 B bf16), no copies; its docstring has the design, the bytes, and what would go below.
  At the 1b preset on an H200 the model of ``shared/tools/gpu_step_estimate.py`` puts the step at ~1.7x
  torch's fused AdamW (which moves 28 B): the 2L passes over G, each from HBM in that model. Within 1x takes
  the passes from L2 (L2-sized groups of matrices, each group's passes before the next's: see that docstring
  for why that is not done).
* torch (CPU tensors, ``"torch"``, and what the kernels do not take: DTensor shards, fp16 or fp64
  parameters, views whose storage rows are not contiguous): same-shaped matrices are updated as stacks of
  up to ``stack_numel`` elements by ``slimopt.ops.normalize.sinkhorn_scaled_add_stacked_`` (~40 launches per
  stack whatever its size, 84 B moved per element at L = 5: its docstring has the design); on a CPU the
  stacks sit in the last-level cache, which is what that path is built around.

``update_matrix``, one matrix at a time, is the reference both are tested against, and the path of a matrix
sharded by FSDP2 (whose column sums take an all-reduce). A matrix whose update comes out non-finite (a NaN/inf
in its gradient under the default ``nonfinite="skip"``, or squares overflowing fp32) is left unchanged, decay
included, on every path, and counted in ``nonfinite_skips``, without a host sync.
"""

from __future__ import annotations

import warnings
from collections.abc import Callable
from typing import Any, NamedTuple

import torch
from torch import Tensor

from ..core.base import check_backend, check_positive, check_positive_int
from ..core.distributed import global_shape, is_dtensor, local, partial_sums
from ..ops.normalize import add_scaled_, sinkhorn_scaled_add_stacked_, sinkhorn_scales
from ..ops.sinkhorn_triton import GRAD_DTYPES, PARAM_DTYPES, SinkhornScaledAdd, storage_order
from ..ops.triton_support import triton_available
from ..plans.param_plan import ParamInfo
from .hybrid import STATELESS, MatrixAdamWHybrid, MatrixView, matrix_dims, routed_state_bytes

__all__ = ["SinkGD", "comm_bytes", "state_bytes_formula"]


def state_bytes_formula(t: ParamInfo, *, param_bytes: int = 4, conv_as_matrix: bool = False) -> int:
    """State bytes of one tensor (registry formula): none for a matrix (SinkGD keeps no state), AdamW's for a
    tensor the routing sends to AdamW (``hybrid.routed_state_bytes``)."""
    return routed_state_bytes(t, param_bytes=param_bytes, conv_as_matrix=conv_as_matrix)


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


class SinkGD(MatrixAdamWHybrid):
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
        backend: ``"auto"`` (the Triton kernels for CUDA tensors, the stacked torch path otherwise),
            ``"torch"``, or ``"triton"`` (the kernels for every matrix they take, CPU tensors included: under
            ``TRITON_INTERPRET=1``, as the tests run them). A group setting, like the lr.
        triton: deprecated and ignored (a ``FutureWarning``; ``backend`` chooses the path): it switched a
            per-matrix Triton kernel that was 2.3x slower than the torch path on an H200.
        nonfinite: ``"skip"`` (default) or ``"raise"`` on tensors whose gradient has a NaN/inf (see
            ``slimopt.optim.hybrid`` for what "skip" does without a host sync).
    """

    added_group_keys = ("backend",)  # 0.2.0's Triton path: a 0.1 state dict takes this optimizer's value

    def __init__(self, params: Any, lr: float | Tensor = 0.02, iters: int = 5, scale: float = 0.05,
                 weight_decay: float = 0.0, eps: float = 1e-8, *, adamw_lr: float | None = None,
                 adamw_betas: tuple[float, float] = (0.9, 0.999), adamw_eps: float = 1e-8,
                 adamw_weight_decay: float | None = None, conv_as_matrix: bool = False, backend: str = "auto",
                 triton: bool | None = None, nonfinite: str = "skip") -> None:
        check_positive_int("iters", iters)
        check_positive("scale", scale)
        check_positive("eps", eps)
        check_backend(backend)
        if triton is not None:
            warnings.warn("SinkGD(triton=...) is deprecated and ignored: backend='auto' | 'torch' | 'triton' "
                          "chooses the path (the Triton kernels for CUDA tensors by default); drop the argument",
                          FutureWarning, stacklevel=2)
        # backend is a group setting, not an attribute, so that it survives pickling and deepcopy
        defaults = {"lr": lr, "iters": iters, "scale": scale, "weight_decay": weight_decay, "eps": eps,
                    "backend": backend, "nonfinite": nonfinite}
        super().__init__(params, defaults, adamw_lr=adamw_lr, adamw_betas=adamw_betas, adamw_eps=adamw_eps,
                         adamw_weight_decay=adamw_weight_decay, conv_as_matrix=conv_as_matrix)

    def add_param_group(self, param_group: dict[str, Any]) -> None:
        check_backend(param_group.get("backend", "auto"))
        super().add_param_group(param_group)

    def update_group(self, group: dict[str, Any]) -> None:
        """A matrix group: the matrices the Triton kernels take, per (device, dtypes, storage order), in one
        ``SinkhornScaledAdd`` step each; the rest by ``update_matrices`` per bucket of same-shaped matrices
        (hybrid's ``update_group``, which an AdamW group and a group without kernels take whole)."""
        backend = group.get("backend", "auto")
        if group["update"] != STATELESS or backend == "torch" or (
                backend == "auto" and not (triton_available() and any(p.is_cuda for p in group["params"]))):
            super().update_group(group)
            return
        batches: dict[tuple[Any, ...], list[tuple[MatrixView, int]]] = {}
        buckets: dict[tuple[Any, ...], list[MatrixView]] = {}
        for index, p, grad in self.grads(group):
            view = self._matrix_view(group, index, p, grad)
            taken = self._kernel_storage(view, backend)
            if taken is None:
                buckets.setdefault(self.bucket_key(view), []).append(view)
            else:
                transposed, row_stride = taken
                key = (view.param.device, view.param.dtype, view.grad.dtype, transposed)
                batches.setdefault(key, []).append((view, row_stride))
        for key, batch in batches.items():
            self._update_with_kernels(group, key, batch)
        for views in buckets.values():
            self.update_matrices(views, group)

    @staticmethod
    def _kernel_storage(view: MatrixView, backend: str) -> tuple[bool, int] | None:
        """``storage_order`` of a matrix the kernels take under ``backend``, else None."""
        p, g = view.param, view.grad
        if (p.dtype not in PARAM_DTYPES or g.dtype not in GRAD_DTYPES or p.is_meta or is_dtensor(p)
                or (backend == "auto" and not p.is_cuda)):
            return None
        return storage_order(p, g)

    @torch.compiler.disable  # Triton launches over address tables built on the host
    def _update_with_kernels(self, group: dict[str, Any], key: tuple[Any, ...],
                             batch: list[tuple[MatrixView, int]]) -> None:
        """One ``SinkhornScaledAdd`` step of the matrices of ``batch`` (kept per group and key, rebuilt when
        their shapes or strides change); the matrices it left alone are counted as skipped (no host sync)."""
        device, param_dtype, grad_dtype, transposed = key
        matrices = tuple((v.param.shape[0], v.param.shape[1], stride) for v, stride in batch)
        cache = self.__dict__.setdefault("_sinkhorn_steps", {})  # scratch: not in the state dict, not pickled
        entry = cache.get((id(group), key))
        if entry is None or entry[0] != matrices:
            entry = cache[(id(group), key)] = (matrices, SinkhornScaledAdd(
                matrices, transposed=transposed, device=device, param_dtype=param_dtype, grad_dtype=grad_dtype))
        left_alone = entry[1].step([v.param for v, _ in batch], [v.grad for v, _ in batch], group["iters"],
                                   group["lr"], group["scale"], group["weight_decay"], group["eps"])
        self._count_skips(left_alone)

    def update_matrices(self, views: list[MatrixView], group: dict[str, Any]) -> None:
        """A bucket of same-shaped matrices (the torch path): stacks of up to ``stack_numel`` elements, each
        updated by ``sinkhorn_scaled_add_stacked_`` (sharded matrices one by one, by ``update_matrix``)."""
        sharded = [v for v in views if is_dtensor(v.param)]
        for view in sharded:
            self.update_matrix(view.param, view.grad, group, view.state)
        views = [v for v in views if not is_dtensor(v.param)] if sharded else views
        if not views:
            return
        m, n = views[0].param.shape
        if m * n == 0:
            return  # nothing to update (and nothing to decay)
        device = views[0].param.device
        decay = self.decay_factor(group)
        for chunk in self.stack_chunks(views, m * n):
            k = len(chunk)
            work = self.workspace(device, ("sinkgd", k, m, n), 2 * k * m * n, _StackBuffers.build(k, m, n))
            left_alone = sinkhorn_scaled_add_stacked_(
                [v.param for v in chunk], [v.grad for v in chunk], group["iters"], group["lr"], group["scale"], decay,
                group["eps"], stack=work.stack, gram=work.gram, gram_t=work.gram_t, updates=work.stack_rows,
                gram_rows=work.gram_rows, grads_finite=self.grads_checked(group))
            self._count_skips(left_alone)

    def update_matrix(self, param: Tensor, grad: Tensor, group: dict[str, Any], state: None) -> None:
        """The reference: one matrix, ``sinkhorn_scales`` + ``add_scaled_``; a non-finite result (its
        scales) leaves the matrix unchanged, decay included, without a host sync."""
        step_size = group["lr"] * group["scale"]  # a 0-d tensor when the lr is one (kept so: no sync)
        # Under FSDP2 each rank holds some rows: row sums are local, column sums take one all-reduce of
        # an n-vector per iteration (slimopt.core.distributed; no-ops for unsharded tensors).
        param_local, grad_local = local(param), local(grad)
        scratch = self.scratch(grad_local)
        r, c = sinkhorn_scales(grad_local, group["iters"], group["eps"], complete=partial_sums(grad),
                               shape=global_shape(grad), out=scratch)  # SR-Sinkhorn(G, L) = diag(r) G diag(c)
        # c is the whole column vector on every rank (the same there), and a NaN in r reaches it
        ok = torch.isfinite(c.sum())
        self._count_skips(ok.logical_not())
        self.decay_where(param_local, group, ok)
        if not self.grads_checked(group):  # a non-finite G times the zeroed scales would still be NaN
            grad_local = grad_local.nan_to_num(0.0, 0.0, 0.0)
        add_scaled_(param_local, grad_local, torch.where(ok, r, 0.0), torch.where(ok, c, 0.0), -step_size,
                    out=scratch)  # W <- W - lr * scale * X


class _StackBuffers(NamedTuple):
    """The work buffers of a stack of k (m, n) matrices, and the views a step takes of them (made once: a view is
    a dispatched op)."""

    stack: Tensor  # G's stack (k, m, n), then the updates
    gram: Tensor  # A = G*G
    gram_t: Tensor  # A's transpose
    stack_rows: tuple[Tensor, ...]  # the stack's matrices
    gram_rows: tuple[Tensor, ...]

    @staticmethod
    def build(k: int, m: int, n: int) -> Callable[[Tensor], _StackBuffers]:
        """The buffers as views of ``flat`` (2 k m n fp32 elements), for ``MatrixAdamWHybrid.workspace``."""
        def build(flat: Tensor) -> _StackBuffers:
            stack, gram = flat.view(2, k, m, n).unbind(0)
            return _StackBuffers(stack, gram, gram.mT, stack.unbind(0), gram.unbind(0))
        return build
