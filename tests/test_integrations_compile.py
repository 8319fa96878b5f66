"""``torch.compile(optimizer.step)``: it traces, matches eager, and a scheduled tensor lr does not recompile.

The step is compiled with ``backend="eager"``: TorchDynamo captures the graphs and installs the guards
(which is where graph breaks and recompilations come from) without Inductor's code generation, which
takes minutes on a 2-core CPU and adds nothing to these two questions. The lr is a 0-d tensor that an
``LambdaLR`` changes every step (torch's schedulers ``fill_`` a tensor lr in place); a step that reads it
as a Python float would be re-traced for every new value.

MicroAdam's ``update_group`` is excluded from tracing (``torch.compiler.disable``): its compiled step
breaks the graph there and runs it eagerly, which must still equal eager and not recompile.
"""

from __future__ import annotations

import warnings

import pytest
import torch
from torch._dynamo.utils import counters

import slimopt
from slimopt.registry import spec

NAMES = slimopt.get_supported_optimizers()



def build(name: str):
    torch.manual_seed(0)
    params = [("layers.0.mlp.up_proj.weight", torch.nn.Parameter(torch.randn(8, 6))),
              ("layers.0.input_layernorm.weight", torch.nn.Parameter(torch.ones(6)))]
    cls = slimopt.load_optimizer(name)
    lr = torch.tensor(spec(name).example_lr)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        if cls.__module__.startswith("torch."):
            opt = cls([p for _, p in params], lr=lr)
        else:
            opt = cls(params, lr=lr)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda s: 1.0 / (1.0 + s))
    return [p for _, p in params], opt, sched


def grads(step: int, params):
    g = torch.Generator().manual_seed(step)
    for p in params:
        p.grad = torch.randn(p.shape, generator=g)


@pytest.mark.slow
@pytest.mark.parametrize("name", NAMES)
def test_compiled_step_matches_eager_and_scheduled_lr_does_not_recompile(name):
    torch._dynamo.reset()
    counters.clear()
    params, opt, sched = build(name)
    eager_params, eager_opt, eager_sched = build(name)
    compiled_step = torch.compile(opt.step, backend="eager")
    graphs = []
    for step in range(4):
        grads(step, params)
        grads(step, eager_params)
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            compiled_step()
        eager_opt.step()
        sched.step()
        eager_sched.step()
        graphs.append(counters["stats"]["unique_graphs"])
    assert isinstance(opt.param_groups[0]["lr"], torch.Tensor)  # the scheduler kept the tensor
    # Same math, so the same values; torch's AdamW picks another (foreach) implementation when traced,
    # so the last bits may differ: default float32 tolerances.
    for a, b in zip(params, eager_params):
        torch.testing.assert_close(a, b)
    # Steps 1-2 may compile (state is created lazily in step 1); steps 3-4 only change the lr.
    assert graphs[1] == graphs[3], f"{name}: graphs per step {graphs} (recompiled after an lr change)"
