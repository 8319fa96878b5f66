"""Analytic optimizer-state memory: per-tensor formulas and the table ``slimopt memory --model NAME [--json]``.

Every tensor is first described by :mod:`slimopt.plans` (its role and shape facts, :class:`ParamInfo`);
then one formula per optimizer gives its state bytes. slimopt's own optimizers keep their formula beside
their class and name it in their registry spec (``OptimizerSpec.state_formula``), with the constructor
options it reads; the defaults come from the class, so a table counts what the class allocates. The
baselines that slimopt does not implement (8-bit AdamW, GaLore) have their formulas here. All formulas
count a 4-byte float32 step counter per tensor that keeps state, as torch's AdamW and slimopt's base class
do: negligible for real models, but it makes small checks exact.

The table's rows (:func:`table`) are an optimizer with options, declared in its registry spec
(``memory_rows``): ``microadam`` with the class's defaults, ``microadam-m10``/``-m20`` with the paper's
(bucket 100,000, Top-K block 20,864), AdamW's state in fp32 or bf16; an optimizer that declares none has
one row, its name with the class's defaults. ``slimopt plan`` uses the same formulas with the class
defaults and the parameter dtype.

Units: GB = 1e9 bytes, GiB = 2^30 bytes; both are printed.
"""

from __future__ import annotations

import argparse
import inspect
import json
import math
import sys
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass, field
from typing import Any

from ..core.base import STEP_BYTES
from ..optim.adamw import adamw_state_bytes
from ..plans.param_plan import HIDDEN_ROLES, ParamInfo, param_infos
from ..registry import SPECS, spec
from .models import MODELS, UnsupportedConfig, resolve_model

__all__ = [
    "BASELINE_FORMULAS",
    "PUBLISHED",
    "TableRow",
    "adamw_state_bytes",
    "analytic_state_bytes",
    "formula",
    "row_names",
    "state_table",
    "table",
    "tensor_facts",
    "tensor_state_bytes",
    "add_arguments",
    "run",
]

GB = 1e9
GiB = 2**30

# roles of the hidden matrices GaLore projects (2-D ones; the hybrids' own routing decides theirs)
MATRIX_ROLES = HIDDEN_ROLES


# ---------------------------------------------------------------------------------------------------------
# per-tensor facts


def tensor_facts(named_shapes: Any, config: Mapping[str, Any] | Any = None) -> list[ParamInfo]:
    """Role and shape facts of every tensor: from (name, shape) or (name, tensor) pairs, or a module
    (trainable parameters, its ``.config`` by default). Shapes become meta tensors: nothing is allocated."""
    import torch

    if hasattr(named_shapes, "named_parameters"):
        return param_infos(named_shapes, config=config)
    pairs = [(n, torch.empty(tuple(int(s) for s in getattr(x, "shape", x)), device="meta")) for n, x in named_shapes]
    return param_infos(pairs, config=config)


# ---------------------------------------------------------------------------------------------------------
# formulas of the baselines slimopt does not implement


def _adamw_8bit(t: ParamInfo, *, param_bytes: int = 4, scale_block: int | None = None) -> int:
    scales = 2 * math.ceil(t.numel / scale_block) * 4 if scale_block else 0  # one fp32 scale per block, m and v
    return 2 * t.numel + scales + STEP_BYTES


def _galore(t: ParamInfo, *, param_bytes: int = 4, rank: int = 256) -> int:
    if not (t.role in MATRIX_ROLES and len(t.shape) == 2):
        return adamw_state_bytes(t, param_bytes=param_bytes)
    small, large = sorted(t.shape)
    r = min(rank, small)
    return (small * r + 2 * large * r) * param_bytes + STEP_BYTES  # projector + m, v of the projected grad


@dataclass(frozen=True)
class BaselineFormula:
    bytes: Callable[..., int]
    defaults: dict[str, Any]
    summary: str
    note: str  # for ``slimopt plan``


