"""Adam-mini (Zhang et al., "Adam-mini: Use Fewer Learning Rates To Gain More", ICLR 2025).

AdamW with a block-wise second moment. The parameters are cut into blocks that follow the Transformer's
near-block-diagonal Hessian (paper v1.1, Algorithm 3); each block keeps one scalar ``v_b``, an EMA of
``mean(g²)`` over the block, and every element of the block is updated with ``m̂ / (sqrt(v̂_b) + eps)``.
The first moment stays full size; decoupled weight decay, bias correction and eps placement are AdamW's.

The partition is a parameter plan (``slimopt.plans.param_plan``, rule set ``ADAM_MINI``), decided from names,
shapes and ``model.config`` -- not from name substrings alone:

    embedding, output head        one block per token row
    query, key                    one block per attention head (key: num_kv_heads blocks under GQA/MQA)
    fused qkv                     q and k by heads, v by output neurons (GPT-2 c_attn: columns)
    value, attn output, MLP       one block per output neuron (rows; columns for GPT-2's Conv1D)
    bias                          elementwise (plain AdamW)
    norm and anything else        one block per tensor

Every tensor's partition is stored in its param group (``param_layouts``), so the optimizer keeps working
when FSDP2 or Accelerate swap the parameter objects. ``print(opt.partition_table())`` shows the plan.

State per tensor: ``exp_avg`` (m, full size, in the parameter's dtype unless ``exp_avg_dtype`` says
otherwise, as torch's AdamW and the official Adam-mini keep it: fp32 parameters 4 B/param, bf16 parameters
2 B/param), ``exp_avg_sq`` (one float32 value per block; full size for elementwise blocks) and ``step``.

Three paths compute the same step, as in ``torch.optim``: the multi-tensor path (``foreach=True``, the
default) steps all tensors of a param group together in a fixed number of launches, with the step counters
on the tensors' device and no host sync in the update: on CUDA (``backend="auto"``) three Triton launches
for the tensors whose blocks are runs of contiguous rows (``slimopt.ops.block_moments_triton``: g read
twice, p and m once, 24 B/param in fp32, the non-finite decision on the device), ``torch._foreach_*`` ops
for the rest and on the CPU (``slimopt.ops.blockstats.block_adam_foreach``); the per-tensor path
(``foreach=False``, ``_single_tensor_adam_mini``) is the reference the tests hold them to, and the path
FSDP2 shards always take (their block sums need an all-reduce per tensor).
"""

from __future__ import annotations

import warnings
from collections.abc import Mapping
from dataclasses import replace
from typing import Any

import torch
from torch import Tensor

from ..core.base import (
    STEP_BYTES,
    GradFlags,
    SlimOptimizer,
    as_param_groups,
    check_backend,
    check_betas,
    check_lr,
    check_nonnegative,
    check_positive,
    placeholder_names,
)
from ..core.distributed import is_sharded, local, local_offset, sq_sum, sq_sums_along
from ..ops.block_moments_triton import DTYPES as TRITON_DTYPES
from ..ops.block_moments_triton import BlockMomentsStep, contiguous_blocks, triton_available
from ..ops.blockstats import (
    block_adam_foreach,
    block_adam_step,
    block_mean_sq,
    block_sq_sums,
    block_state_shape,
)
from ..plans.param_plan import ROLES, BlockFacts, ParamInfo, ParamPlan, RuleSet

__all__ = ["ADAM_MINI", "AdamMini", "adam_mini_blocks", "comm_bytes", "state_bytes_formula"]

_DTYPES = {None: None, "bf16": torch.bfloat16, "bfloat16": torch.bfloat16, torch.bfloat16: torch.bfloat16,
           "fp32": torch.float32, "float32": torch.float32, torch.float32: torch.float32}


# --------------------------------------------------------------------------------------------------
# the partition: Adam-mini's rule set over the plan's roles


