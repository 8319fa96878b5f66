"""Adam-mini's step on a GPU budget: few launches, no host sync, nothing that needs a device value.

Launches are counted as ``shared/tools/launches.py`` counts them: every aten op dispatched below Python
during one ``optimizer.step()`` (a ``TorchDispatchMode``; views and the optimizer's profiler marks count
too, ``detach`` does not), after two warm-up steps, on a model with the 1b preset's tensor layout (24
layers, 219 tensors) and tiny widths. The count is deterministic. Before the multi-tensor step it was
3,315 (5,711 CUDA kernels on an H200 at full width); torch's foreach AdamW takes 450, fused AdamW 4.

The number does not grow with the number of tensors, but it does with widths in one place: gradients
larger than ``CAT_MAX_NUMEL`` get a reduction each instead of sharing one (a copy would cost more than the
launch), so at the 1b preset's real widths each of the 169 matrices adds one op. On CUDA that torch path
would also run its final ``_foreach_addcmul_`` as one kernel per tensor (its per-block factors are
broadcasting views, which torch's fused multi-tensor kernels do not take); there the optimizer steps every
tensor whose blocks are runs of rows with three Triton launches instead (``slimopt.ops.block_moments_triton``),
and the last test holds that path's count: three launches and the skip counter's two ops, whatever the number
of tensors, nothing read back.
"""

from __future__ import annotations

import collections
import dataclasses

import pytest
import torch
from torch.utils._python_dispatch import TorchDispatchMode

import slimopt
from slimopt.bench.model import PRESETS, LlamaDecoder
from slimopt.ops.blockstats import block_adam_foreach, block_state_shape

BUDGET = 50  # launches per step (the target; measured 46 without weight decay)
NOT_COUNTED = (torch.ops.aten.detach.default, torch.ops.prim.device.default)  # as launches.py


class CountOps(TorchDispatchMode):
    def __init__(self) -> None:
        super().__init__()
        self.ops: collections.Counter[str] = collections.Counter()

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        if func not in NOT_COUNTED:
            self.ops[str(func)] += 1
        return func(*args, **(kwargs or {}))


def model_1b_layout() -> torch.nn.Module:
    """The 1b preset's tensor layout at tiny widths, built as launches.py builds it."""
    cfg = dataclasses.replace(PRESETS["1b"], vocab_size=512, hidden_size=64, intermediate_size=172,
                              num_attention_heads=4, num_key_value_heads=4, head_dim=16)
    torch.manual_seed(0)
    return LlamaDecoder(cfg)


@pytest.fixture(scope="module")
def model():
    m = model_1b_layout()
    assert sum(1 for _ in m.parameters()) == 219
    return m


def one_step_ops(model: torch.nn.Module, **kwargs) -> collections.Counter[str]:
    gen = torch.Generator().manual_seed(0)
    for p in model.parameters():
        p.grad = torch.randn(p.shape, generator=gen) * 1e-3
    opt = slimopt.create_optimizer(model, "adammini", **{"lr": 1e-3, **kwargs})
    opt.step()
    opt.step()
    counter = CountOps()
    with counter:
        opt.step()
    return counter.ops


@pytest.mark.parametrize("kwargs", [{}, {"weight_decay": 0.1}, {"weight_decay": 0.1, "lr": torch.tensor(1e-3)},
                                    {"nonfinite": "skip"}],
                         ids=["launches.py", "weight_decay", "tensor_lr", "skip"])
def test_a_step_fits_the_launch_budget(model, kwargs):
    ops = one_step_ops(model, **kwargs)
    assert sum(ops.values()) <= BUDGET, ops
    # g is reduced once per step: the non-finite check's block sums are the step's (2 runs of
    # concatenated matrices, one foreach norm for the 49 norm weights)
    assert ops["aten.linalg_vector_norm.default"] == 2 and ops["aten._foreach_norm.Scalar"] == 1, ops
    # no device value read on the host inside the step (the check's one transfer is a .tolist(), below)
    assert ops["aten._local_scalar_dense.default"] == 0, ops


def test_the_per_tensor_path_is_what_the_budget_replaces(model):
    ops = one_step_ops(model, foreach=False)
    assert sum(ops.values()) > 2000  # 3,315 when measured


