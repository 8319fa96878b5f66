"""The conformance suite: every registered optimizer must pass all of this.

Registering a name in ``slimopt.registry`` is all it takes to be tested here. Each test builds its
optimizer through ``slimopt.create_optimizer`` on a small model whose parameter names look like a
transformer's (so model-aware optimizers route them as they would in real use), at the registry's
``example_lr``. The toy Lion of ``tests/toy_lion.py``, added as docs/architecture.md says, runs every test
too, registered only while its own cases run (``tests/test_add_an_optimizer.py`` holds it to that).
"""

from __future__ import annotations

import copy
import io
from dataclasses import dataclass

import pytest
import torch
from torch import nn

import slimopt
import toy_lion
from slimopt.registry import register, spec, unregister

TOY = toy_lion.SPEC.name
NAMES = [*slimopt.get_supported_optimizers(), TOY]


@pytest.fixture(autouse=True)
def _toy_registered_for_its_cases(request):
    """The toy is in the registry while a case of its own runs, and only then."""
    callspec = getattr(request.node, "callspec", None)
    if callspec is None or callspec.params.get("name") != TOY:
        yield
        return
    register(toy_lion.SPEC)
    try:
        yield
    finally:
        unregister(TOY)


@dataclass
class ToyConfig:
    vocab_size: int = 32
    hidden_size: int = 16
    num_attention_heads: int = 2
    num_key_value_heads: int = 2
    head_dim: int = 8
    intermediate_size: int = 24


class ToyAttention(nn.Module):
    def __init__(self, c: ToyConfig):
        super().__init__()
        self.q_proj = nn.Linear(c.hidden_size, c.num_attention_heads * c.head_dim, bias=False)
        self.k_proj = nn.Linear(c.hidden_size, c.num_key_value_heads * c.head_dim, bias=False)
        self.v_proj = nn.Linear(c.hidden_size, c.num_key_value_heads * c.head_dim, bias=False)
        self.o_proj = nn.Linear(c.num_attention_heads * c.head_dim, c.hidden_size, bias=False)


class ToyMLP(nn.Module):
    def __init__(self, c: ToyConfig):
        super().__init__()
        self.up_proj = nn.Linear(c.hidden_size, c.intermediate_size, bias=True)
        self.down_proj = nn.Linear(c.intermediate_size, c.hidden_size, bias=True)


class ToyBlock(nn.Module):
    def __init__(self, c: ToyConfig):
        super().__init__()
        self.self_attn = ToyAttention(c)
        self.mlp = ToyMLP(c)
        self.input_layernorm = nn.LayerNorm(c.hidden_size)


