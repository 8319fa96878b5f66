"""Optimizers by name, and everything the rest of the library asks about one: ``create_optimizer(model,
"adammini", lr=1e-3)``.

One :class:`OptimizerSpec` per method is the only place that names it. Its class, its analytic
state-bytes formula and its communication hook are ``"module:attribute"`` strings imported on first use,
so ``import slimopt`` stays cheap and nothing below the optimizers imports them. The memory table
(``slimopt memory``), the GPU planner (``slimopt plan``), the communication count
(``slimopt.comm.comm_bytes_per_step``), the harness and the conformance suite (tests/test_conformance.py)
all read the spec, and so do the lists derived from it: the lazy classes of ``slimopt``, the default rows of
``slimopt memory``, the harness's default optimizers (:func:`default_names`) and which of them take a second
lr. Adding an optimizer = its module (class + formula), its kernels, one entry in :data:`SPECS` (or
:func:`register`), its tests.
"""

from __future__ import annotations

import importlib
import inspect
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import torch

__all__ = ["MemoryRow", "OptimizerSpec", "create_optimizer", "default_names", "get_supported_optimizers",
           "load_optimizer", "register", "spec", "spec_of"]

# the constructor argument of a second learning rate: the hybrids' AdamW part (embeddings, head, 1-D tensors)
SECOND_LR = "adamw_lr"


def import_target(target: str) -> Any:
    """The attribute named by ``"package.module:attribute"``."""
    module, _, attribute = target.partition(":")
    return getattr(importlib.import_module(module), attribute)


@dataclass(frozen=True)
class MemoryRow:
    """A row of ``slimopt memory``'s default table: the optimizer counted with ``options`` over its class's
    defaults (``param_bytes`` included), e.g. MicroAdam with the paper's block sizes."""

    label: str
    summary: str
    options: dict[str, Any] = field(default_factory=dict, hash=False)


@dataclass(frozen=True)
class OptimizerSpec:
    """What the library knows of one optimizer.

    ``state_formula``: ``f(info: ParamInfo, *, param_bytes, **options) -> int``, the exact state bytes the
    class allocates for one tensor (``param_bytes``: the parameter dtype's size; ``options``: the
    constructor arguments listed in ``formula_options``, whose defaults are read from the class).
    ``comm``: ``f(group, index, shape, hops, local_numel, p) -> {kind: bytes}``, the collectives one
    sharded tensor adds per step (None: nothing beyond the gradient reduction).
    ``state_note``: what it keeps, one line (``slimopt plan``'s note, and its ``slimopt memory`` row's).
    ``memory_rows``: its rows in ``slimopt memory``'s default table; empty: one row, ``name`` with the class's
    defaults, described by ``state_note``.
    """

    name: str
    target: str  # "module:Class"
    example_lr: float  # trains small models well; the harness's default before a sweep
    summary: str
    state_formula: str  # "module:function"
    formula_options: tuple[str, ...] = ()
    comm: str | None = None  # "module:function"
    aliases: tuple[str, ...] = ()
    state_note: str = ""
    memory_rows: tuple[MemoryRow, ...] = ()
    lr_guidance: str = ""  # how to pick its lr, from the committed sweeps (for a reader; not printed)

    @property
    def in_slimopt(self) -> bool:
        return self.target.startswith("slimopt.")

    def load(self) -> type[torch.optim.Optimizer]:
        return import_target(self.target)

    def formula(self) -> Callable[..., int]:
        return import_target(self.state_formula)

    def comm_hook(self) -> Callable[..., dict[str, int]] | None:
        return import_target(self.comm) if self.comm else None

    def rows(self) -> tuple[MemoryRow, ...]:
        """Its rows in ``slimopt memory``'s default table."""
        return self.memory_rows or (MemoryRow(self.name, self.state_note or self.summary),)

    def takes_second_lr(self) -> bool:
        """Whether its class takes a second learning rate (:data:`SECOND_LR`), which the harness sweeps too."""
        return SECOND_LR in inspect.signature(self.load().__init__).parameters

    def formula_defaults(self) -> dict[str, Any]:
        """The class's default value of each formula option, so a table counts what the class allocates."""
        params = inspect.signature(self.load().__init__).parameters
        return {k: params[k].default for k in self.formula_options
                if k in params and params[k].default is not inspect.Parameter.empty}