def test_one_host_transfer_per_step_and_none_in_the_update(model, monkeypatch):
    # The step moves one value to the host: the groups' totals of g², for the non-finite policy (raise
    # must raise before anything changes). The update itself reads nothing back.
    transfers = []
    for name in ("tolist", "item", "__bool__", "__float__", "__int__", "cpu", "numpy"):
        original = getattr(torch.Tensor, name)

        def spy(self, *args, _original=original, _name=name, **kwargs):
            transfers.append(_name)
            return _original(self, *args, **kwargs)

        monkeypatch.setattr(torch.Tensor, name, spy)
    gen = torch.Generator().manual_seed(0)
    for p in model.parameters():
        p.grad = torch.randn(p.shape, generator=gen)
    opt = slimopt.create_optimizer(model, "adammini", lr=1e-3, weight_decay=0.1)
    opt.step()
    transfers.clear()
    opt.step()
    assert transfers == ["tolist"]
    transfers.clear()
    opt._skipped = set()
    with torch.no_grad():
        for group in opt.param_groups:
            opt.update_group(group)
    assert transfers == []


def test_the_update_runs_on_meta_tensors():
    # Meta tensors have shapes and no values: a step that ran here can neither read a value on the host
    # nor branch on one, which is what capturing it in a CUDA graph needs.
    layouts = [{"rule": "rows", "out_dim": 0, "n_blocks": 6, "unit": 1},
               {"rule": "heads", "out_dim": 0, "n_blocks": 2, "unit": 3},
               {"rule": "qkv", "out_dim": 1, "n_blocks": 3 + 4, "segments": [[0, 12, 4], [12, 4, 1]]},
               {"rule": "whole", "out_dim": 0, "n_blocks": 1},
               {"rule": "elementwise", "out_dim": 0, "n_blocks": 5}]
    shapes = [(6, 4), (6, 4), (5, 16), (4,), (5,)]
    with torch.device("meta"):
        params = [torch.empty(s) for s in shapes]
        grads = [torch.empty(s) for s in shapes]
        exp_avgs = [torch.empty(s) for s in shapes]
        exp_avg_sqs = [torch.empty(block_state_shape(lay, s)) for lay, s in zip(layouts, shapes)]
        steps = [torch.empty(()) for _ in shapes]
        lr = torch.empty(())
    block_adam_foreach(params, grads, exp_avgs, exp_avg_sqs, steps, layouts, lr=lr, beta1=0.9, beta2=0.95,
                      eps=1e-8, weight_decays=[0.1, 0.0, 0.1, 0.0, 0.1])


# -- the Triton path (what CUDA tensors take), forced on CPU tensors -------------------------------------------------


class _Counted:
    """A kernel whose launches (``kernel[grid](...)``) are counted and not run: the interpreter runs a kernel
    through torch ops of its own (copies of the arguments), which would be counted as the step's."""

    def __init__(self, launches, name):
        self.launches, self.name = launches, name

    def __getitem__(self, grid):
        self.launches[self.name] += 1
        return lambda *args, **kwargs: None


def _triton_step_counts(layers, monkeypatch):
    kernels = pytest.importorskip("slimopt.ops.block_moments_triton")
    if not kernels.triton_available():
        pytest.skip("needs Triton")
    cfg = dataclasses.replace(PRESETS["1b"], num_hidden_layers=layers, vocab_size=64, hidden_size=32,
                              intermediate_size=48, num_attention_heads=4, num_key_value_heads=4, head_dim=8)
    torch.manual_seed(0)
    model = LlamaDecoder(cfg)
    gen = torch.Generator().manual_seed(0)
    for p in model.parameters():
        p.grad = torch.randn(p.shape, generator=gen) * 1e-3
    opt = slimopt.create_optimizer(model, "adammini", lr=1e-3, weight_decay=0.1, backend="triton")
    opt.step()
    opt.step()
    launches: collections.Counter[str] = collections.Counter()
    for name in ("_row_sq_sums_kernel", "_block_second_moment_kernel", "_scaled_moment_update_kernel"):
        monkeypatch.setattr(kernels, name, _Counted(launches, name))
    counter = CountOps()
    with counter:
        opt.step()
    monkeypatch.undo()
    return sum(1 for _ in model.parameters()), launches, counter.ops


def test_the_triton_path_is_three_launches_and_two_ops_whatever_the_tensors(monkeypatch):
    # the 1b preset's layout (9 tensors a layer, every one on the Triton path) at tiny widths, 1 and 3 layers. Besides
    # torch's profiler marks, the only torch ops are the skip counter's (a sum of the flags and an add, on the
    # device): no host read (_local_scalar_dense), no table uploaded again in a steady step (no copy)
    for layers in (1, 3):
        n_tensors, launches, ops = _triton_step_counts(layers, monkeypatch)
        assert n_tensors == 9 * layers + 3
        assert launches == {"_row_sq_sums_kernel": 1, "_block_second_moment_kernel": 1,
                            "_scaled_moment_update_kernel": 1}, launches
        aten = {op: n for op, n in ops.items() if op.startswith("aten.")}
        assert aten == {"aten.sum.default": 1, "aten.add_.Tensor": 1}, ops
