"""One factory for every optimizer the harness compares: ours (the slimopt registry) and the baselines.

``make_optimizer(model, name, lr=None)`` returns a ready optimizer; ``lr=None`` means the name's default
learning rate (the registry's ``example_lr`` for ours). A baseline whose package is missing raises
``OptimizerUnavailable`` with the pip command that would provide it, and the harness skips it with a note.

Names:

* registry names (``adamw``, ``microadam``, ``adammini``, ``sinkgd``, ``swan``) via ``slimopt.create_optimizer``;
* ``adamw-foreach`` / ``adamw-forloop`` / ``adamw-fused``: torch AdamW with one implementation forced;
* ``adamw-split``: torch AdamW with SinkGD/SWAN's split: ``lr`` for the hidden matrices, ``adamw_lr`` for
  embeddings, head and 1-D tensors (the reference beside plain AdamW in pre-training comparisons);
* ``muon``: ``torch.optim.Muon`` on hidden matrices, AdamW on embeddings, head and norms;
* ``adamw8bit``: torchao's ``AdamW8bit`` (CUDA) or bitsandbytes' ``AdamW8bit``;
* ``galore``: ``galore_torch.GaLoreAdamW`` on hidden matrices (rank 128 or a quarter of the width);
* ``came``: ``pytorch_optimizer.CAME``; ``adafactor``: ``torch.optim.Adafactor``;
* ``adam-mini-official``: the authors' ``adam_mini.Adam_mini`` (pip ``adam-mini==1.1.1``).
"""

from __future__ import annotations

import contextlib
import importlib
import io
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn
from torch.optim import Optimizer

__all__ = ["BASELINES", "CombinedOptimizer", "OptimizerUnavailable", "default_lr", "hybrid_split", "is_known",
           "known_names", "make_optimizer", "parse_name", "split_hidden_matrices"]


class OptimizerUnavailable(RuntimeError):
    """The optimizer's package is missing or does not support this device."""


@dataclass(frozen=True)
class Baseline:
    name: str
    default_lr: float
    summary: str
    build: Callable[..., Any]  # (model, lr, weight_decay, **kw) -> optimizer
    state_formula: str | None = None  # its analytic state formula: a registry name or a memory baseline key


def _require(module: str, pip_name: str) -> Any:
    try:
        return importlib.import_module(module)
    except Exception as exc:  # ImportError, or a package that fails while importing
        raise OptimizerUnavailable(f"needs `pip install {pip_name}` ({type(exc).__name__}: {exc})") from exc


def split_hidden_matrices(model: nn.Module) -> tuple[list[tuple[str, nn.Parameter]], list[tuple[str, nn.Parameter]]]:
    """(hidden 2-D weight matrices, everything else): embeddings, the output head and norms go to the second.

    This is the usual split for matrix optimizers (Muon, GaLore): the embedding is a lookup table and the
    head's rows are output classes, so neither is treated as a linear map between hidden states.
    """
    hidden, rest = [], []
    for name, p in model.named_parameters():
        if not p.requires_grad:
            continue
        is_table = "embed" in name or "lm_head" in name or name.startswith("classifier")
        (hidden if p.ndim == 2 and not is_table else rest).append((name, p))
    return hidden, rest


class CombinedOptimizer:
    """Two or more optimizers stepped as one (Muon + AdamW). ``param_groups`` are the children's own dicts,
    so a learning-rate schedule that edits ``group["lr"]`` reaches them."""

    def __init__(self, *optimizers: Optimizer) -> None:
        self.optimizers = [o for o in optimizers if o is not None]

    @property
    def param_groups(self) -> list[dict[str, Any]]:
        return [g for o in self.optimizers for g in o.param_groups]

    @property
    def state(self) -> dict[Any, Any]:
        merged: dict[Any, Any] = {}
        for o in self.optimizers:
            merged.update(o.state)
        return merged

    def step(self, closure: Callable[[], Any] | None = None) -> Any:
        loss = closure() if closure is not None else None
        for o in self.optimizers:
            o.step()
        return loss

    def zero_grad(self, set_to_none: bool = True) -> None:
        for o in self.optimizers:
            o.zero_grad(set_to_none=set_to_none)

    def state_dict(self) -> dict[str, Any]:
        return {"optimizers": [o.state_dict() for o in self.optimizers]}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        for o, s in zip(self.optimizers, state["optimizers"], strict=True):
            o.load_state_dict(s)


def _params(pairs: list[tuple[str, nn.Parameter]]) -> list[nn.Parameter]:
    return [p for _, p in pairs]


