"""Which optimizers fit a model on a GPU: ``slimopt plan --model NAME|PATH --gpu-mem GiB [--seq-len --batch]``;
``PATH`` is a model's ``config.json`` or a folder with one (:func:`slimopt.memory.models.resolve_model`).

Training memory is four terms; the planner estimates each one per optimizer and says which fit:

* **weights**: parameters x bytes per parameter (4 in fp32 and AMP, 2 in pure bf16), plus, under AMP,
  the bf16 copies of the weights that autocast makes and the backward pass keeps (2 B/param);
* **gradients**: one per parameter, in the parameter's dtype;
* **optimizer state**: the analytic table of :mod:`slimopt.memory.formulas` (one formula per optimizer,
  the same numbers ``slimopt memory`` prints, exact for slimopt's classes), with the options slimopt's
  classes use by default and state in the parameter dtype where the class keeps it so;
* **activations**: the tensors autograd saves for backward, per token and layer, written out for the
  HF implementations (sdpa attention) and checked against saved-tensor hooks on tiny real models in
  the tests: Llama (RMSNorm, SwiGLU) exactly in fp32; GPT-2's ``gelu_new`` MLP saves about five
  f-sized tensors. Plus the loss: fp32 log-probabilities over the vocabulary and, at the start of
  backward, their gradient (for a 32k vocabulary these are often the largest single tensors).

The total is the sum of the four; the true peak is somewhat lower (activations are freed as gradients
appear) and a CUDA context, the allocator's fragmentation and kernels' workspaces come on top, so an
optimizer "fits" when the total stays under ``(1 - headroom)`` of the GPU's memory (default 10%).
GiB everywhere (2^30 bytes, as ``torch.cuda`` and ``nvidia-smi`` count): an "80 GB" H100 has ~79.2 GiB.
"""

from __future__ import annotations

import argparse
import json
import math
import sys
import textwrap
from dataclasses import asdict, dataclass
from typing import Any

from ..registry import SPECS
from .formulas import BASELINE_FORMULAS, analytic_state_bytes, formula, tensor_facts
from .models import MODELS, ModelSpec, resolve_model

__all__ = ["Arch", "FitCandidate", "FitReport", "activation_bytes", "add_arguments", "arch_of", "fit_candidates",
           "fit_options", "fit_report", "fit_state_bytes", "matching_memory_row", "run", "why_not"]

GiB = 2**30
PRECISIONS = ("amp", "bf16", "fp32")


# ---------------------------------------------------------------------------------------------------------
# architecture facts the activation estimate needs


@dataclass(frozen=True)
class Arch:
    family: str
    layers: int
    hidden: int
    ffn: int
    heads: int
    kv_heads: int
    vocab: int  # 0: no language-model head (a classifier)
    head_dim: int
    mlp_saved: float  # f-sized tensors the MLP saves per token (see MLP_SAVED)


# What autograd saves per token, in bytes, read off the HF implementations (transformers 5, sdpa attention)
# with saved-tensor hooks and written out term by term; the tests hold the sum against tiny real models.
# h: hidden size, q = heads x head_dim, kv = kv_heads x head_dim, a: heads, f: MLP width.
#
# Norms, bytes = c_h * h + c_0 per norm. Llama's RMSNorm is Python code that upcasts to fp32 and keeps its
# input, x * rsqrt and its output (+ a bf16 copy for the next matmul under autocast); LayerNorm is one
# fused op keeping input, output and its statistics.
_NORM = {("rms", "fp32"): (12, 4), ("rms", "amp"): (10, 4), ("rms", "bf16"): (7, 4),
         ("layernorm", "fp32"): (8, 8), ("layernorm", "amp"): (6, 8), ("layernorm", "bf16"): (4, 4)}
# f-sized tensors an MLP keeps, by activation. SwiGLU: gate and up outputs, silu(gate), their product.
# GPT-2's "gelu_new" is Python (0.5 x (1 + tanh(...))): 5.25 f measured. Exact GELU, ReLU: input, output.
MLP_SAVED = {"llama": 4.0, "gpt2": 5.25, "bert": 2.0, "opt": 2.0}


def _norm_bytes(arch: Arch, precision: str) -> int:
    c_h, c_0 = _NORM[("rms" if arch.family == "llama" else "layernorm", precision)]
    return c_h * arch.hidden + c_0