SPECS: dict[str, OptimizerSpec] = {}
_ALIASES: dict[str, str] = {}


def register(new: OptimizerSpec) -> OptimizerSpec:
    """Add ``new`` to the registry (its name and aliases must be free)."""
    taken = [n for n in (new.name, *new.aliases) if n in SPECS or n in _ALIASES]
    if taken:
        raise ValueError(f"register: name(s) already registered: {', '.join(taken)}")
    SPECS[new.name] = new
    _ALIASES.update({alias: new.name for alias in new.aliases})
    return new


def unregister(name: str) -> None:
    """Remove a registered optimizer (tests add toy ones)."""
    removed = SPECS.pop(name)
    for alias in removed.aliases:
        _ALIASES.pop(alias, None)


for _spec in [
    OptimizerSpec("adamw", "torch.optim:AdamW", 1.25e-3, "torch AdamW, the baseline",
                  "slimopt.optim.adamw:adamw_state_bytes",
                  state_note="torch AdamW; m and v in the parameter dtype", aliases=("adam-w",),
                  memory_rows=(MemoryRow("adamw-fp32", "m, v fp32: 8 B/param", {"param_bytes": 4}),
                               MemoryRow("adamw-bf16", "m, v bf16: 4 B/param", {"param_bytes": 2})),
                  lr_guidance="1.25e-3 won the CPU pre-training sweep (3.3M params, 1000 steps); 2.5e-3 at 0.79M "
                              "(benchmarks/results/cpu/pretrain_tiny_split)"),
    OptimizerSpec("microadam", "slimopt.optim.microadam:MicroAdam", 2.5e-3,
                  "MicroAdam: Top-K sparse gradients, 4-bit error feedback, windowed moments",
                  "slimopt.optim.microadam:state_bytes_formula",
                  formula_options=("m", "k_init", "quant_block_size", "topk_block_size"),
                  state_note="window of sparse gradients + 4-bit error feedback", aliases=("micro-adam",),
                  memory_rows=(
                      MemoryRow("microadam", "slimopt's defaults: window m=10 of k=1% (int16+bf16) + 4-bit EF + "
                                "bf16 min/max per 64"),
                      # the paper's block sizes: the official kernels' on an A100
                      MemoryRow("microadam-m10", "the paper's: window m=10 of k=1% + 4-bit EF + bf16 min/max per "
                                "100k", {"m": 10, "quant_block_size": 100_000, "topk_block_size": 20_864}),
                      MemoryRow("microadam-m20", "the paper's, m=20",
                                {"m": 20, "quant_block_size": 100_000, "topk_block_size": 20_864})),
                  lr_guidance="2x AdamW's for pre-training (CPU sweeps: 2.5e-3 vs 1.25e-3 at 3.3M, 5e-3 vs 2.5e-3 at "
                              "0.79M); for fine-tuning a third of AdamW's at 0.8M (1e-3 vs 3e-3, "
                              "benchmarks/results/cpu/finetune_lm) and AdamW's own at 3.3M (1e-3, finetune_lm_cpu)"),
    OptimizerSpec("adammini", "slimopt.optim.adam_mini:AdamMini", 1.25e-3,
                  "Adam-mini: one second moment per Hessian block",
                  "slimopt.optim.adam_mini:state_bytes_formula", formula_options=("exp_avg_dtype",),
                  comm="slimopt.optim.adam_mini:comm_bytes",
                  state_note="m in the parameter dtype, one fp32 v per block", aliases=("adam-mini", "adam_mini"),
                  memory_rows=(MemoryRow("adam-mini", "m fp32 + one fp32 v per block (tokens, heads, neurons, "
                                                      "tensors)"),),
                  lr_guidance="AdamW's own lr (the CPU pre-training sweep picked the same 1.25e-3)"),
    OptimizerSpec("sinkgd", "slimopt.optim.sinkgd:SinkGD", 0.02,
                  "SinkGD: stateless Sinkhorn row/column normalisation (AdamW for non-matrices)",
                  "slimopt.optim.sinkgd:state_bytes_formula", formula_options=("conv_as_matrix",),
                  comm="slimopt.optim.sinkgd:comm_bytes",
                  state_note="none for hidden matrices; AdamW (parameter dtype) for embeddings/head/norms/biases",
                  lr_guidance="0.02 with scale=0.05 (CPU sweep at 3.3M; 0.04 at 0.79M); sweep adamw_lr too, for "
                              "embeddings/head/norms (it picked 2x the main lr at 0.79M)"),
    OptimizerSpec("swan", "slimopt.optim.swan:SWAN", 0.02,
                  "SWAN: stateless row standardisation + whitening (AdamW for non-matrices)",
                  "slimopt.optim.swan:state_bytes_formula", formula_options=("conv_as_matrix",),
                  comm="slimopt.optim.swan:comm_bytes",
                  state_note="none for hidden matrices; AdamW (parameter dtype) for embeddings/head/norms/biases",
                  lr_guidance="as SinkGD: 0.02 with scale=0.05 (0.08 at 0.79M); sweep adamw_lr too"),
]:
    register(_spec)