def _adamw(impl: str) -> Callable[..., Optimizer]:
    def build(model: nn.Module, lr: float, weight_decay: float, **kw: Any) -> Optimizer:
        params = [p for p in model.parameters() if p.requires_grad]
        if impl == "fused":
            device = params[0].device.type
            try:
                return torch.optim.AdamW(params, lr=lr, weight_decay=weight_decay, fused=True, **kw)
            except (RuntimeError, ValueError) as exc:
                raise OptimizerUnavailable(f"fused AdamW is not supported on {device}: {exc}") from exc
        return torch.optim.AdamW(params, lr=lr, weight_decay=weight_decay, foreach=(impl == "foreach"), **kw)

    return build


def hybrid_split(model: nn.Module) -> tuple[list[nn.Parameter], list[nn.Parameter]]:
    """(hidden matrices, the rest) exactly as SinkGD and SWAN route them (``optim.hybrid.routing_rules``):
    the rest (embeddings, head, norms, biases) is what the hybrids train with AdamW at ``adamw_lr``."""
    from slimopt.optim.hybrid import STATELESS, routing_rules
    from slimopt.plans import ParamPlan

    plan = ParamPlan.build(model, routing_rules(), warn=False)
    by_name = dict(model.named_parameters())
    hidden = [by_name[r.name] for r in plan if r.rule == STATELESS]
    rest = [by_name[r.name] for r in plan if r.rule != STATELESS]
    return hidden, rest


def _adamw_split(model: nn.Module, lr: float, weight_decay: float, adamw_lr: float | None = None,
                 **kw: Any) -> Optimizer:
    """torch AdamW with the hybrids' advantage: ``lr`` for the hidden matrices, ``adamw_lr`` for embeddings,
    head and 1-D tensors (default: what SinkGD gives them by default, its registry lr)."""
    from slimopt.registry import spec

    hidden, rest = hybrid_split(model)
    other_lr = spec("sinkgd").example_lr if adamw_lr is None else adamw_lr
    groups = [g for g in ({"params": hidden, "lr": lr}, {"params": rest, "lr": other_lr}) if g["params"]]
    return torch.optim.AdamW(groups, lr=lr, weight_decay=weight_decay, **kw)


def _muon(model: nn.Module, lr: float, weight_decay: float, **kw: Any) -> Any:
    muon_cls = getattr(torch.optim, "Muon", None)
    if muon_cls is None:
        raise OptimizerUnavailable(f"torch {torch.__version__} has no torch.optim.Muon (needs torch >= 2.9)")
    hidden, rest = split_hidden_matrices(model)
    # "match_rms_adamw" scales the orthogonalised update to AdamW's RMS, so one learning rate serves both parts.
    muon = muon_cls(_params(hidden), lr=lr, weight_decay=weight_decay, adjust_lr_fn="match_rms_adamw", **kw)
    adamw = torch.optim.AdamW(_params(rest), lr=lr, weight_decay=weight_decay) if rest else None
    return CombinedOptimizer(muon, adamw)


def _adamw8bit(model: nn.Module, lr: float, weight_decay: float, **kw: Any) -> Optimizer:
    params = [p for p in model.parameters() if p.requires_grad]
    on_cuda = params[0].is_cuda
    errors = []
    if on_cuda:
        try:
            ao = _require("torchao.optim", "torchao")
            return ao.AdamW8bit(params, lr=lr, weight_decay=weight_decay, **kw)
        except OptimizerUnavailable as exc:
            errors.append(str(exc))
    try:
        bnb = _require("bitsandbytes.optim", "bitsandbytes")
        return bnb.AdamW8bit(params, lr=lr, weight_decay=weight_decay, **kw)
    except OptimizerUnavailable as exc:
        errors.append(str(exc))
    raise OptimizerUnavailable("; ".join(errors) + ("" if on_cuda else " (torchao's AdamW8bit is CUDA-only)"))