def adam_mini_blocks(info: ParamInfo, rule: str) -> BlockFacts:
    """Blocks of one tensor under Adam-mini's rules; each block will keep one second-moment value.

    ``elementwise`` one block per element (plain Adam, biases); ``whole`` one block per tensor;
    ``rows`` one block per output neuron / token (``unit=1``); ``heads`` one block per attention head,
    i.e. ``head_dim`` consecutive output neurons (``unit=head_dim``); ``qkv`` a fused projection whose
    output neurons are cut into ``segments`` ``[start, length, unit]``: q and k by heads, v by neurons.
    """
    shape, numel = info.shape, info.numel
    if rule == "elementwise":
        return BlockFacts(numel, 1)
    if rule == "whole":
        return BlockFacts(1, numel)
    if rule not in ("rows", "heads", "qkv"):
        raise ValueError(f"unknown Adam-mini rule {rule!r}")
    if len(shape) < 2:
        raise ValueError(f"rule {rule!r} cuts the output dimension of a matrix; a {len(shape)}-D tensor "
                         "has none")
    rows = shape[info.out_dim]
    per_row = numel // rows if rows else 0
    if rule == "rows":
        return BlockFacts(rows, per_row, {"unit": 1})
    att = info.attention
    if att.head_dim is None and att.num_heads and len(shape) == 2:
        # no hidden size given: the input features of an attention projection are the hidden size
        fan_in = shape[1 - info.out_dim]
        if fan_in % att.num_heads == 0:
            att = replace(att, head_dim=fan_in // att.num_heads)
    if rule == "heads":
        if att.head_dim is None:
            return BlockFacts(rows, per_row, {"unit": 1}, rule="rows",
                          note="head_dim unknown (pass num_heads/head_dim or config): one block per row")
        hd = att.head_dim
        if rows % hd:
            raise ValueError(f"{rows} output neurons is not a multiple of head_dim={hd}")
        expected = {"query": att.num_heads, "key": att.num_kv_heads}.get(info.role)
        if expected is not None and rows // hd != expected:
            raise ValueError(f"{rows // hd} heads of head_dim={hd}, but the config says {expected} "
                             f"{'kv ' if info.role == 'key' else ''}heads")
        return BlockFacts(rows // hd, hd * per_row, {"unit": hd})
    # fused qkv
    if not att.known:
        return BlockFacts(rows, per_row, {"unit": 1}, rule="rows",
                      note="attention geometry unknown (pass num_heads/head_dim): one block per row")
    h, kv, hd = att.num_heads, att.num_kv_heads or att.num_heads, att.head_dim
    if rows != (h + 2 * kv) * hd:
        raise ValueError(f"{rows} output neurons, but fused q,k,v of {h}+{kv}+{kv} heads x {hd} need "
                         f"{(h + 2 * kv) * hd}")
    if info.qkv_order == "grouped":  # per kv group: [q_1 .. q_g, k] by heads, then v by neurons
        g = h // kv
        segments = []
        for i in range(kv):
            start = i * (g + 2) * hd
            segments += [[start, (g + 1) * hd, hd], [start + (g + 1) * hd, hd, 1]]
    else:  # [q | k | v]
        segments = [[0, (h + kv) * hd, hd], [(h + kv) * hd, kv * hd, 1]]
    n_blocks = (h + kv) + kv * hd
    # (the order is kept under "layout": param groups of saved state dicts hold that key, and must compare equal)
    return BlockFacts(n_blocks, hd * per_row, {"segments": segments, "layout": info.qkv_order})


ADAM_MINI = RuleSet(
    "adam-mini",
    {
        "embedding": "rows",  # by tokens
        "head": "rows",  # by tokens (output classes)
        "query": "heads",
        "key": "heads",  # GQA/MQA: num_kv_heads blocks
        "qkv": "qkv",
        "value": "rows",  # by output neurons
        "attn_out": "rows",
        "mlp": "rows",
        "adapter": "rows",  # LoRA A (r x in) and B (out x r): by output neurons, never heads
        "bias": "elementwise",  # plain Adam
        "norm": "whole",
        "other": "whole",
    },
    facts=adam_mini_blocks,
    default="whole",
    extra_rules=("elementwise", "whole", "rows", "heads", "qkv"),
)
"""Adam-mini's partition (paper v1.1, Algorithm 3) as a rule set over roles (``slimopt.plans``)."""


def state_bytes_formula(t: ParamInfo, *, param_bytes: int = 4, exp_avg_dtype: Any = None) -> int:
    """State bytes of one tensor (registry formula): m in ``exp_avg_dtype``, by default the parameter's dtype
    (``param_bytes``: 4 B/param for fp32 parameters, 2 for bf16 ones, as torch's AdamW keeps its moments), one
    fp32 v per block of the partition, the step."""
    m_bytes = param_bytes if _DTYPES.get(exp_avg_dtype) is None else _DTYPES[exp_avg_dtype].itemsize
    blocks = ADAM_MINI.facts(t, ADAM_MINI.rule_for(t.role)).n_blocks
    return t.numel * m_bytes + blocks * 4 + STEP_BYTES


def comm_bytes(group: dict[str, Any], index: int, shape: tuple[int, ...], hops: int, local_numel: int,
               p: Tensor) -> dict[str, int]:
    """Collectives of one sharded tensor per step: its blocks' sums of squares, one all-reduce per mesh
    dimension that shards it (float32, float64 for float64 parameters)."""
    acc = 8 if p.dtype == torch.float64 else 4
    partition = group["param_layouts"][index]
    if partition["rule"] == "whole":
        return {"sq_sum": acc * hops}
    if partition["rule"] != "elementwise":
        return {"sq_sums": acc * shape[partition["out_dim"]] * hops}
    return {}


class AdamMini(SlimOptimizer):
    """Adam-mini with a validated, printable partition.

    Args:
        params: ``model.named_parameters()``, ``(name, tensor)`` pairs, or param groups whose
            ``"params"`` are such pairs or that carry ``"param_names"``. Names decide the partition;
            unnamed tensors get one block each (with a warning). Prefer :meth:`from_model`, which also
            reads ``model.config`` and module types (GPT-2 ``Conv1D``).
        lr, betas, eps, weight_decay: as ``torch.optim.AdamW`` (the paper uses AdamW's values).
        num_heads, num_kv_heads, head_dim, hidden_size: attention geometry for the per-head blocks
            (``head_dim`` may differ from ``hidden_size // num_heads``: Gemma, Qwen3). Win over ``config``.
        config: a HF-style config (object or dict) to read the geometry from.
        overrides: ``{name or fnmatch pattern: role or rule}``; rules are ``elementwise``, ``whole``,
            ``rows``, ``heads``, ``qkv``. E.g. ``{"*.v_proj.weight": "whole"}`` is the repo's advice
            for short runs (one learning rate per Value tensor).
        no_decay_roles: roles whose tensors get no weight decay (default norms and biases; embeddings
            are decayed, as upstream).
        exp_avg_dtype: dtype of ``m``; ``None`` (default) keeps the parameter's dtype, as torch's AdamW and the
            official Adam-mini do: m costs 4 B/param for fp32 parameters and 2 B/param for bf16 ones (the
            state table's "2.0 (bf16 m)"), and is rounded to bf16 after every update there.
            ``torch.bfloat16`` halves it for fp32 parameters. ``v`` is always float32 (``mean(g²)`` underflows
            in bf16).
        nonfinite: ``"skip"`` (default) or ``"raise"`` (a host sync per step) for NaN/inf gradients (see
            ``SlimOptimizer``).
        foreach: ``True`` or ``None`` (default): step the tensors of a group together, a fixed number of
            launches per step (``torch._foreach_*`` ops; step counters live on the tensors' device).
            ``False``: the per-tensor reference path (step counters on the CPU, as torch's for-loop AdamW).
            FSDP2 shards take the per-tensor path either way. The two agree to rounding (the update is
            formed as ``m * (-lr / bc1 / d)`` instead of ``(-lr / bc1 * m) / d``); ``v`` and ``m`` agree bit
            for bit on CPU.
        backend: the multi-tensor path's kernels. ``"auto"`` (default): Triton for CUDA tensors (when Triton is
            installed), torch ops otherwise; ``"torch"``: always torch ops; ``"triton"``: Triton on any device
            (CPU tensors run under ``TRITON_INTERPRET=1``: for tests). The Triton path takes the tensors whose
            blocks are runs of contiguous rows (rows, heads and fused qkv along dim 0, whole tensors) in fp32,
            bf16 or fp16 with contiguous p, g and m; the others (GPT-2 Conv1D columns, elementwise blocks)
            take the torch ops in the same step. It agrees with the torch path as that agrees with the
            per-tensor one (m bit for bit; v to the order of its sums of g², p to rounding), and decides
            ``nonfinite="skip"`` on the device: a tensor with a NaN/inf gradient keeps p, m, v and its step.
    """

    def __init__(self, params: Any, lr: float | Tensor = 1e-3, betas: tuple[float, float] = (0.9, 0.999),
                 eps: float = 1e-8, weight_decay: float = 0.0, *, num_heads: int | None = None,
                 num_kv_heads: int | None = None, head_dim: int | None = None, hidden_size: int | None = None,
                 config: Any = None, overrides: Mapping[str, str] | None = None,
                 no_decay_roles: tuple[str, ...] = ("norm", "bias"), exp_avg_dtype: Any = None,
                 nonfinite: str = "skip", foreach: bool | None = None, backend: str = "auto",
                 _plan: ParamPlan | None = None) -> None:
        check_lr(lr)
        if foreach not in (None, True, False):
            raise ValueError(f"Invalid foreach: {foreach!r} (must be None, True or False)")
        check_backend(backend)
        if backend == "triton" and foreach is False:
            raise ValueError("Invalid backend: 'triton' steps the multi-tensor path; foreach=False asks for the "
                             "per-tensor one")
        check_betas(betas)
        check_positive("eps", eps)
        check_nonnegative("weight_decay", weight_decay)
        if exp_avg_dtype not in _DTYPES:
            raise ValueError(f"Invalid exp_avg_dtype: {exp_avg_dtype!r} (must be None, torch.float32 or "
                             "torch.bfloat16)")
        unknown_roles = set(no_decay_roles) - set(ROLES)
        if unknown_roles:
            raise ValueError(f"Invalid no_decay_roles: {sorted(unknown_roles)} (roles are {', '.join(ROLES)})")
        self._geometry = {"num_heads": num_heads, "num_kv_heads": num_kv_heads, "head_dim": head_dim,
                          "hidden_size": hidden_size}
        self._config = config
        self.foreach = foreach is not False
        # attributes, not group settings (as foreach): they choose kernels, not the maths, and state dicts saved
        # before they existed still load
        self.backend = backend
        if _plan is None:
            groups = _named(as_param_groups(params))
            _plan = ParamPlan.build(groups, ADAM_MINI, config=config, overrides=overrides, **self._geometry)
        self.plan = _plan
        defaults = {"lr": lr, "betas": tuple(betas), "eps": eps, "weight_decay": weight_decay,
                    "no_decay_roles": tuple(no_decay_roles), "exp_avg_dtype": _DTYPES[exp_avg_dtype],
                    "nonfinite": nonfinite}
        super().__init__(_plan.param_groups(), defaults)

    @classmethod
    def from_model(cls, model: torch.nn.Module, lr: float | Tensor = 1e-3, weight_decay: float = 0.0, *,
                   print_plan: bool = False, **kwargs: Any) -> AdamMini:
        """Adam-mini for ``model``'s trainable parameters, partitioned with ``model.config`` and module types.

        Geometry keywords (``num_heads``, ``num_kv_heads``, ``head_dim``, ``hidden_size``) and
        ``overrides`` win over the config. ``print_plan`` prints the partition table (with each tensor's lr).
        """
        kwargs.setdefault("config", getattr(model, "config", None))
        plan_keys = ("num_heads", "num_kv_heads", "head_dim", "hidden_size", "config", "overrides")
        plan = ParamPlan.build(model, ADAM_MINI, warn=not print_plan,  # reported once: printed, else a warning
                               **{k: kwargs[k] for k in plan_keys if k in kwargs})
        opt = cls(None, lr=lr, weight_decay=weight_decay, _plan=plan, **kwargs)
        if print_plan:
            print(opt.partition_table())
        return opt

    # -- groups added later (torch calls this for the constructor's groups too) ---------------------
    def add_param_group(self, param_group: dict[str, Any]) -> None:
        if "param_layouts" not in param_group:  # a group added after construction: plan it now
            group = _named(as_param_groups([param_group]), offset=len(self.param_groups))[0]
            if group["params"]:
                plan = ParamPlan.build([group], ADAM_MINI, config=self._config, **self._geometry)
                self.plan = ParamPlan(self.plan.rows + plan.rows, ADAM_MINI, self.plan.attention)
                group = plan.param_groups()[0]
            else:
                group = {**group, "param_roles": [], "param_rules": [], "param_layouts": []}
            param_group = group
        super().add_param_group(param_group)

    def partition_table(self) -> str:
        """The partition as a table: one line per tensor (name, shape, role, rule, blocks, block size, and
        the lr and weight decay its param group gives it)."""
        return self.plan.table(self.param_groups)

    # -- the step (paper Algorithm 1) -------------------------------------------------------------------
    def update_group(self, group: dict[str, Any]) -> None:
        """m <- beta1 m + (1 - beta1) g;  v_b <- beta2 v_b + (1 - beta2) mean_b(g²);
        p <- p (1 - lr lambda) - lr m_hat / (sqrt(v_hat_b) + eps), for every block b of every tensor.

        The tensors of the group on one device are stepped together: on CUDA those the Triton kernels take in
        three launches (``BlockMomentsStep``), the others with ``torch._foreach_*`` ops (``block_adam_foreach``);
        FSDP2 shards, and every tensor when ``foreach=False``, one at a time (``block_adam_step``).
        """
        beta1, beta2 = group["betas"]
        hyper = {"lr": group["lr"], "beta1": beta1, "beta2": beta2, "eps": group["eps"]}
        together: dict[Any, list[tuple[int, Tensor, Tensor]]] = {}
        for index, p, grad in self.grads(group):
            state = self.state[p]
            if not state:
                self._init_state(group, index, p)
            if self._together(p):
                key = self._triton_key(group, index, p, grad) or _subgroup(grad)
                together.setdefault(key, []).append((index, p, grad))
            else:
                self._single_tensor_adam_mini(group, index, p, grad, **hyper)
        for key, items in together.items():
            if key[0] == "triton":
                self._triton_adam_mini(group, key, items, **hyper)
            else:
                self._multi_tensor_adam_mini(group, key, items, **hyper)

    def _together(self, p: Tensor) -> bool:
        """Whether ``p`` takes the multi-tensor path (FSDP2 shards and shape-only probes do not)."""
        return getattr(self, "foreach", True) and not is_sharded(p) and local(p).device.type != "meta"

    def _init_state(self, group: dict[str, Any], index: int, p: Tensor) -> None:
        partition = group["param_layouts"][index]
        state = self.state[p]
        device = local(p).device
        # torch's convention: the counter on the CPU for a per-tensor step, on the device for a multi-tensor one
        state["step"] = torch.zeros((), dtype=torch.float32, device=device if self._together(p) else None)
        m_dtype = group["exp_avg_dtype"] or p.dtype
        state["exp_avg"] = torch.zeros_like(p, dtype=m_dtype, memory_format=torch.preserve_format)
        # one float32 value per block (a full float32 tensor, sharded like p, for elementwise blocks)
        state["exp_avg_sq"] = torch.zeros_like(p, dtype=torch.float32) if partition["rule"] == "elementwise" \
            else torch.zeros(block_state_shape(partition, tuple(p.shape)), dtype=torch.float32, device=device)

    def _weight_decay(self, group: dict[str, Any], index: int) -> float:
        return group["weight_decay"] if group["param_roles"][index] not in group["no_decay_roles"] else 0.0

    def _multi_tensor_adam_mini(self, group: dict[str, Any], key: Any, items: list[tuple[int, Tensor, Tensor]],
                                *, lr: float | Tensor, beta1: float, beta2: float, eps: float) -> None:
        """All tensors of ``group`` on one device (and gradient dtype) in one go; see ``block_adam_foreach``."""
        indices = tuple(index for index, _, _ in items)
        steps = []
        for _, p, _ in items:
            state = self.state[p]
            if state["step"].device != local(p).device:  # a loaded state dict, or one from the reference path
                state["step"] = state["step"].to(local(p).device)
            steps.append(state["step"])
        prepared = self.__dict__.get("_sq_sums", {}).pop((id(group), key), None)
        block_adam_foreach([local(p) for _, p, _ in items], [local(g) for _, _, g in items],
                          [local(self.state[p]["exp_avg"]) for _, p, _ in items],
                          [local(self.state[p]["exp_avg_sq"]) for _, p, _ in items], steps,
                          [group["param_layouts"][i] for i in indices], lr=lr, beta1=beta1, beta2=beta2, eps=eps,
                          weight_decays=[self._weight_decay(group, i) for i in indices],
                          sq_sums=prepared[1] if prepared is not None and prepared[0] == indices else None)

    def _single_tensor_adam_mini(self, group: dict[str, Any], index: int, p: Tensor, grad: Tensor, *,
                                 lr: float | Tensor, beta1: float, beta2: float, eps: float) -> None:
        """One tensor (the reference path; FSDP2 shards): ``block_adam_step`` with host-side step and lr."""
        partition = group["param_layouts"][index]
        state = self.state[p]
        lr = float(lr) if isinstance(lr, Tensor) else lr  # torch's addcdiv takes a Python number
        step = float(self.advance_step(state))
        mean_sq = offset = full_shape = None
        if is_sharded(p) and partition["rule"] != "elementwise":
            # FSDP2: every rank keeps all blocks' v; block sums of g² are completed across ranks by one
            # all-reduce (of a scalar, or of one value per output neuron), so every rank's v agrees.
            sums = sq_sum(grad) if partition["rule"] == "whole" else sq_sums_along(grad, dim=partition["out_dim"])
            mean_sq = block_mean_sq(local(grad), partition, sums=sums, shape=tuple(p.shape))
            offset, full_shape = local_offset(p), tuple(p.shape)
        block_adam_step(local(p), local(grad), local(state["exp_avg"]), local(state["exp_avg_sq"]), step, partition,
                       lr=lr, beta1=beta1, beta2=beta2, eps=eps, weight_decay=self._weight_decay(group, index),
                       mean_sq=mean_sq, offset=offset, full_shape=full_shape)

    # -- the Triton path (CUDA) ---------------------------------------------------------------------------
    def _triton_key(self, group: dict[str, Any], index: int, p: Tensor, grad: Tensor) -> tuple[Any, ...] | None:
        """The launch set of ``p`` on the Triton path, ``("triton", device, p, g and m dtypes)``, or None when it
        takes the torch ops: by backend and device, dtypes, contiguity, and its partition (blocks of contiguous
        rows: ``contiguous_blocks``)."""
        backend = getattr(self, "backend", "auto")
        if backend == "torch" or (backend == "auto" and not p.is_cuda):  # (the CPU's answer, first and cheap)
            return None
        if not self._together(p) or not getattr(self, "foreach", True) or not triton_available():
            return None
        state = self.state.get(p)
        m = state.get("exp_avg") if state else None
        m_dtype = m.dtype if m is not None else group["exp_avg_dtype"] or p.dtype
        if p.dtype not in TRITON_DTYPES or grad.dtype not in TRITON_DTYPES or m_dtype not in TRITON_DTYPES:
            return None
        if not p.is_contiguous() or not grad.is_contiguous() or (m is not None and not m.is_contiguous()):
            return None
        partition = group["param_layouts"][index]
        fits = self.__dict__.setdefault("_fits", {})  # (partition, shape) -> whether the kernels take it
        shape = tuple(p.shape)
        known = fits.get((id(partition), shape))
        if known is None or known[0] is not partition:
            known = fits[(id(partition), shape)] = (partition, contiguous_blocks(shape, partition) is not None)
        return ("triton", grad.device, p.dtype, grad.dtype, m_dtype) if known[1] else None

    def _block_step(self, group: dict[str, Any], key: tuple[Any, ...], indices: list[int]) -> BlockMomentsStep:
        """The kernels' tables for these tensors of ``group``: built once, again when the tensors change."""
        cache = self.__dict__.setdefault("_block_steps", {})  # not in the state dict, not pickled
        shapes = tuple(tuple(group["params"][i].shape) for i in indices)
        signature = (tuple(indices), shapes, tuple(id(group["param_layouts"][i]) for i in indices))
        entry = cache.get((id(group), key))
        if entry is None or entry[0] is not group or entry[1] != signature:
            live = {id(g) for g in self.param_groups}
            for stale in [k for k, e in cache.items() if k[0] not in live]:  # groups replaced by load_state_dict
                del cache[stale]
            step = BlockMomentsStep(shapes, [group["param_layouts"][i] for i in indices], key[1], param_dtype=key[2],
                                    grad_dtype=key[3], moment_dtype=key[4])
            entry = cache[(id(group), key)] = (group, signature, step)
        return entry[2]

    def _triton_adam_mini(self, group: dict[str, Any], key: tuple[Any, ...], items: list[tuple[int, Tensor, Tensor]],
                          *, lr: float | Tensor, beta1: float, beta2: float, eps: float) -> None:
        """The tensors of ``key``'s launch set: three Triton launches (two when the non-finite check's launch ran
        for the same gradients), no host sync; a tensor whose gradient holds NaN/inf is left alone on the device
        (see ``BlockMomentsStep``)."""
        indices = [index for index, _, _ in items]
        states = [self.state[p] for _, p, _ in items]
        for (_, p, _), state in zip(items, states):
            if state["step"].device != p.device:  # a loaded state dict, or one from the reference path
                state["step"] = state["step"].to(p.device)
        step = self._block_step(group, key, indices)
        prepared = self.__dict__.get("_sq_sums", {}).pop((id(group), key), None)
        grads = [grad for _, _, grad in items]
        if prepared is None or prepared[0] != tuple(indices):
            step.check(grads)  # not checked by the policy (a direct update_group): its flags still gate the update
        step.step([p for _, p, _ in items], grads, [s["exp_avg"] for s in states], [s["exp_avg_sq"] for s in states],
                  [s["step"] for s in states], lr=lr, beta1=float(beta1), beta2=float(beta2), eps=float(eps),
                  weight_decays=[self._weight_decay(group, i) for i in indices])

    # -- the non-finite check, from the block sums the step needs anyway --------------------------------
    def nonfinite_flags(self, group: dict[str, Any]) -> list[GradFlags]:
        """The non-finite check (``SlimOptimizer``), from a pass over the gradients that the step needs anyway.
        Triton path: the row sums of g² (``BlockMomentsStep.check``), whose flags the update reads on the
        device (gated: no host sync). Torch multi-tensor path: the block sums of g² (``block_sq_sums``), computed
        here once for the step to use; a tensor's total is non-finite exactly when its gradient holds NaN or inf
        (or squares beyond float32's range), and the base reads it back. FSDP2 shards and the per-tensor path:
        the default check."""
        sq_sums = self.__dict__.setdefault("_sq_sums", {})  # taken by the update (stale ones: replaced)
        indices = self.checked_indices(group)
        if not getattr(self, "foreach", True):
            return self.default_flags(group, indices)
        alone, subgroups = [], {}
        for index in indices:
            p = group["params"][index]
            if p.is_complex() or not self._together(p):
                alone.append(index)
            else:
                key = self._triton_key(group, index, p, p.grad) or _subgroup(p.grad)
                subgroups.setdefault(key, []).append(index)
        out = self.default_flags(group, alone) if alone else []
        for key, idx in subgroups.items():
            grads = [local(group["params"][i].grad) for i in idx]
            if key[0] == "triton":
                bad = self._block_step(group, key, idx).check(grads)
                sq_sums[(id(group), key)] = (tuple(idx), None)
                out.append(GradFlags(idx, bad, True))  # the update leaves flagged tensors alone on the device
                continue
            partitions = [group["param_layouts"][i] for i in idx]
            sq = block_sq_sums(grads, partitions)
            sq_sums[(id(group), key)] = (tuple(idx), sq)
            # one value for the subgroup (not gated), non-finite iff some gradient is: the base looks closer then
            out.append(GradFlags(idx, sq.sum(), False))
        return out


def _subgroup(grad: Tensor) -> tuple[torch.device, torch.dtype]:
    """Tensors stepped together: same device and gradient dtype (torch's foreach grouping)."""
    g = local(grad)
    return g.device, g.dtype


def _named(groups: list[dict[str, Any]], offset: int = 0) -> list[dict[str, Any]]:
    """Give unnamed tensors placeholder names (they plan as role ``other``: one block each).

    torch wants all groups with names or all without, and names make error messages useful, so the
    placeholders stay in ``param_names``.
    """
    out = []
    for gi, g in enumerate(groups):
        if "param_names" in g:
            out.append(g)
            continue
        if not g["params"]:
            out.append({**g, "param_names": []})
            continue
        names = placeholder_names(gi + offset, len(g["params"]))
        out.append({**g, "param_names": names})
    return out




def __getattr__(name: str) -> Any:
    """The name of slimopt 0.1, with a ``FutureWarning``."""
    if name == "adam_mini_layout":
        warnings.warn("slimopt.optim.adam_mini.adam_mini_layout is now adam_mini_blocks", FutureWarning, stacklevel=2)
        return adam_mini_blocks
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