BASELINE_FORMULAS: dict[str, BaselineFormula] = {
    "adamw-8bit": BaselineFormula(_adamw_8bit, {"scale_block": None}, "m, v 8-bit: 2 B/param",
                                  "baseline (bitsandbytes/torchao), not in slimopt"),
    "galore": BaselineFormula(_galore, {"rank": 256}, "rank-r projector + m, v of r x n (hidden matrices); "
                              "AdamW rest", "baseline (GaLore, rank as the paper for this size), not in slimopt"),
}


def formula(optimizer: str) -> tuple[Callable[..., int], dict[str, Any]]:
    """``(bytes(info, *, param_bytes, **options), default options)`` of a registered optimizer (its class's
    defaults) or of a baseline of :data:`BASELINE_FORMULAS`."""
    if optimizer in BASELINE_FORMULAS:
        base = BASELINE_FORMULAS[optimizer]
        return base.bytes, dict(base.defaults)
    found = spec(optimizer)
    return found.formula(), found.formula_defaults()


def formula_option_names(optimizer: str) -> list[str]:
    """The options a formula takes besides ``param_bytes`` (what ``--set`` may change)."""
    return [p for p in list(inspect.signature(formula(optimizer)[0]).parameters)[1:]]


# ---------------------------------------------------------------------------------------------------------
# the table: rows are an optimizer with options


@dataclass(frozen=True)
class TableRow:
    label: str
    optimizer: str  # a registry name or a key of BASELINE_FORMULAS
    summary: str
    options: dict[str, Any] = field(default_factory=dict)  # over the class's / formula's defaults


def table() -> dict[str, TableRow]:
    """The default rows of ``slimopt memory``, by label: each registered optimizer's (its spec's
    ``memory_rows``, or its name with the class's defaults), then the baselines of :data:`BASELINE_FORMULAS`."""
    rows = [TableRow(r.label, s.name, r.summary, dict(r.options)) for s in SPECS.values() for r in s.rows()]
    rows += [TableRow(name, name, base.summary) for name, base in BASELINE_FORMULAS.items()]
    return {r.label: r for r in rows}


def _resolve(name: str) -> tuple[str, dict[str, Any]]:
    """A table label, a registry name (or alias) or a baseline key -> (optimizer, options of the row)."""
    rows = table()
    if name in rows:
        return rows[name].optimizer, dict(rows[name].options)
    if name in BASELINE_FORMULAS:
        return name, {}
    return spec(name).name, {}


def row_names() -> list[str]:
    """Every name ``slimopt memory --optimizer`` takes: the table's labels, then registry names and baseline
    keys that are no label."""
    labels = list(table())
    return labels + [n for n in (*SPECS, *BASELINE_FORMULAS) if n not in labels]


def tensor_state_bytes(facts: Iterable[ParamInfo], optimizer: str, **options: Any) -> dict[str, int]:
    """State bytes per tensor name under ``optimizer`` (a table label, registry name or baseline key);
    ``options`` override the defaults (``param_bytes`` included)."""
    base, row_options = _resolve(optimizer)
    bytes_of, defaults = formula(base)
    kwargs = {**defaults, **row_options, **options}
    return {t.name: bytes_of(t, **kwargs) for t in facts}


def analytic_state_bytes(named_shapes: Any, optimizer: str, *, config: Any = None, **options: Any) -> int:
    """Total optimizer-state bytes of ``optimizer`` for a model.

    ``named_shapes``: (name, shape) or (name, tensor) pairs, an ``nn.Module``, or the list of
    :class:`ParamInfo` that :func:`tensor_facts` returns. ``config`` (a dict or a HF config) gives the
    attention geometry Adam-mini's head blocks need; a module's ``.config`` is used by default.
    ``options`` override the defaults, e.g. ``m=20``, ``rank=128`` or ``param_bytes=2``.
    """
    facts = named_shapes if _is_facts(named_shapes) else tensor_facts(named_shapes, config)
    return sum(tensor_state_bytes(facts, optimizer, **options).values())


def _is_facts(obj: Any) -> bool:
    return isinstance(obj, list) and bool(obj) and all(isinstance(t, ParamInfo) for t in obj)