class ToyModel(nn.Module):
    """Regression model with LLaMA-style names: a token embedding plus continuous features, one
    attention-shaped block (plain projections, no softmax: the point is the parameter shapes), an MLP,
    a norm, biases and a head. Small enough for hundreds of steps in a second."""

    def __init__(self, c: ToyConfig | None = None):
        super().__init__()
        self.config = c = c or ToyConfig()
        self.embed_tokens = nn.Embedding(c.vocab_size, c.hidden_size)
        self.layers = nn.ModuleList([ToyBlock(c)])
        self.norm = nn.LayerNorm(c.hidden_size)
        self.lm_head = nn.Linear(c.hidden_size, 1, bias=False)

    def forward(self, tokens: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
        h = self.embed_tokens(tokens) + x
        block = self.layers[0]
        a = block.input_layernorm(h)
        attn = block.self_attn
        q, k, v = attn.q_proj(a), attn.k_proj(a), attn.v_proj(a)
        h = h + attn.o_proj(torch.tanh(q * k) + v)
        h = h + block.mlp.down_proj(torch.tanh(block.mlp.up_proj(h)))
        return self.lm_head(self.norm(h)).squeeze(-1)


def toy_data(n: int = 64, dtype: torch.dtype = torch.float32, seed: int = 0):
    g = torch.Generator().manual_seed(seed)
    c = ToyConfig()
    tokens = torch.randint(0, c.vocab_size, (n,), generator=g)
    x = torch.randn(n, c.hidden_size, generator=g)
    target = torch.sin(x[:, :4].sum(-1)) + 0.1 * (tokens % 5).float()
    return tokens, x.to(dtype), target.to(dtype)


def make(name: str, dtype: torch.dtype = torch.float32, seed: int = 0, **kwargs):
    torch.manual_seed(seed)
    model = ToyModel().to(dtype)
    opt = slimopt.create_optimizer(model, name, lr=kwargs.pop("lr", spec(name).example_lr), **kwargs)
    return model, opt


def loss_fn(model, data):
    tokens, x, target = data
    return (model(tokens, x).float() - target.float()).pow(2).mean()


def train(model, opt, data, steps: int, scheduler=None):
    losses = []
    for _ in range(steps):
        opt.zero_grad(set_to_none=True)
        loss = loss_fn(model, data)
        loss.backward()
        opt.step()
        if scheduler is not None:
            scheduler.step()
        losses.append(loss.item())
    return losses


def params_of(model):
    return [p.detach().clone() for p in model.parameters()]


def fill_grads(model, value_fn):
    for p in model.parameters():
        p.grad = value_fn(p)


def state_bytes_of(sd) -> bytes:
    buf = io.BytesIO()
    torch.save(sd, buf)
    return buf.getvalue()


# --------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["fp32", "bf16"])
@pytest.mark.parametrize("name", NAMES)
def test_toy_regression_converges(name, dtype):
    model, opt = make(name, dtype)
    data = toy_data(dtype=dtype)
    losses = train(model, opt, data, steps=300)
    assert all(torch.isfinite(torch.tensor(losses)))
    # A working optimizer at its example lr cuts the loss well below half in 300 steps; a broken update
    # (wrong sign, no-op, exploding) does not.
    assert min(losses[-10:]) < 0.4 * losses[0], (losses[0], losses[-10:])


@pytest.mark.parametrize("name", NAMES)
def test_closure_runs_with_grad_and_returns_loss(name):
    model, opt = make(name)
    data = toy_data()
    calls = []

    def closure():
        calls.append(torch.is_grad_enabled())
        opt.zero_grad()
        loss = loss_fn(model, data)
        loss.backward()
        return loss

    with torch.no_grad():  # the closure must still get autograd
        loss = opt.step(closure)
    assert calls == [True]
    assert isinstance(loss, torch.Tensor) and torch.isfinite(loss)


@pytest.mark.parametrize("name", NAMES)
def test_missing_grads_frozen_params_and_empty_groups_are_noops(name):
    model, opt = make(name)
    model.layers[0].mlp.up_proj.weight.requires_grad_(False)
    opt.add_param_group({"params": []})
    before = params_of(model)
    opt.step()  # no gradients at all
    assert all(torch.equal(a, b) for a, b in zip(before, params_of(model)))
    assert len(opt.state) == 0
    # Gradients on some tensors only: the others keep their values and get no state.
    loss_fn(model, toy_data()).backward()
    model.embed_tokens.weight.grad = None
    opt.step()
    after = params_of(model)
    names = [n for n, _ in model.named_parameters()]
    for n, a, b in zip(names, before, after):
        if n in ("embed_tokens.weight", "layers.0.mlp.up_proj.weight"):
            assert torch.equal(a, b), n
    assert model.embed_tokens.weight not in opt.state or not opt.state[model.embed_tokens.weight]


@pytest.mark.parametrize("name", NAMES)
def test_zero_gradients_leave_params_unchanged(name):
    model, opt = make(name)
    before = params_of(model)
    for _ in range(3):
        fill_grads(model, torch.zeros_like)
        opt.step()
    for a, b in zip(before, params_of(model)):
        assert torch.isfinite(b).all()
        assert torch.equal(a, b)


@pytest.mark.parametrize("name", NAMES)
def test_add_param_group_after_steps(name):
    model, opt = make(name)
    extra = nn.Parameter(torch.randn(4, 4))
    data = toy_data()
    train(model, opt, data, steps=3)
    opt.add_param_group({"params": [extra]})
    before = extra.detach().clone()
    for _ in range(2):
        opt.zero_grad()
        loss = loss_fn(model, data) + (extra**2).sum()
        loss.backward()
        opt.step()
    assert not torch.equal(before, extra)
    assert (extra**2).sum() < (before**2).sum()


def _grouped(name, lr_b, wd_b, seed=0):
    """Same model, built with the class's own constructor from named param groups: the MLP in a second
    group with its own lr and weight decay."""
    torch.manual_seed(seed)
    model = ToyModel()
    mlp = [(n, p) for n, p in model.named_parameters() if ".mlp." in n]
    rest = [(n, p) for n, p in model.named_parameters() if ".mlp." not in n]
    cls = slimopt.load_optimizer(name)
    opt = cls([{"params": rest}, {"params": mlp, "lr": lr_b, "weight_decay": wd_b}], lr=spec(name).example_lr)
    return model, opt


@pytest.mark.parametrize("name", NAMES)
def test_two_groups_with_their_own_lr_and_weight_decay(name):
    data = toy_data()
    m0, o0 = _grouped(name, lr_b=0.0, wd_b=0.0)
    train(m0, o0, data, steps=3)
    mlp0 = [p.detach().clone() for p in m0.layers[0].mlp.parameters()]
    torch.manual_seed(0)
    init = ToyModel()
    # lr = 0 in the second group: its tensors never move, the rest do.
    for a, b in zip(init.layers[0].mlp.parameters(), mlp0):
        assert torch.equal(a, b)
    assert not torch.equal(init.lm_head.weight, m0.lm_head.weight)
    # Weight decay only in the second group changes only the second group's tensors. Fixed gradients,
    # not a training loss, so the first group's inputs cannot drift with the second group's weights.
    m1, o1 = _grouped(name, lr_b=spec(name).example_lr, wd_b=0.0)
    m2, o2 = _grouped(name, lr_b=spec(name).example_lr, wd_b=0.5)
    for model, opt in ((m1, o1), (m2, o2)):
        gen = torch.Generator().manual_seed(1)
        for _ in range(3):
            fill_grads(model, lambda p, gen=gen: torch.randn(p.shape, generator=gen))
            opt.step()
    for (n, a), b in zip(m1.named_parameters(), m2.parameters()):
        if ".mlp." not in n:
            assert torch.equal(a, b), n
    w1, w2 = m1.layers[0].mlp.up_proj.weight, m2.layers[0].mlp.up_proj.weight
    assert not torch.equal(w1, w2)
    assert w2.norm() < w1.norm()


@pytest.mark.parametrize("name", NAMES)
def test_lr_scheduler_takes_effect(name):
    model, opt = make(name)
    data = toy_data()
    scheduler = torch.optim.lr_scheduler.LambdaLR(opt, lambda step: 1.0 if step < 2 else 0.0)
    train(model, opt, data, steps=2, scheduler=scheduler)
    assert all(g["lr"] == 0.0 for g in opt.param_groups)
    frozen = params_of(model)
    train(model, opt, data, steps=2, scheduler=scheduler)
    assert all(torch.equal(a, b) for a, b in zip(frozen, params_of(model)))


@pytest.mark.parametrize("name", NAMES)
def test_tensor_lr_matches_float_lr(name):
    data = toy_data()
    m1, o1 = make(name)
    m2, o2 = make(name, lr=torch.tensor(spec(name).example_lr))
    train(m1, o1, data, steps=3)
    train(m2, o2, data, steps=3)
    for a, b in zip(params_of(m1), params_of(m2)):
        torch.testing.assert_close(a, b, rtol=1e-6, atol=1e-7)


@pytest.mark.parametrize("name", NAMES)
@pytest.mark.parametrize("kwargs, argument", [
    ({"lr": -1.0}, "lr|learning rate"),  # torch's own AdamW says "learning rate"
    ({"lr": float("nan")}, "lr|learning rate"),
    ({"weight_decay": -0.1}, "weight_decay"),
])
def test_invalid_hyperparameters_raise(name, kwargs, argument):
    model = ToyModel()
    kwargs = dict(kwargs)
    lr = kwargs.pop("lr", 1e-3)
    with pytest.raises(ValueError, match=argument):
        slimopt.create_optimizer(model, name, lr=lr, **kwargs)


@pytest.mark.parametrize("name", [n for n in NAMES if n != "adamw"])
def test_sparse_and_complex_gradients_raise_naming_the_parameter(name):
    model, opt = make(name)
    fill_grads(model, torch.zeros_like)
    w = model.layers[0].mlp.up_proj.weight
    w.grad = torch.zeros_like(w).to_sparse()
    with pytest.raises(RuntimeError, match="sparse.*layers.0.mlp.up_proj.weight"):
        opt.step()
    model, opt = make(name)
    c = nn.Parameter(torch.zeros(3, dtype=torch.complex64))
    opt.add_param_group({"params": [("complex_param", c)]} if "param_names" in opt.param_groups[0]
                        else {"params": [c]})
    c.grad = torch.ones_like(c)
    with pytest.raises(RuntimeError, match="complex"):
        opt.step()


@pytest.mark.parametrize("name", ["adamw"])
def test_torch_adamw_rejects_sparse(name):
    model, opt = make(name)
    w = model.lm_head.weight
    w.grad = torch.zeros_like(w).to_sparse()
    with pytest.raises(RuntimeError, match="sparse"):
        opt.step()


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["fp32", "bf16"])
@pytest.mark.parametrize("name", NAMES)
def test_save_load_resume_is_bit_identical(name, dtype):
    data = toy_data(dtype=dtype)
    model, opt = make(name, dtype)
    train(model, opt, data, steps=4)
    # Checkpoint: weights + optimizer state through a real torch.save / torch.load(weights_only=True).
    buf = io.BytesIO()
    torch.save({"model": model.state_dict(), "optim": opt.state_dict()}, buf)
    saved_dtypes = {(i, k): v.dtype for i, s in opt.state_dict()["state"].items()
                    for k, v in s.items() if torch.is_tensor(v)}
    train(model, opt, data, steps=4)  # the uninterrupted run

    buf.seek(0)
    ckpt = torch.load(buf, weights_only=True)
    model2, opt2 = make(name, dtype, seed=123)  # different init: everything must come from the checkpoint
    model2.load_state_dict(ckpt["model"])
    opt2.load_state_dict(ckpt["optim"])
    loaded_dtypes = {(i, k): v.dtype for i, s in opt2.state_dict()["state"].items()
                     for k, v in s.items() if torch.is_tensor(v)}
    assert loaded_dtypes == saved_dtypes
    train(model2, opt2, data, steps=4)
    for (n, a), b in zip(model.named_parameters(), model2.parameters()):
        assert torch.equal(a, b), f"{name}: {n} differs after resume"
    assert state_bytes_of(opt.state_dict()) == state_bytes_of(opt2.state_dict())


