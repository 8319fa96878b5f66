"""Lightning and Accelerate drive every optimizer exactly like a hand-written loop.

* Lightning's automatic optimisation calls ``optimizer.step(closure)``; the closure runs the training
  step and backward. An optimizer that ignores the closure trains nothing; one that runs it without
  autograd fails. The run must equal a manual closure loop bit for bit.
* Accelerate's ``prepare`` wraps the optimizer; under ``accumulate`` its ``step`` is a no-op until the
  last micro-batch. Two accumulated micro-batches must give the same bits as one manual step on the
  summed (halved) gradients, and the skipped calls must leave the state alone (step counters count
  real steps only).
"""

from __future__ import annotations

import warnings

import pytest
import torch

import slimopt
from slimopt.registry import spec
from test_conformance import ToyModel, loss_fn, toy_data

NAMES = slimopt.get_supported_optimizers()



def build(name: str):
    torch.manual_seed(0)
    model = ToyModel()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        opt = slimopt.create_optimizer(model, name, lr=spec(name).example_lr)
    return model, opt


def manual_closure_run(name: str, steps: int):
    model, opt = build(name)
    data = toy_data()

    def closure():
        opt.zero_grad()
        loss = loss_fn(model, data)
        loss.backward()
        return loss

    losses = [float(opt.step(closure)) for _ in range(steps)]
    return model, losses


# -- Lightning ----------------------------------------------------------------------------------------


@pytest.mark.parametrize("name", NAMES)
def test_lightning_automatic_optimisation_equals_a_manual_closure_loop(name):
    lightning = pytest.importorskip("lightning")

    class Module(lightning.LightningModule):
        def __init__(self):
            super().__init__()
            self.net, self.opt = build(name)
            self.losses = []

        def training_step(self, batch, batch_idx):
            tokens, x, target = (t.squeeze(0) for t in batch)
            loss = loss_fn(self.net, (tokens, x, target))
            self.losses.append(float(loss))
            return loss

        def configure_optimizers(self):
            return self.opt  # built from self.net by slimopt.create_optimizer

    tokens, x, target = toy_data()
    dataset = torch.utils.data.TensorDataset(tokens[None], x[None], target[None])  # one full batch per step
    loader = torch.utils.data.DataLoader(dataset, batch_size=1)
    module = Module()
    trainer = lightning.Trainer(max_steps=4, accelerator="cpu", devices=1, logger=False, enable_checkpointing=False,
                                enable_progress_bar=False, enable_model_summary=False, max_epochs=-1)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # "the dataloader does not have many workers", ...
        trainer.fit(module, loader)

    reference, losses = manual_closure_run(name, steps=4)
    assert module.losses == losses
    for (n, a), b in zip(module.net.named_parameters(), reference.parameters()):
        assert torch.equal(a, b), f"{name}: {n}"
    assert losses[-1] < losses[0]


# -- Accelerate ---------------------------------------------------------------------------------------


@pytest.fixture
def fresh_accelerate_state():
    accelerate_state = pytest.importorskip("accelerate.state")
    accelerate_state.AcceleratorState._reset_state(True)
    accelerate_state.GradientState._reset_state()
    yield
    accelerate_state.AcceleratorState._reset_state(True)
    accelerate_state.GradientState._reset_state()


def _micro_batches():
    tokens, x, target = toy_data(n=64)
    return [(tokens[i:i + 16], x[i:i + 16], target[i:i + 16]) for i in range(0, 64, 16)]


@pytest.mark.parametrize("name", NAMES)
def test_accelerate_gradient_accumulation_skips_steps_and_matches_manual(name, fresh_accelerate_state):
    import accelerate

    micro = _micro_batches()
    accelerator = accelerate.Accelerator(cpu=True, gradient_accumulation_steps=2)
    model, opt = build(name)
    model, opt = accelerator.prepare(model, opt)
    inner = opt.optimizer
    counters = []
    for batch in micro:
        with accelerator.accumulate(model):
            accelerator.backward(loss_fn(model, batch))
            opt.step()
            opt.zero_grad()
        counters.append([int(s["step"]) for s in inner.state.values() if "step" in s])
    # Micro-batch 1: step skipped, no state yet; 2: first real step; 3: skipped; 4: second step.
    assert counters[0] == []
    assert set(counters[1]) <= {1} and set(counters[2]) <= {1} and set(counters[3]) <= {2}

    reference, ref_opt = build(name)
    for first, second in (micro[:2], micro[2:]):
        ref_opt.zero_grad()
        (loss_fn(reference, first) / 2).backward()
        (loss_fn(reference, second) / 2).backward()
        ref_opt.step()
    for (n, a), b in zip(accelerator.unwrap_model(model).named_parameters(), reference.parameters()):
        assert torch.equal(a, b), f"{name}: {n}"