# what the papers print, for side-by-side display (and the tests)
PUBLISHED: dict[tuple[str, str], tuple[float, str, str]] = {
    ("llama2-7b", "adamw-bf16"): (25.1, "GiB", "MicroAdam paper (4 B/param)"),
    ("llama2-7b", "adamw-8bit"): (12.55, "GiB", "MicroAdam paper (2 B/param)"),
    ("llama2-7b", "microadam-m10"): (5.65, "GiB", "MicroAdam paper (m=10, k=1%)"),
    ("llama2-7b", "adamw-fp32"): (53.92, "GB", "Adam-mini paper, Fig. 1 (m+v; = 8 B x 6.74e9)"),
    ("llama2-7b", "adam-mini"): (26.96, "GB", "Adam-mini paper, Fig. 1 (m+v)"),
}


def state_table(model: str, optimizers: Iterable[str] | None = None,
                options: Mapping[str, Mapping[str, Any]] | None = None) -> dict[str, Any]:
    """Everything ``slimopt memory`` prints for one model (a published one's name, or a config.json or a folder
    with one), as JSON-able data.

    ``options`` maps a row to overrides of its options, e.g. ``{"galore": {"rank": 128}}`` (GaLore's rank
    defaults to the one used for the model's size). Each row says every option it was computed with.
    """
    options = options or {}
    model_spec = resolve_model(model)  # a published name, or a config.json / a folder with one
    facts = tensor_facts(model_spec.shapes(), model_spec.config)
    n_params = sum(t.numel for t in facts)
    rows_by_label = table()
    names = list(optimizers or rows_by_label)
    reference = sum(tensor_state_bytes(facts, "adamw-fp32").values())
    rows = []
    for name in names:
        base, row_options = _resolve(name)
        chosen = {"rank": model_spec.galore_rank} if base == "galore" else {}
        chosen.update(options.get(name, {}))
        total = sum(tensor_state_bytes(facts, name, **chosen).values())
        _, defaults = formula(base)
        summary = rows_by_label[name].summary if name in rows_by_label else spec(base).summary
        row = {
            "optimizer": name, "bytes": total, "bytes_per_param": total / n_params,
            "GB": total / GB, "GiB": total / GiB, "vs_adamw_fp32": total / reference,
            "options": {"param_bytes": 4, **defaults, **row_options, **chosen}, "formula": summary,
        }
        if chosen:
            row["formula"] += " [" + ", ".join(f"{k}={v}" for k, v in chosen.items()) + "]"
        if (model, name) in PUBLISHED and not options.get(name):
            value, unit, where = PUBLISHED[(model, name)]
            row["published"] = {"value": value, "unit": unit, "source": where}
        rows.append(row)
    return {"model": model, "source": model_spec.source, "config": dict(model_spec.config), "params": n_params,
            "tensors": len(facts), "units": {"GB": "1e9 bytes", "GiB": "2^30 bytes"},
            "note": "optimizer state only (not weights, gradients or activations); includes a 4-byte "
                    "step counter per tensor", "optimizers": rows}


# ---------------------------------------------------------------------------------------------------------
# command line


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--model", action="append", metavar="NAME|PATH",
                        help=f"published model (repeatable, or 'all'): {', '.join(MODELS)}; or a model's "
                             "config.json or a folder with one (LLaMA/Mistral/Qwen2/Qwen3, GPT-2, BERT, OPT)")
    parser.add_argument("--optimizer", action="append", metavar="NAME",
                        help="restrict to these rows (repeatable): " + ", ".join(table()))
    parser.add_argument("--set", action="append", default=[], metavar="OPTIMIZER.KEY=VALUE",
                        help="override a formula option, e.g. galore.rank=128, microadam-m10.quant_block_size=64, "
                             "adamw-8bit.scale_block=256")
    parser.add_argument("--json", action="store_true", help="print machine-readable JSON")


def _parse_value(text: str) -> Any:
    if text.lower() == "none":
        return None
    for kind in (int, float):
        try:
            return kind(text)
        except ValueError:
            pass
    raise ValueError(f"not a number: {text!r}")


