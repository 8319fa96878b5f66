"""AdamW (Loshchilov & Hutter) for the tensors a plan routes to it: embeddings, heads, norms, biases.

``adamw_reference`` is the algorithm box, one tensor, op for op as ``torch.optim.AdamW``'s for-loop
path (so the two agree bit for bit). ``adamw_multi`` is the fast path over many tensors:

* where torch has its single-pass fused kernel (``torch._fused_adamw_``, what ``AdamW(fused=True)``
  runs; CPU and CUDA, fp32/fp16/bf16, contiguous tensors), it is used: every element of param, grad
  and both moments is read and written once. It agrees with the for-loop to about one ulp (it
  contracts multiply-adds differently);
* otherwise small tensors go through torch's multi-tensor (``_foreach``) ops and a big tensor is
  updated in cache-sized chunks, all of AdamW's ops on one chunk before the next, with one reused
  ``denom`` scratch: no tensor-sized temporaries (whose page faults dominate on CPU) and the same ops
  in the same order as torch, so the same bits.

Why it matters: each of the unfused path's half-dozen elementwise ops streams the whole tensor through
memory, and a token embedding (tens of MB per state tensor) does not fit in cache.

Launches and host syncs: on the fused path one ``torch._fused_adamw_`` call per (device, dtype) for all
the tensors (on a GPU a few kernels, each over many tensors), with the step counters and the lr taken
as tensors, nothing read back to the host; ``found_inf`` (a 0-d tensor, 1 = skip) skips the call's
update on the device. The unfused paths (fp64 on CUDA, non-contiguous tensors, other devices) read the
step counters, a tensor lr and ``found_inf`` on the host, and the chunked one loops over a big tensor's
chunks: they are fallbacks, not the multi-tensor fast path.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import Tensor

from .weight_decay import decay_factor

__all__ = ["CHUNK_NUMEL", "adamw_multi", "adamw_reference", "fused_available"]

_FUSED_DTYPES = (torch.float32, torch.float16, torch.bfloat16)

# Elements per chunk: 64K fp32 values per stream, five streams (param, grad, two moments, denom) keep
# about 1.3 MB in L2, yet each op still splits over two threads (torch's grain size is 32K elements).
CHUNK_NUMEL = 1 << 16


def _bias_corrections(step: float, beta1: float, beta2: float, lr: float) -> tuple[float, float]:
    """(step size lr / (1 - beta1^t), sqrt(1 - beta2^t)), computed exactly as torch computes them."""
    bias_correction1 = 1 - beta1**step
    bias_correction2 = 1 - beta2**step
    return lr / bias_correction1, bias_correction2**0.5


def adamw_reference(param: Tensor, grad: Tensor, exp_avg: Tensor, exp_avg_sq: Tensor, step: float, *,
                    lr: float, beta1: float, beta2: float, eps: float, weight_decay: float) -> None:
    """One AdamW step on one tensor, in place. ``step`` is the step number t >= 1 (already advanced)."""
    if weight_decay != 0:
        param.mul_(decay_factor(lr, weight_decay))  # decoupled weight decay
    exp_avg.lerp_(grad, 1 - beta1)  # m <- beta1 m + (1 - beta1) g
    exp_avg_sq.mul_(beta2).addcmul_(grad, grad, value=1 - beta2)  # v <- beta2 v + (1 - beta2) g^2
    step_size, bias_correction2_sqrt = _bias_corrections(step, beta1, beta2, lr)
    denom = (exp_avg_sq.sqrt() / bias_correction2_sqrt).add_(eps)  # sqrt(v_hat) + eps
    param.addcdiv_(exp_avg, denom, value=-step_size)  # p <- p - lr m_hat / (sqrt(v_hat) + eps)


def _adamw_chunked(param: Tensor, grad: Tensor, exp_avg: Tensor, exp_avg_sq: Tensor, step: float, *,
                   lr: float, beta1: float, beta2: float, eps: float, weight_decay: float,
                   chunk_numel: int) -> None:
    """``adamw_reference`` on one big contiguous tensor, chunk by chunk, with one reused scratch."""
    step_size, bias_correction2_sqrt = _bias_corrections(step, beta1, beta2, lr)
    decay = decay_factor(lr, weight_decay)
    flats = [t.view(-1) for t in (param, grad, exp_avg, exp_avg_sq)]
    denom = torch.empty(min(chunk_numel, param.numel()), dtype=exp_avg_sq.dtype, device=param.device)
    for p, g, m, v in zip(*(t.split(chunk_numel) for t in flats)):
        d = denom[: p.numel()]
        if weight_decay != 0:
            p.mul_(decay)
        m.lerp_(g, 1 - beta1)
        v.mul_(beta2).addcmul_(g, g, value=1 - beta2)
        torch.sqrt(v, out=d).div_(bias_correction2_sqrt).add_(eps)
        p.addcdiv_(m, d, value=-step_size)


def _adamw_foreach(params: list[Tensor], grads: list[Tensor], exp_avgs: list[Tensor],
                   exp_avg_sqs: list[Tensor], steps: list[float], *, lr: float, beta1: float,
                   beta2: float, eps: float, weight_decay: float) -> None:
    """``adamw_reference`` on a list of tensors with torch's multi-tensor ops (same ops, same order)."""
    if weight_decay != 0:
        torch._foreach_mul_(params, decay_factor(lr, weight_decay))
    torch._foreach_lerp_(exp_avgs, grads, 1 - beta1)
    torch._foreach_mul_(exp_avg_sqs, beta2)
    torch._foreach_addcmul_(exp_avg_sqs, grads, grads, 1 - beta2)
    corrections = [_bias_corrections(s, beta1, beta2, lr) for s in steps]
    denoms = torch._foreach_sqrt(exp_avg_sqs)
    torch._foreach_div_(denoms, [c[1] for c in corrections])
    torch._foreach_add_(denoms, eps)
    torch._foreach_addcdiv_(params, exp_avgs, denoms, [-c[0] for c in corrections])


