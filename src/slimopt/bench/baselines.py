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
import re
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn
from torch.optim import Optimizer

from slimopt.registry import SECOND_LR, create_optimizer, get_supported_optimizers, spec

__all__ = ["BASELINES", "CombinedOptimizer", "OptimizerUnavailable", "default_lr", "harness_names", "hybrid_split",
           "is_known", "make_optimizer", "parse_name", "second_lr_default", "split_second_lr", "takes_second_lr",
           "with_second_lr"]


class OptimizerUnavailable(RuntimeError):
    """The optimizer's package is missing or does not support this device."""


@dataclass(frozen=True)
class Baseline:
    name: str
    default_lr: float
    summary: str
    build: Callable[..., Any]  # (model, lr, weight_decay, **kw) -> optimizer
    state_formula: str | None = None  # its analytic state formula: a registry name or a memory baseline key
    second_lr: bool = False  # takes ``adamw_lr`` (registry.SECOND_LR), a second lr the harness sweeps too


def _require(module: str, pip_name: str) -> Any:
    try:
        return importlib.import_module(module)
    except Exception as exc:  # ImportError, or a package that fails while importing
        raise OptimizerUnavailable(f"needs `pip install {pip_name}` ({type(exc).__name__}: {exc})") from exc


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
    the rest (embeddings, head, norms, biases) is what the hybrids train with AdamW at ``adamw_lr``. The one
    split of the harness: the matrix baselines (Muon, GaLore) take it too, so every matrix method gets the
    same tensors (the plan reads roles from module types and shapes, not name substrings)."""
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
    head and 1-D tensors (default: :func:`second_lr_default`)."""
    hidden, rest = hybrid_split(model)
    other_lr = second_lr_default("adamw-split", lr) if adamw_lr is None else adamw_lr
    groups = [g for g in ({"params": hidden, "lr": lr}, {"params": rest, "lr": other_lr}) if g["params"]]
    return torch.optim.AdamW(groups, lr=lr, weight_decay=weight_decay, **kw)


def _muon(model: nn.Module, lr: float, weight_decay: float, **kw: Any) -> Any:
    muon_cls = getattr(torch.optim, "Muon", None)
    if muon_cls is None:
        raise OptimizerUnavailable(f"torch {torch.__version__} has no torch.optim.Muon (needs torch >= 2.9)")
    hidden, rest = hybrid_split(model)
    # "match_rms_adamw" scales the orthogonalised update to AdamW's RMS, so one learning rate serves both parts.
    muon = muon_cls(hidden, lr=lr, weight_decay=weight_decay, adjust_lr_fn="match_rms_adamw", **kw)
    adamw = torch.optim.AdamW(rest, lr=lr, weight_decay=weight_decay) if rest else None
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


def galore_rank(model: nn.Module, hidden: list[nn.Parameter] | None = None) -> int:
    """The GaLore baseline's default rank: a quarter of the width (GaLore's paper uses 128 at 60M, width 512,
    ... 512 at 1B, width 2048)."""
    width = getattr(getattr(model, "config", None), "hidden_size", None)
    if width is None:
        hidden = hybrid_split(model)[0] if hidden is None else hidden
        width = min(hidden[0].shape)
    return max(1, width // 4)


def _galore(model: nn.Module, lr: float, weight_decay: float, rank: int | None = None,
            update_proj_gap: int = 200, scale: float = 0.25, **kw: Any) -> Optimizer:
    galore = _require("galore_torch", "galore-torch")
    hidden, rest = hybrid_split(model)
    if rank is None:
        rank = galore_rank(model, hidden)
    groups = [{"params": rest},
              {"params": hidden, "rank": rank, "update_proj_gap": update_proj_gap, "scale": scale,
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
             "(the hybrids' split)", _adamw_split, "adamw", second_lr=True),
    Baseline("muon", 1e-2, "torch.optim.Muon on hidden matrices + AdamW elsewhere", _muon),
    Baseline("adamw8bit", 1e-2, "8-bit AdamW (torchao on CUDA, else bitsandbytes)", _adamw8bit, "adamw-8bit"),
    Baseline("galore", 1e-2, "GaLore AdamW (galore-torch), rank = width/4", _galore, "galore"),
    Baseline("came", 1e-3, "CAME (pytorch-optimizer)", _came),
    Baseline("adafactor", 1e-2, "Adafactor (torch.optim)", _adafactor),
    Baseline("adam-mini-official", 1e-2, "the authors' Adam-mini (adam-mini==1.1.1)", _adam_mini_official,
             "adammini"),
]}


def harness_names() -> list[str]:
    """Every name :func:`make_optimizer` builds (options after ``@`` aside): the registered optimizers, then
    the baselines."""
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
    return base in harness_names()


def default_lr(name: str) -> float:
    name, _ = parse_name(name)
    if name in BASELINES:
        return BASELINES[name].default_lr
    return spec(name).example_lr


def takes_second_lr(name: str) -> bool:
    """Whether ``name`` (options after ``@`` aside) takes a second lr, ``adamw_lr``, for embeddings, head and
    1-D tensors: a baseline that says so, or a registered class with that constructor argument."""
    base, _ = parse_name(name)
    if base in BASELINES:
        return BASELINES[base].second_lr
    return spec(base).takes_second_lr()


def second_lr_default(name: str, lr: float) -> float:
    """The ``adamw_lr`` that ``name`` uses when none is given: the hybrids give their AdamW part their main lr;
    adamw-split gives it what the hybrids give it by default, their registry lr."""
    base, _ = parse_name(name)
    return default_lr("sinkgd") if base == "adamw-split" else lr


def with_second_lr(name: str, adamw_lr: float) -> str:
    """``sinkgd`` -> ``sinkgd@adamw_lr=0.005``: the run's name says its second lr."""
    return f"{name}{',' if '@' in name else '@'}{SECOND_LR}={adamw_lr:.4g}"


def split_second_lr(name: str) -> tuple[str, str | None]:
    """The inverse of :func:`with_second_lr`: ``sinkgd@adamw_lr=0.005`` -> (``sinkgd``, ``"0.005"``); a name
    without a second lr -> (name, None)."""
    match = re.search(rf"[@,]{SECOND_LR}=([^,]+)", name)
    if match is None:
        return name, None
    rest = name[:match.start()] + name[match.end():]
    if "@" not in rest and "," in rest:  # the second lr was the first option: the next one takes its "@"
        rest = rest.replace(",", "@", 1)
    return rest, match.group(1)


def make_optimizer(model: nn.Module, name: str, lr: float | None = None, weight_decay: float = 0.0,
                   **kwargs: Any) -> Any:
    """Build optimizer ``name`` for ``model`` (``NAME@key=value,...`` passes options to its constructor);
    raises ``OptimizerUnavailable`` when it cannot be built here."""
    lr = default_lr(name) if lr is None else lr
    name, options = parse_name(name)
    kwargs = {**options, **kwargs}
    if name in BASELINES:
        return BASELINES[name].build(model, lr=lr, weight_decay=weight_decay, **kwargs)
    return create_optimizer(model, name, lr=lr, weight_decay=weight_decay, **kwargs)