def parse_settings(settings: Iterable[str]) -> dict[str, dict[str, Any]]:
    """``["galore.rank=128"]`` -> ``{"galore": {"rank": 128}}``; names and keys are checked."""
    out: dict[str, dict[str, Any]] = {}
    for setting in settings:
        target, _, value = setting.partition("=")
        optimizer, _, key = target.rpartition(".")
        if not value or not key or optimizer not in row_names():
            raise ValueError(f"--set {setting!r}: expected OPTIMIZER.KEY=VALUE with OPTIMIZER one of "
                             f"{', '.join(row_names())}")
        known = formula_option_names(_resolve(optimizer)[0])
        if key not in known:
            raise ValueError(f"--set {setting!r}: {optimizer} has no option {key!r} (options: {', '.join(known)})")
        out.setdefault(optimizer, {})[key] = _parse_value(value)
    return out


def _format(table: dict[str, Any]) -> str:
    header = ("optimizer", "B/param", "GB (1e9 B)", "GiB (2^30 B)", "vs AdamW fp32", "paper", "state")
    lines = [header]
    for r in table["optimizers"]:
        published = r.get("published")
        paper = f"{published['value']:g} {published['unit']}" if published else ""
        lines.append((r["optimizer"], f"{r['bytes_per_param']:.3f}", f"{r['GB']:.2f}", f"{r['GiB']:.2f}",
                      f"{100 * r['vs_adamw_fp32']:.1f}%", paper, r["formula"]))
    widths = [max(len(line[i]) for line in lines) for i in range(len(header) - 1)]
    right = {1, 2, 3, 4}
    out = [f"{table['model']}: {table['params']:,} parameters in {table['tensors']} tensors "
           f"({table['source']})",
           "optimizer-state memory; GB = 1e9 bytes, GiB = 2^30 bytes; a 4-byte step counter per tensor included"]
    for i, line in enumerate(lines):
        cells = [c.rjust(w) if j in right else c.ljust(w) for j, (c, w) in enumerate(zip(line, widths))]
        out.append("  ".join(cells) + "  " + line[-1])
        if i == 0:
            out.append("  ".join("-" * w for w in widths) + "  " + "-" * len(header[-1]))
    sources = list(dict.fromkeys(r["published"]["source"] for r in table["optimizers"] if "published" in r))
    if sources:
        out.append("paper: " + "; ".join(sources))
    out.append("settings of each row (the class defaults unless the row names others; `--set ROW.KEY=VALUE`")
    out.append("changes one; `slimopt plan` uses the class defaults, param_bytes from its --precision):")
    out.extend(f"  {r['optimizer']}: " + ", ".join(f"{k}={v}" for k, v in r["options"].items())
               for r in table["optimizers"])
    return "\n".join(out)


def run(args: argparse.Namespace) -> int:
    models = args.model or []
    if not models:
        print("models (use --model NAME, or --model all):")
        for model in MODELS.values():
            n = sum(math.prod(s) for _, s in model.shapes())
            print(f"  {model.name:<12} {n / 1e6:>9.1f}M  {model.source}")
        return 0
    if "all" in models:
        models = list(MODELS)
    for m in models:
        if m in MODELS:
            continue
        try:
            resolve_model(m)
        except (KeyError, UnsupportedConfig) as exc:
            print(f"slimopt memory: {exc.args[0] if exc.args else exc}", file=sys.stderr)
            return 2
    bad_optimizers = [o for o in args.optimizer or [] if o not in row_names()]
    if bad_optimizers:
        print(f"slimopt memory: --optimizer {', '.join(map(repr, bad_optimizers))}: unknown optimizer (known: "
              f"{', '.join(row_names())})", file=sys.stderr)
        return 2
    try:
        settings = parse_settings(args.set)
    except ValueError as exc:
        print(f"slimopt memory: {exc}", file=sys.stderr)
        return 2
    tables = [state_table(m, args.optimizer, settings) for m in models]
    if args.json:
        print(json.dumps(tables[0] if len(tables) == 1 else tables, indent=1))
    else:
        print("\n\n".join(_format(t) for t in tables))
    return 0