def _galore(model: nn.Module, lr: float, weight_decay: float, rank: int | None = None,
            update_proj_gap: int = 200, scale: float = 0.25, **kw: Any) -> Optimizer:
    galore = _require("galore_torch", "galore-torch")
    hidden, rest = split_hidden_matrices(model)
    if rank is None:  # GaLore's paper uses 128 at 60M (width 512) ... 512 at 1B (width 2048): a quarter
        width = getattr(getattr(model, "config", None), "hidden_size", None) or min(hidden[0][1].shape)
        rank = max(1, width // 4)
    groups = [{"params": _params(rest)},
              {"params": _params(hidden), "rank": rank, "update_proj_gap": update_proj_gap, "scale": scale,
               "proj_type": "std"}]
    return galore.GaLoreAdamW(groups, lr=lr, weight_decay=weight_decay, **kw)


def _came(model: nn.Module, lr: float, weight_decay: float, **kw: Any) -> Optimizer:
    po = _require("pytorch_optimizer", "pytorch-optimizer")
    return po.CAME([p for p in model.parameters() if p.requires_grad], lr=lr, weight_decay=weight_decay, **kw)


def _adafactor(model: nn.Module, lr: float, weight_decay: float, **kw: Any) -> Optimizer:
    params = [p for p in model.parameters() if p.requires_grad]
    if hasattr(torch.optim, "Adafactor"):
        return torch.optim.Adafactor(params, lr=lr, weight_decay=weight_decay, **kw)
    po = _require("pytorch_optimizer", "pytorch-optimizer")
    return po.AdaFactor(params, lr=lr, weight_decay=weight_decay, **kw)


def _adam_mini_official(model: nn.Module, lr: float, weight_decay: float, **kw: Any) -> Optimizer:
    adam_mini = _require("adam_mini", "adam-mini==1.1.1")
    config = getattr(model, "config", None)
    dim = getattr(config, "hidden_size", None)
    heads = getattr(config, "num_attention_heads", None)
    kv_heads = getattr(config, "num_key_value_heads", heads)
    with contextlib.redirect_stdout(io.StringIO()):  # it prints one line per parameter
        return adam_mini.Adam_mini(named_parameters=model.named_parameters(), lr=lr, weight_decay=weight_decay,
                                   dim=dim, n_heads=heads, n_kv_heads=kv_heads, **kw)


BASELINES: dict[str, Baseline] = {b.name: b for b in [
    Baseline("adamw-foreach", 1.25e-3, "torch AdamW, foreach (multi-tensor) implementation", _adamw("foreach"),
             "adamw"),
    Baseline("adamw-forloop", 1.25e-3, "torch AdamW, per-tensor for-loop implementation", _adamw("forloop"),
             "adamw"),
    Baseline("adamw-fused", 1.25e-3, "torch AdamW, fused kernel", _adamw("fused"), "adamw"),
    Baseline("adamw-split", 1.25e-3, "torch AdamW, hidden matrices at lr, embeddings/head/1-D at adamw_lr "
             "(the hybrids' split)", _adamw_split, "adamw"),
    Baseline("muon", 1e-2, "torch.optim.Muon on hidden matrices + AdamW elsewhere", _muon),
    Baseline("adamw8bit", 1e-2, "8-bit AdamW (torchao on CUDA, else bitsandbytes)", _adamw8bit, "adamw-8bit"),
    Baseline("galore", 1e-2, "GaLore AdamW (galore-torch), rank = width/4", _galore, "galore"),
    Baseline("came", 1e-3, "CAME (pytorch-optimizer)", _came),
    Baseline("adafactor", 1e-2, "Adafactor (torch.optim)", _adafactor),
    Baseline("adam-mini-official", 1e-2, "the authors' Adam-mini (adam-mini==1.1.1)", _adam_mini_official,
             "adammini"),
]}


def known_names() -> list[str]:
    from slimopt import get_supported_optimizers

    return get_supported_optimizers() + list(BASELINES)


def _value(text: str) -> Any:
    for kind in (int, float):
        try:
            return kind(text)
        except ValueError:
            pass
    return {"true": True, "false": False, "none": None}.get(text.lower(), text)


def parse_name(name: str) -> tuple[str, dict[str, Any]]:
    """``"microadam@k_init=0.05,bias_correction=window"`` -> ``("microadam", {"k_init": 0.05, ...})``: a
    variant of a known optimizer with constructor options, usable wherever the harness takes a name."""
    base, _, options = name.partition("@")
    kwargs = {}
    for item in filter(None, options.split(",")):
        key, sep, value = item.partition("=")
        if not sep or not key:
            raise ValueError(f"optimizer {name!r}: options after '@' must be KEY=VALUE, got {item!r}")
        kwargs[key] = _value(value)
    return base, kwargs


def is_known(name: str) -> bool:
    try:
        base, _ = parse_name(name)
    except ValueError:
        return False
    return base in known_names()


def default_lr(name: str) -> float:
    name, _ = parse_name(name)
    if name in BASELINES:
        return BASELINES[name].default_lr
    from slimopt.registry import spec

    return spec(name).example_lr


def make_optimizer(model: nn.Module, name: str, lr: float | None = None, weight_decay: float = 0.0,
                   **kwargs: Any) -> Any:
    """Build optimizer ``name`` for ``model`` (``NAME@key=value,...`` passes options to its constructor);
    raises ``OptimizerUnavailable`` when it cannot be built here."""
    lr = default_lr(name) if lr is None else lr
    name, options = parse_name(name)
    kwargs = {**options, **kwargs}
    if name in BASELINES:
        return BASELINES[name].build(model, lr=lr, weight_decay=weight_decay, **kwargs)
    from slimopt import create_optimizer

    return create_optimizer(model, name, lr=lr, weight_decay=weight_decay, **kwargs)