def get_supported_optimizers() -> list[str]:
    """The registered optimizer names, lower case (aliases not included)."""
    return sorted(SPECS)


def default_names() -> list[str]:
    """The optimizers a comparison runs when none are named (``slimopt bench``'s tasks): every registered one,
    in the order registered (torch's AdamW, the reference, first)."""
    return list(SPECS)


def spec(name: str) -> OptimizerSpec:
    """The spec registered as ``name`` or one of its aliases (case-insensitive)."""
    key = str(name).lower()
    key = _ALIASES.get(key, key)
    if key not in SPECS:
        raise ValueError(f"Unknown optimizer name: {name!r} (supported: {', '.join(get_supported_optimizers())})")
    return SPECS[key]


def spec_of(optimizer: torch.optim.Optimizer | type) -> OptimizerSpec | None:
    """The spec whose class ``optimizer`` is (or derives from); None for a class the registry does not hold."""
    cls = optimizer if isinstance(optimizer, type) else type(optimizer)
    targets = {s.target: s for s in SPECS.values()}
    for klass in cls.__mro__:
        found = targets.get(f"{klass.__module__}:{klass.__qualname__}")
        if found is not None:
            return found
    return None


def load_optimizer(name: str) -> type[torch.optim.Optimizer]:
    """The optimizer class registered as ``name``."""
    return spec(name).load()


def create_optimizer(model: torch.nn.Module, name: str, lr: float, weight_decay: float = 0.0,
                     **kwargs: Any) -> torch.optim.Optimizer:
    """Build the optimizer ``name`` for ``model``.

    Model-aware optimizers (Adam-mini's partition, SinkGD/SWAN routing) define a ``from_model``
    classmethod that receives the model itself, so they can read parameter names, shapes and
    ``model.config``. The others get ``model.named_parameters()``.
    """
    if not isinstance(model, torch.nn.Module):
        raise TypeError(f"create_optimizer expects a torch.nn.Module, got {type(model).__name__}")
    cls = load_optimizer(name)
    from_model = getattr(cls, "from_model", None)
    if from_model is not None:
        return from_model(model, lr=lr, weight_decay=weight_decay, **kwargs)
    if cls.__module__.startswith("torch."):
        return cls(model.parameters(), lr=lr, weight_decay=weight_decay, **kwargs)
    return cls(list(model.named_parameters()), lr=lr, weight_decay=weight_decay, **kwargs)
