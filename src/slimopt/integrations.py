"""Plugging slimopt optimizers into trainers.

Every slimopt optimizer is a ``torch.optim.Optimizer``: Lightning's ``configure_optimizers``, Accelerate's
``prepare`` and hand-written loops take it as it is (``step(closure)`` runs the closure with autograd on,
as Lightning requires). What needs help is the HF ``Trainer``, which builds the optimizer itself from
``optimizer_cls_and_kwargs``:

* given an optimizer *class*, it calls ``cls(groups, **kwargs)`` where ``groups`` are two param groups
  of bare tensors (decay / no decay). The names are gone, so the model-aware optimizers cannot tell an
  embedding from a hidden matrix: Adam-mini falls back to one block per tensor, SinkGD/SWAN route by
  shape alone (an embedding would take the stateless update);
* given anything else (transformers >= 5), it treats it as a factory: ``factory()(model, **kwargs)``.

:class:`OptimizerFactory` is such a factory. Zero-argument constructible and called with the model, it
builds the optimizer through :func:`slimopt.create_optimizer`, so every optimizer sees names, shapes and
``model.config``. :func:`hf_optimizer_cls_and_kwargs` returns the pair for the Trainer::

    trainer = Trainer(model=model, args=args, train_dataset=data,
                      optimizer_cls_and_kwargs=hf_optimizer_cls_and_kwargs("adammini", args))

Letting the Trainer build the optimizer (rather than passing ``optimizers=(opt, sched)``) is also what
FSDP needs: the Trainer refuses a ready-made optimizer when FSDP is on.
"""

from __future__ import annotations

from typing import Any

import torch

from .registry import create_optimizer, load_optimizer

__all__ = ["OptimizerFactory", "hf_optimizer_cls_and_kwargs", "no_decay_names", "weight_decay_groups"]


def no_decay_names(model: torch.nn.Module) -> set[str]:
    """Names of the tensors that the HF Trainer exempts from weight decay: biases, and the weights of
    norm layers (``nn.LayerNorm``/``RMSNorm``/... by type, LlamaRMSNorm and friends by class name)."""
    names = set()
    for module_name, module in model.named_modules():
        kind = type(module).__name__.lower()
        is_norm = "norm" in kind and not isinstance(module, (torch.nn.Linear, torch.nn.Embedding))
        for param_name, _ in module.named_parameters(recurse=False):
            if is_norm or param_name == "bias" or param_name.endswith("_bias"):
                names.add(f"{module_name}.{param_name}" if module_name else param_name)
    return names


def weight_decay_groups(model: torch.nn.Module, weight_decay: float) -> list[dict[str, Any]]:
    """The HF Trainer's two groups over the trainable tensors, with names kept: ``weight_decay`` for
    the weights, 0 for biases and norms (``no_decay_names``). Empty groups are left out."""
    exempt = no_decay_names(model)
    trainable = [(n, p) for n, p in model.named_parameters() if p.requires_grad]
    groups = [
        {"params": [(n, p) for n, p in trainable if n not in exempt], "weight_decay": weight_decay},
        {"params": [(n, p) for n, p in trainable if n in exempt], "weight_decay": 0.0},
    ]
    return [g for g in groups if g["params"]]


class OptimizerFactory:
    """Builds a slimopt optimizer for a model; the HF Trainer's factory protocol.

    ``OptimizerFactory()(model, name="adammini", lr=1e-3, weight_decay=0.1, **kwargs)``. Arguments
    given to the constructor are defaults for every call (``OptimizerFactory(name="swan")``), so the
    class itself and bound instances both work where a zero-argument callable is expected.

    Model-aware optimizers (those with ``from_model``: Adam-mini, SinkGD, SWAN) decide weight-decay
    exemptions by their own plan (norms and biases by role). The others get the HF Trainer's two groups
    (``weight_decay_groups``), so that MicroAdam or AdamW through the factory decay the same tensors
    as the Trainer's built-in AdamW.
    """

    def __init__(self, name: str | None = None, **defaults: Any) -> None:
        self.name = name
        self.defaults = defaults

    def __call__(self, model: torch.nn.Module, name: str | None = None, **kwargs: Any) -> torch.optim.Optimizer:
        options = {**self.defaults, **kwargs}
        name = name or self.name
        if name is None:
            raise ValueError("OptimizerFactory needs an optimizer name: pass name='adammini' (or another of "
                             "slimopt.get_supported_optimizers())")
        if "lr" not in options:
            raise ValueError(f"OptimizerFactory: no lr given for {name!r}")
        lr, weight_decay = options.pop("lr"), options.pop("weight_decay", 0.0)
        cls = load_optimizer(name)
        if getattr(cls, "from_model", None) is not None or not weight_decay:
            return create_optimizer(model, name, lr=lr, weight_decay=weight_decay, **options)
        groups = weight_decay_groups(model, weight_decay)
        if cls.__module__.startswith("torch."):  # torch's own classes: bare tensors
            groups = [{**g, "params": [p for _, p in g["params"]]} for g in groups]
        return cls(groups, lr=lr, **options)

    def __repr__(self) -> str:
        args = ", ".join([*([repr(self.name)] if self.name else []), *(f"{k}={v!r}" for k, v in self.defaults.items())])
        return f"OptimizerFactory({args})"


def hf_optimizer_cls_and_kwargs(name: str, args: Any = None, **kwargs: Any) -> tuple[type, dict[str, Any]]:
    """``(OptimizerFactory, kwargs)`` for ``Trainer(optimizer_cls_and_kwargs=...)``.

    ``args`` (a ``TrainingArguments``) supplies ``lr`` and ``weight_decay`` unless given here; the
    factory path of the Trainer does not pass them itself. Other keywords go to the optimizer.
    A fresh dict each call: the Trainer pops keys from it.
    """
    options: dict[str, Any] = {"name": name}
    if args is not None:
        options["lr"] = args.learning_rate
        options["weight_decay"] = args.weight_decay
    options.update(kwargs)
    if "lr" not in options:
        raise ValueError("hf_optimizer_cls_and_kwargs needs lr= or args= (a TrainingArguments)")
    return OptimizerFactory, options