@pytest.mark.parametrize("name", NAMES)
def test_state_dict_is_deterministic(name):
    data = toy_data()
    runs = []
    for _ in range(2):
        model, opt = make(name)
        train(model, opt, data, steps=3)
        runs.append(opt)
    first, second = (opt.state_dict() for opt in runs)
    assert first["param_groups"] == second["param_groups"]
    assert first["state"].keys() == second["state"].keys() and first["state"]
    for pid, entry in first["state"].items():
        assert entry.keys() == second["state"][pid].keys(), pid
        for key, value in entry.items():
            other = second["state"][pid][key]
            if torch.is_tensor(value):  # the same values, dtypes and shapes, bit for bit
                assert value.dtype == other.dtype and torch.equal(value, other), (name, pid, key)
            else:
                assert value == other, (name, pid, key)


@pytest.mark.parametrize("name", NAMES)
def test_load_state_dict_does_not_alias_the_checkpoint(name):
    data = toy_data()
    model, opt = make(name)
    train(model, opt, data, steps=2)
    sd = opt.state_dict()
    snapshot = copy.deepcopy(sd)
    opt2 = make(name)[1]
    opt2.load_state_dict(sd)
    train(model, opt2, data, steps=2)  # training on must not write into the loaded dict
    assert state_bytes_of(sd) == state_bytes_of(snapshot)


