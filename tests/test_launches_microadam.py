"""Launches per MicroAdam step on the Triton path: a constant, whatever the number of tensors.

Counted as ../shared/tools/launches.py counts them (issue 18): one step, after a first one that creates the
state, of a model with the tensor layout of the harness's 1b preset (embedding, head, final norm; per layer
four attention matrices, three MLP matrices, two norms) at tiny widths; every aten op dispatched below Python
(TorchDispatchMode), except those a Triton kernel runs inside its own launch under the interpreter, plus
every Triton kernel launch. The full 24-layer layout takes ~30 s a step under the interpreter, so the test
counts 1 and 2 layers (12 and 21 tensors, widths 32) and requires the same count for both: the group
launches take all tensors of a group at once. ``python ../shared/tools/launches.py microadam-triton``
counts the 24 layers (5 per step: 3 launches and torch.optim's 2 profiler ops; 4,606 before).
"""

from __future__ import annotations

import dataclasses

import pytest
import torch
from torch.utils._python_dispatch import TorchDispatchMode

triton = pytest.importorskip("triton")

import slimopt  # noqa: E402
import slimopt.ops.sparse_window_triton as kernels  # noqa: E402
from slimopt.bench.model import PRESETS, LlamaDecoder  # noqa: E402

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"
BUDGET = 60  # launches per step (issue 18); before the group launches: 4,606 on the 24-layer layout


class _Launches(TorchDispatchMode):
    """aten ops outside Triton kernels, and Triton kernel launches."""

    def __init__(self) -> None:
        super().__init__()
        self.aten, self.triton, self.inside = 0, 0, False

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        if not self.inside and func not in (torch.ops.aten.detach.default, torch.ops.prim.device.default):
            self.aten += 1
        return func(*args, **(kwargs or {}))

    def wrap(self, kernel, monkeypatch) -> None:
        run = kernel.run

        def counted(*args, **kwargs):
            if self.inside:
                return run(*args, **kwargs)
            self.triton += 1
            self.inside = True
            try:
                return run(*args, **kwargs)
            finally:
                self.inside = False

        monkeypatch.setattr(kernel, "run", counted)


def _count(layers: int, monkeypatch, **options) -> tuple[int, int, int]:
    cfg = dataclasses.replace(PRESETS["1b"], vocab_size=64, hidden_size=32, intermediate_size=64,
                              num_attention_heads=2, num_key_value_heads=2, head_dim=16, num_hidden_layers=layers)
    torch.manual_seed(0)
    model = LlamaDecoder(cfg).to(DEVICE)
    for p in model.parameters():
        p.grad = torch.randn_like(p) * 1e-3
    tensor_lr = options.pop("lr", None) == "tensor"
    opt = slimopt.create_optimizer(model, "microadam", lr=1e-3, backend="triton", **options)
    if tensor_lr:  # read by the kernel on the device
        opt.param_groups[0]["lr"] = torch.tensor(1e-3, device=DEVICE)
    opt.step()  # creates the state
    counter = _Launches()
    with monkeypatch.context() as patch:
        for name in dir(kernels):
            if name.endswith("_kernel"):
                counter.wrap(getattr(kernels, name), patch)
        with counter:
            opt.step()
    return counter.aten, counter.triton, sum(1 for _ in model.parameters())


@pytest.mark.parametrize("options", [{}, {"nonfinite": "skip", "weight_decay": 0.1, "lr": "tensor"}],
                         ids=["defaults", "skip-decay-tensor-lr"])
def test_launches_per_step_do_not_grow_with_the_tensors(options, monkeypatch):
    one = _count(1, monkeypatch, **dict(options))
    two = _count(2, monkeypatch, **dict(options))
    assert one[2] < two[2]  # 12 and 21 tensors
    assert one[:2] == two[:2], (one, two)
    aten, launched, _ = two
    assert launched == 3  # check, fused compression, window update
    assert aten + launched <= BUDGET, (aten, launched)