def _attention_bytes(arch: Arch, precision: str) -> int:
    """q, k, v (after RoPE), the attention output and the output projection's input, sdpa's fp32
    log-sum-exp per head. Llama's fp32 path keeps one copy of the output (a view feeds o_proj); under
    autocast one more fp32 h-vector is kept (measured; RoPE's cos/sin are fp32, so q and k go through
    fp32 there)."""
    e = 4 if precision == "fp32" else 2
    h, a = arch.hidden, arch.heads
    q, kv = a * arch.head_dim, arch.kv_heads * arch.head_dim
    if arch.family == "llama":
        extra = {"fp32": 0, "amp": 2 * q + 4 * h, "bf16": 2 * q}[precision]
        return e * (q + 2 * kv) + e * q + extra + 4 * a
    return e * (q + 2 * kv) + 2 * e * q + 4 * a


def arch_of(model: str | ModelSpec) -> Arch:
    """The activation facts of a published model (by name), a config.json (path) or a :class:`ModelSpec`."""
    spec = model if isinstance(model, ModelSpec) else resolve_model(model)
    c = spec.config
    if spec.family == "llama":
        heads = c["num_attention_heads"]
        return Arch("llama", c["num_hidden_layers"], c["hidden_size"], c["intermediate_size"], heads,
                    c.get("num_key_value_heads", heads), c["vocab_size"],
                    c.get("head_dim") or c["hidden_size"] // heads, MLP_SAVED["llama"])
    if spec.family == "gpt2":
        h = c["n_embd"]
        return Arch("gpt2", c["n_layer"], h, c.get("n_inner") or 4 * h, c["n_head"], c["n_head"], c["vocab_size"],
                    h // c["n_head"], MLP_SAVED["gpt2"])
    if spec.family == "opt":
        h = c["hidden_size"]
        heads = c["num_attention_heads"]
        return Arch("opt", c["num_hidden_layers"], h, c["ffn_dim"], heads, heads, c["vocab_size"], h // heads,
                    MLP_SAVED["opt"])
    if spec.family == "bert":
        h = c["hidden_size"]
        heads = c["num_attention_heads"]
        return Arch("bert", c["num_hidden_layers"], h, c["intermediate_size"], heads, heads, 0, h // heads,
                    MLP_SAVED["bert"])
    raise KeyError(f"no activation model for family {spec.family!r}")


def activation_bytes(arch: Arch, seq_len: int, batch: int, precision: str = "amp", *, flash: bool = True,
                     checkpointing: bool = False, loss_grad: bool = True) -> int:
    """Bytes autograd keeps for backward in one training step (plus the loss gradient's peak).

    ``precision``: "fp32"; "amp" (fp32 weights and residual stream, bf16 matmuls under autocast);
    "bf16" (everything bf16). ``flash``: sdpa's fused attention (saves a log-sum-exp per head and
    token) rather than the eager path (saves the ``heads x seq_len`` softmax per token).
    ``checkpointing``: each layer keeps only its input; one layer's activations are live at a time.
    ``loss_grad``: count the gradient of the log-probabilities, live at the start of backward.
    """
    if precision not in PRECISIONS:
        raise ValueError(f"Invalid precision: {precision!r} (must be one of {', '.join(PRECISIONS)})")
    e = 4 if precision == "fp32" else 2  # matmul inputs and outputs
    r = 2 if precision == "bf16" else 4  # the residual stream (fp32 under autocast)
    norm = _norm_bytes(arch, precision)
    attention = _attention_bytes(arch, precision)
    if not flash:
        attention += e * arch.heads * seq_len  # the softmax matrix
    mlp = e * arch.mlp_saved * arch.ffn
    per_layer = 2 * norm + attention + mlp
    # after the layers: the final norm, fp32 log-probabilities over the vocabulary and (first thing in
    # backward) their gradient, token ids and labels
    outside = norm + (4 + 4 * loss_grad) * arch.vocab + 16
    tokens = seq_len * batch
    if checkpointing:
        layers = arch.layers * arch.hidden * r + per_layer  # kept layer inputs + one layer recomputed
    else:
        layers = arch.layers * per_layer
    return int(math.ceil(tokens * (layers + outside)))


# ---------------------------------------------------------------------------------------------------------
# optimizers and their state formulas (the registry's, and two baselines')


@dataclass(frozen=True)
class FitCandidate:
    """An optimizer ``slimopt plan`` weighs: a registered one or a baseline formula of ``slimopt.memory.formulas``
    (not to be confused with :mod:`slimopt.plans`, what each tensor of a model is to an optimizer)."""

    name: str
    in_slimopt: bool
    note: str


def fit_candidates() -> dict[str, FitCandidate]:
    """Every registered optimizer, then the baselines slimopt does not implement (8-bit AdamW, GaLore)."""
    rows = {s.name: FitCandidate(s.name, s.in_slimopt, s.state_note or s.summary) for s in SPECS.values()}
    rows.update({name: FitCandidate(name, False, f.note) for name, f in BASELINE_FORMULAS.items()})
    return rows


def fit_options(name: str, param_bytes: int = 4, galore_rank: int = 256) -> dict[str, Any]:
    """The options the fit report counts ``name`` with: the class's defaults and the parameter dtype's size."""
    _, defaults = formula(name)
    options = {"param_bytes": param_bytes, **defaults}
    if name == "galore":
        options["rank"] = galore_rank
    return options


def fit_state_bytes(name: str, model: Any, param_bytes: int = 4, *, config: Any = None,
                        galore_rank: int = 256) -> int:
    """Optimizer-state bytes the fit report counts for optimizer ``name`` (a key of :func:`fit_candidates`)
    on ``model``: an ``nn.Module``, (name, shape) pairs, or the facts of ``formulas.tensor_facts``.
    ``param_bytes`` is the parameter dtype's size (AdamW-type state is kept in it)."""
    return analytic_state_bytes(model, name, config=config, **fit_options(name, param_bytes, galore_rank))


# ---------------------------------------------------------------------------------------------------------
# the fit report


@dataclass
class FitReport:
    """What ``slimopt plan`` prints: the model, the settings, and per optimizer the four memory terms and whether
    they fit (``rows``)."""

    model: str
    params: int
    gpu_gib: float
    budget_gib: float
    seq_len: int
    batch: int
    precision: str
    checkpointing: bool
    rows: list[dict[str, Any]]
    flash: bool = True
    headroom: float = 0.1

    def as_dict(self) -> dict[str, Any]:
        return asdict(self)


def fit_report(model: str, gpu_mem_gib: float, *, seq_len: int = 2048, batch: int = 1, precision: str = "amp",
         checkpointing: bool = False, flash: bool = True, headroom: float = 0.1,
         optimizers: list[str] | None = None) -> FitReport:
    """Memory of training ``model`` (a published model's name, or a config.json or a folder with one) with
    each optimizer, and whether it fits in ``gpu_mem_gib``."""
    spec = resolve_model(model)  # KeyError / UnsupportedConfig (a ValueError) naming --model and the value
    if precision not in PRECISIONS:
        raise ValueError(f"Invalid precision: {precision!r} (must be one of {', '.join(PRECISIONS)})")
    if not 0 <= headroom < 1:
        raise ValueError(f"Invalid headroom (--headroom): {headroom} (must be in [0, 1))")
    for argument, flag, value in (("gpu_mem_gib", "--gpu-mem", gpu_mem_gib), ("seq_len", "--seq-len", seq_len),
                                  ("batch", "--batch", batch)):
        if not value > 0:
            raise ValueError(f"Invalid {argument} ({flag}): {value} (must be positive)")
    known = fit_candidates()
    names = optimizers or list(known)
    unknown = [n for n in names if n not in known]
    if unknown:
        raise KeyError(f"unknown optimizer(s) (--optimizer) {', '.join(map(repr, unknown))}; known: {', '.join(known)}")
    facts = tensor_facts(spec.shapes(), spec.config)
    n = sum(t.numel for t in facts)
    param_bytes = 2 if precision == "bf16" else 4
    weights = n * param_bytes + (2 * n if precision == "amp" else 0)
    gradients = n * param_bytes
    arch = arch_of(spec)
    act = activation_bytes(arch, seq_len, batch, precision, flash=flash, checkpointing=checkpointing)
    act_per_sample = activation_bytes(arch, seq_len, 1, precision, flash=flash, checkpointing=checkpointing)
    budget = gpu_mem_gib * (1 - headroom) * GiB
    rows = []
    for name in names:
        planned = known[name]
        options = fit_options(name, param_bytes, spec.galore_rank)
        state = analytic_state_bytes(facts, name, **options)
        static = weights + gradients + state
        total = static + act
        max_batch = max(0, int((budget - static) // act_per_sample)) if budget > static else 0
        rows.append({
            "optimizer": name, "in_slimopt": planned.in_slimopt, "note": planned.note,
            "weights_gib": weights / GiB, "gradients_gib": gradients / GiB, "state_gib": state / GiB,
            "activations_gib": act / GiB, "total_gib": total / GiB, "fits": total <= budget,
            "max_batch": max_batch, "options": options,
        })
    return FitReport(model, n, gpu_mem_gib, budget / GiB, seq_len, batch, precision, checkpointing, rows, flash,
                   headroom)


def _total_with(report: FitReport, name: str, **changes: Any) -> float:
    """The total GiB of optimizer ``name`` under ``report``'s settings with ``changes``."""
    settings = {"seq_len": report.seq_len, "batch": report.batch, "precision": report.precision,
                "checkpointing": report.checkpointing, "flash": report.flash, "headroom": report.headroom, **changes}
    return fit_report(report.model, report.gpu_gib, optimizers=[name], **settings).rows[0]["total_gib"]


def why_not(report: FitReport, row: dict[str, Any]) -> str:
    """For a row that does not fit: how much it needs, which term is largest, and what would make it fit:
    each single change of the settings that does (with the total it gives), else the GPU memory it needs
    and over how many GPUs of this size FSDP2 would have to shard weights, gradients and state."""
    terms = {"weights": row["weights_gib"], "gradients": row["gradients_gib"], "optimizer state": row["state_gib"],
             "activations": row["activations_gib"]}
    largest = max(terms, key=terms.get)
    static = row["weights_gib"] + row["gradients_gib"] + row["state_gib"]
    name = row["optimizer"]
    text = (f"needs {row['total_gib']:.2f} GiB, {row['total_gib'] - report.budget_gib:.2f} over; largest: {largest} "
            f"{terms[largest]:.2f} GiB")
    candidates: list[tuple[str, dict[str, Any]]] = []
    if not report.checkpointing:
        candidates.append(("--checkpointing", {"checkpointing": True}))
    if report.batch > 1 and row["max_batch"] >= 1:
        candidates.append((f"--batch {row['max_batch']}", {"batch": row["max_batch"]}))
    seq = report.seq_len // 2
    while seq >= 128:  # the longest sequence that fits, halving
        if _total_with(report, name, seq_len=seq) <= report.budget_gib:
            candidates.append((f"--seq-len {seq}", {"seq_len": seq}))
            break
        seq //= 2
    if not report.flash:
        candidates.append(("sdpa attention (drop --eager-attention)", {"flash": True}))
    if report.precision != "bf16":
        candidates.append(("--precision bf16", {"precision": "bf16"}))
    fixes = []
    for flag, changes in candidates:
        total = _total_with(report, name, **changes)
        if total <= report.budget_gib:
            fixes.append(f"{flag} ({total:.2f} GiB)")
    if fixes:
        return f"{text}. Fits with " + " or ".join(fixes)
    need = row["total_gib"] / (1 - report.headroom)
    if static >= report.budget_gib:
        why = f"weights + gradients + state alone are {static:.2f} GiB, over the {report.budget_gib:.2f} usable"
    else:
        why = "no single change of the settings is enough"
    act = row["activations_gib"]
    if report.budget_gib > act:
        shards = math.ceil(static / (report.budget_gib - act))
        shard = f"; or FSDP2 over {shards} GPUs of {report.gpu_gib:g} GiB (weights, gradients and state split"
        if not report.checkpointing:
            act_ckpt = _total_with(report, name, checkpointing=True) - static
            fewer = math.ceil(static / (report.budget_gib - act_ckpt)) if report.budget_gib > act_ckpt else shards
            shard += f"; {fewer} with --checkpointing" if fewer < shards else ""
        shard += ")"
    else:
        shard = "; activations alone exceed one GPU: cut --batch/--seq-len or add --checkpointing"
    return f"{text}. {why}: it needs a GPU with {need:.1f} GiB at this headroom{shard}"


def matching_memory_row(name: str, options: dict[str, Any]) -> str | None:
    """The ``slimopt memory`` row that counts optimizer ``name`` with these options (``param_bytes`` aside:
    that table is for fp32 parameters, but for AdamW's bf16 row), and what differs, e.g.
    ``"microadam (there param_bytes=4)"``; None if no row does."""
    from .formulas import table

    found = None
    for label, table_row in table().items():
        if table_row.optimizer != name:
            continue
        _, defaults = formula(table_row.optimizer)
        row_options = {"param_bytes": 4, **defaults, **table_row.options}
        if name == "galore":
            row_options["rank"] = options.get("rank")
        if row_options == options:
            return label
        others = {k: v for k, v in row_options.items() if k != "param_bytes"}
        if found is None and others == {k: v for k, v in options.items() if k != "param_bytes"}:
            found = f"{label} (there param_bytes={row_options['param_bytes']})"
    return found


# ---------------------------------------------------------------------------------------------------------
# command line


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--model", required=True, metavar="NAME|PATH",
                        help=f"published model ({', '.join(MODELS)}), or a model's config.json or a folder with one "
                             "(LLaMA/Mistral/Qwen2/Qwen3, GPT-2, BERT, OPT)")
    parser.add_argument("--gpu-mem", type=float, required=True, metavar="GiB",
                        help="GPU memory in GiB (2^30 bytes; an '80 GB' H100 has about 79.2)")
    parser.add_argument("--seq-len", type=int, default=2048, help="tokens per sequence (default 2048)")
    parser.add_argument("--batch", type=int, default=1, help="sequences per micro-batch (default 1)")
    parser.add_argument("--precision", choices=PRECISIONS, default="amp",
                        help="amp: fp32 weights, bf16 autocast (default); bf16: everything bf16; fp32")
    parser.add_argument("--checkpointing", action="store_true", help="activation checkpointing per layer")
    parser.add_argument("--eager-attention", action="store_true",
                        help="attention that keeps the softmax matrix (default: sdpa/flash)")
    parser.add_argument("--headroom", type=float, default=0.1,
                        help="fraction of the GPU left for the CUDA context, fragmentation, workspaces (0.1)")
    parser.add_argument("--optimizer", action="append", metavar="NAME",
                        help="restrict to these (repeatable): " + ", ".join(fit_candidates()))
    parser.add_argument("--json", action="store_true", help="print machine-readable JSON")


def _format(report: FitReport) -> str:
    header = ("optimizer", "weights", "grads", "state", "activations", "total", "fits", "max batch")
    lines = [header]
    for r in report.rows:
        lines.append((r["optimizer"] + ("" if r["in_slimopt"] else " *"), f"{r['weights_gib']:.2f}",
                      f"{r['gradients_gib']:.2f}", f"{r['state_gib']:.2f}", f"{r['activations_gib']:.2f}",
                      f"{r['total_gib']:.2f}", "yes" if r["fits"] else "no", str(r["max_batch"])))
    widths = [max(len(line[i]) for line in lines) for i in range(len(header))]
    out = [f"{report.model}: {report.params:,} parameters; seq {report.seq_len} x batch {report.batch}, "
           f"{report.precision}{', activation checkpointing' if report.checkpointing else ''}",
           f"GPU {report.gpu_gib:g} GiB, usable {report.budget_gib:.2f} GiB after headroom; all columns GiB "
           "(2^30 bytes)"]
    for i, line in enumerate(lines):
        out.append("  ".join(c.ljust(w) if j == 0 else c.rjust(w) for j, (c, w) in enumerate(zip(line, widths))))
        if i == 0:
            out.append("  ".join("-" * w for w in widths))
    out.append("* baseline for comparison, not part of slimopt. 'max batch': largest micro-batch that fits.")
    param_bytes = report.rows[0]["options"]["param_bytes"] if report.rows else 4
    out.append(f"settings of each state formula: the class defaults, param_bytes={param_bytes} ({report.precision} "
               "parameters); the `slimopt memory` row with the same settings:")
    for r in report.rows:
        settings = ", ".join(f"{k}={v}" for k, v in r["options"].items())
        same = matching_memory_row(r["optimizer"], r["options"])
        out.append(f"  {r['optimizer']}: {settings}" + (f"  [memory row {same}]" if same else ""))
    misfits = [r for r in report.rows if not r["fits"]]
    fitting = [r["optimizer"] for r in report.rows if r["fits"]]
    if misfits:
        out.append("does not fit:")
        for r in misfits:
            out.append(textwrap.fill(f"{r['optimizer']}: {why_not(report, r)}", width=100, initial_indent="  ",
                                     subsequent_indent="    "))
        if not fitting:
            best = min(report.rows, key=lambda r: r["total_gib"])
            out.append(f"none fits; the smallest total is {best['optimizer']}'s, {best['total_gib']:.2f} GiB")
    out.append("Estimate: total = weights + grads + state + activations; the measured peak is usually a bit lower.")
    return "\n".join(out)


def run(args: argparse.Namespace) -> int:
    try:
        result = fit_report(args.model, args.gpu_mem, seq_len=args.seq_len, batch=args.batch, precision=args.precision,
                      checkpointing=args.checkpointing, flash=not args.eager_attention, headroom=args.headroom,
                      optimizers=args.optimizer)
    except (KeyError, ValueError) as exc:
        print(f"slimopt plan: {exc.args[0] if exc.args else exc}", file=sys.stderr)
        return 2
    print(json.dumps(result.as_dict(), indent=1) if args.json else _format(result))
    return 0