def fused_available(tensors: Sequence[Tensor]) -> bool:
    """Whether torch's fused AdamW kernel takes these (param, grad, exp_avg, exp_avg_sq) tensors."""
    p = tensors[0]
    return (hasattr(torch, "_fused_adamw_") and p.device.type in ("cpu", "cuda") and p.dtype in _FUSED_DTYPES
            and all(t.dtype == p.dtype and t.device == p.device and t.is_contiguous() for t in tensors))


def _adamw_fused(params: list[Tensor], grads: list[Tensor], exp_avgs: list[Tensor], exp_avg_sqs: list[Tensor],
                 steps: list[float | Tensor], *, lr: float | Tensor, beta1: float, beta2: float, eps: float,
                 weight_decay: float, found_inf: Tensor | None = None) -> None:
    # The kernel reads each tensor's step t (already advanced) from a float32 tensor on its device, and
    # takes a tensor lr as it is: a scheduled tensor lr or step is never read back as a Python float.
    device = params[0].device
    if all(isinstance(s, Tensor) and s.device == device for s in steps):
        step_tensors = list(steps)
    elif all(isinstance(s, Tensor) for s in steps):
        step_tensors = list(torch.stack(steps).to(device=device, dtype=torch.float32).unbind(0))
    else:
        step_tensors = list(torch.tensor([float(s) for s in steps], dtype=torch.float32, device=device).unbind(0))
    torch._fused_adamw_(params, grads, exp_avgs, exp_avg_sqs, [], step_tensors, amsgrad=False, lr=lr,
                        beta1=beta1, beta2=beta2, weight_decay=weight_decay, eps=eps, maximize=False,
                        grad_scale=None, found_inf=found_inf)


def adamw_multi(params: Sequence[Tensor], grads: Sequence[Tensor], exp_avgs: Sequence[Tensor],
                exp_avg_sqs: Sequence[Tensor], steps: Sequence[float | Tensor], *, lr: float | Tensor,
                beta1: float,
                beta2: float, eps: float, weight_decay: float, chunk_numel: int = CHUNK_NUMEL,
                fused: bool | None = None, found_inf: Tensor | None = None) -> None:
    """AdamW on many tensors at once, in place; equal to ``adamw_reference`` on each tensor (to ~1 ulp
    on the fused path, bitwise on the others).

    ``fused=None`` uses torch's fused kernel wherever it applies, ``False`` never. Without it, tensors
    larger than ``4 * chunk_numel`` (and contiguous) are updated chunk by chunk; the rest, grouped by
    device and dtype, with multi-tensor ops. ``steps`` (t, already advanced) and ``lr`` may be 0-d
    tensors; only the unfused paths read them as Python floats. ``found_inf``: a 0-d float tensor on
    the tensors' device; where it is nonzero nothing is updated (the caller keeps the step counters).
    """
    if found_inf is not None and (fused is False or not all(
            fused_available((p, grads[i], exp_avgs[i], exp_avg_sqs[i])) for i, p in enumerate(params))):
        if bool(found_inf):  # the unfused paths decide on the host
            return
        found_inf = None
    fusable: dict[tuple[torch.device, torch.dtype], list[int]] = {}
    small: dict[tuple[torch.device, torch.dtype], list[int]] = {}
    for i, p in enumerate(params):
        tensors = (p, grads[i], exp_avgs[i], exp_avg_sqs[i])
        if fused is not False and fused_available(tensors):
            fusable.setdefault((p.device, p.dtype), []).append(i)
        elif p.numel() > 4 * chunk_numel and all(t.is_contiguous() for t in tensors):
            _adamw_chunked(p, grads[i], exp_avgs[i], exp_avg_sqs[i], float(steps[i]), lr=float(lr), beta1=beta1,
                           beta2=beta2, eps=eps, weight_decay=weight_decay, chunk_numel=chunk_numel)
        else:
            small.setdefault((p.device, p.dtype), []).append(i)
    for index in fusable.values():
        _adamw_fused([params[i] for i in index], [grads[i] for i in index], [exp_avgs[i] for i in index],
                     [exp_avg_sqs[i] for i in index], [steps[i] for i in index], lr=lr, beta1=beta1,
                     beta2=beta2, eps=eps, weight_decay=weight_decay, found_inf=found_inf)
    for index in small.values():
        _adamw_foreach([params[i] for i in index], [grads[i] for i in index], [exp_avgs[i] for i in index],
                       [exp_avg_sqs[i] for i in index], [float(steps[i]) for i in index], lr=float(lr),
                       beta1=beta1, beta2=beta2, eps=eps, weight_decay=weight_decay)