@pytest.mark.parametrize("name", NAMES)
def test_state_bytes_counts_state_tensors(name):
    model, opt = make(name)
    assert slimopt.state_bytes(opt) == 0
    train(model, opt, toy_data(), steps=1)
    expected = 0
    seen = set()
    for s in opt.state.values():
        for v in s.values():
            if torch.is_tensor(v) and v.untyped_storage().data_ptr() not in seen:
                seen.add(v.untyped_storage().data_ptr())
                expected += v.untyped_storage().nbytes()
    assert slimopt.state_bytes(opt) == expected > 0


@pytest.mark.parametrize("name", [n for n in NAMES if n != "adamw"])
def test_nonfinite_gradient_raises_under_raise_naming_the_parameter(name):
    model, opt = make(name, nonfinite="raise")
    loss_fn(model, toy_data()).backward()
    model.layers[0].mlp.up_proj.weight.grad[0, 0] = float("nan")
    before = params_of(model)
    with pytest.raises(FloatingPointError, match="layers.0.mlp.up_proj.weight"):
        opt.step()
    # Checked before any update: nothing moved and no state was created.
    assert all(torch.equal(a, b) for a, b in zip(before, params_of(model)))
    assert len(opt.state) == 0


@pytest.mark.parametrize("name", [n for n in NAMES if n != "adamw"])
@pytest.mark.parametrize("explicit", [True, False], ids=["skip", "default"])
def test_nonfinite_skip_leaves_that_tensor_and_its_state_untouched(name, explicit):
    """"skip" is the default (it decides on the device: no host sync in a GPU step)."""
    data = toy_data()
    model, opt = make(name, **({"nonfinite": "skip"} if explicit else {}))
    train(model, opt, data, steps=2)
    w = model.layers[0].mlp.up_proj.weight
    before_w = w.detach().clone()
    before_state = copy.deepcopy(opt.state[w])
    loss_fn(model, data).backward()
    w.grad[1, 2] = float("inf")
    other = model.lm_head.weight
    before_other = other.detach().clone()
    opt.step()
    assert torch.equal(w, before_w)
    assert state_bytes_of(opt.state[w]) == state_bytes_of(before_state)
    assert not torch.equal(other, before_other)  # the finite tensors still step
    assert opt.nonfinite_skips == 1  # the one tensor-step left alone, counted (read when logging)
