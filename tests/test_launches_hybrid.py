"""Launches per step of SinkGD and SWAN, counted on CPU: every aten op one step dispatches.

The model has the tensor layout of the harness's 1b preset (24 layers, 219 tensors: per layer q, k, v, o,
gate, up, down and two norms; the embedding, the final norm, the head) at tiny widths, as
``shared/tools/launches.py`` builds it; its counts are what this test asserts. On a GPU each counted op is
a kernel launch or a view (which launches nothing); the multi-tensor ops (``_foreach_*``, fused AdamW)
are one launch per a few hundred tensors there. The budget of the issue: <= 150 per step for each.

Before the stacked matrix updates: SinkGD 11,500, SWAN 15,796 (one op sequence per matrix, a 4-op
finite check and a step counter add per tensor).
"""

from __future__ import annotations

import dataclasses

import pytest
import torch
from torch.utils._python_dispatch import TorchDispatchMode

import slimopt
from slimopt.bench.model import PRESETS, LlamaDecoder

BUDGET = 150
NOT_LAUNCHES = (torch.ops.aten.detach.default, torch.ops.prim.device.default)  # as launches.py
HOST_READS = ("aten._local_scalar_dense", "aten.item")


class Ops(TorchDispatchMode):
    def __init__(self) -> None:
        super().__init__()
        self.names: list[str] = []

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        if func not in NOT_LAUNCHES:
            self.names.append(str(func))
        return func(*args, **(kwargs or {}))


def model(layers: int = 24) -> LlamaDecoder:
    cfg = dataclasses.replace(PRESETS["1b"], vocab_size=512, hidden_size=64, intermediate_size=172,
                              num_attention_heads=4, num_key_value_heads=4, head_dim=16, num_hidden_layers=layers)
    torch.manual_seed(0)
    return LlamaDecoder(cfg)


def ops_of_one_step(name: str, layers: int = 24, **kwargs) -> list[str]:
    m = model(layers)
    for p in m.parameters():
        p.grad = torch.randn_like(p) * 1e-3
    opt = slimopt.create_optimizer(m, name, **{"lr": 1e-3, **kwargs})
    opt.step()  # state and work buffers are made in the first steps
    opt.step()
    counter = Ops()
    with counter:
        opt.step()
    return counter.names


@pytest.mark.parametrize("name", ["sinkgd", "swan"])
def test_launches_per_step_within_budget(name):
    m = model()
    assert sum(1 for _ in m.parameters()) == 219
    names = ops_of_one_step(name)
    assert len(names) <= BUDGET, f"{name}: {len(names)} launches per step (budget {BUDGET})"


@pytest.mark.parametrize("name", ["sinkgd", "swan"])
def test_launches_do_not_grow_with_depth(name):
    """Per shape, not per tensor: 4 layers and 24 take the same number of launches."""
    assert len(ops_of_one_step(name, layers=4)) == len(ops_of_one_step(name, layers=24))


@pytest.mark.parametrize("name", ["sinkgd", "swan"])
def test_skip_policy_step_reads_nothing_back(name, monkeypatch):
    """nonfinite="skip" and a tensor lr: no value goes to the host in a step (what a CUDA graph needs)."""
    def refuse(*args, **kwargs):
        raise AssertionError("a host read in the step")

    m = model(layers=2)
    for p in m.parameters():
        p.grad = torch.randn_like(p) * 1e-3
    opt = slimopt.create_optimizer(m, name, lr=torch.tensor(1e-3), weight_decay=0.1, nonfinite="skip")
    opt.step()
    opt.step()
    for method in ("item", "tolist", "__bool__", "__float__", "__int__"):
        monkeypatch.setattr(torch.Tensor, method, refuse)
    counter = Ops()
    with counter:
        opt.step()
    monkeypatch.undo()
    assert not [n for n in counter.names if n.startswith(HOST_READS)]
    assert len(counter.names) <= BUDGET + 20  # weight decay and the device-side flags cost a few more


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
@pytest.mark.parametrize("name", ["sinkgd", "swan"])
def test_step_is_captured_by_a_cuda_graph(name):
    """With every group on "skip" and the lr a tensor on the device, a step replays from a CUDA graph and
    gives what the same steps give eagerly."""
    torch.manual_seed(0)
    models = [model(layers=2).cuda() for _ in range(2)]
    models[1].load_state_dict(models[0].state_dict())
    opts = [slimopt.create_optimizer(mm, name, lr=torch.tensor(1e-3, device="cuda"), weight_decay=0.1,
                                     nonfinite="skip") for mm in models]
    grads = [[torch.randn_like(p) * 1e-3 for p in models[0].parameters()] for _ in range(5)]

    def load(mm, i):
        for p, g in zip(mm.parameters(), grads[i]):
            if p.grad is None:
                p.grad = g.clone()
            else:
                p.grad.copy_(g)

    side = torch.cuda.Stream()
    side.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(side):
        for i in range(2):  # warm-up: state, work buffers
            load(models[0], i)
            opts[0].step()
    torch.cuda.current_stream().wait_stream(side)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        opts[0].step()
    for i in range(2):
        load(models[1], i)
        opts[1].step()
    for i in range(2, 5):
        load(models[0], i)
        graph.replay()
        load(models[1], i)
        opts[1].step()
    torch.cuda.synchronize()
    for a, b in zip(models[0].parameters(), models[1].parameters()):
        torch.testing.assert_close(a, b)
