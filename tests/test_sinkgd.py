"""SinkGD: the update against the paper's algorithm written out, routing, AdamW fallback, state."""

from __future__ import annotations

import math

import pytest
import torch
from torch import nn

import slimopt
from slimopt import SinkGD
from slimopt.bench.model import build_model
from slimopt.ops.normalize import sr_sinkhorn_reference
from slimopt.optim.hybrid import ADAMW, STATELESS

HIDDEN = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")


def tiny_llama():
    torch.manual_seed(0)
    return build_model("tiny")


def lm_loss(model, seed=0):
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(0, model.config.vocab_size, (2, 16), generator=g)
    logits = model(ids)
    return nn.functional.cross_entropy(logits[:, :-1].flatten(0, 1).float(), ids[:, 1:].flatten())


def naive_sinkgd_step(w, g, lr, scale, iters, weight_decay=0.0):
    """Algorithm 4 written out with the L-copies reference, in float64."""
    x = sr_sinkhorn_reference(g.double(), iters).double()
    return w.double() * (1 - lr * scale * weight_decay) - lr * scale * x


@pytest.mark.parametrize("shape", [(24, 40), (40, 24)], ids=["wide", "tall"])
def test_matrix_update_is_algorithm_4(shape):
    gen = torch.Generator().manual_seed(0)
    w = nn.Parameter(torch.randn(shape, generator=gen))
    opt = SinkGD([w], lr=0.1, iters=5, scale=0.5, weight_decay=0.2)
    for _ in range(3):
        w0 = w.detach().clone()
        w.grad = torch.randn(shape, generator=gen) * torch.rand(shape[0], 1, generator=gen) * 10
        opt.step()
        # fp32 against float64 of a unit-RMS update times 0.05: ~1e-6 absolute.
        torch.testing.assert_close(w.detach().double(), naive_sinkgd_step(w0, w.grad, 0.1, 0.5, 5, 0.2),
                                   rtol=0, atol=2e-6)
    assert len(opt.state) == 0  # stateless: not even a step counter


def test_update_has_entry_rms_one_times_step_size():
    w = nn.Parameter(torch.zeros(30, 50))
    w.grad = torch.randn(30, 50)
    SinkGD([w], lr=0.02, scale=0.05).step()
    # Last step normalises columns to sqrt(m): ||X||_F = sqrt(mn) exactly, so RMS(step) = lr * scale.
    torch.testing.assert_close(w.detach().square().mean().sqrt(), torch.tensor(1e-3), rtol=1e-5, atol=0)


def test_bf16_params_zero_rows_and_no_nan():
    w = nn.Parameter(torch.randn(16, 12).bfloat16())
    g = torch.randn(16, 12).bfloat16()
    g[2] = 0
    g[:, 7] = 0
    w0 = w.detach().clone()
    w.grad = g
    SinkGD([w], lr=0.1, scale=1.0).step()
    assert w.dtype == torch.bfloat16 and torch.isfinite(w).all()
    assert torch.equal(w[2], w0[2]) and torch.equal(w[:, 7], w0[:, 7])
    expected = (w0.double() - 0.1 * sr_sinkhorn_reference(g.float(), 5).double()).bfloat16()
    torch.testing.assert_close(w.detach(), expected, rtol=0, atol=2e-2)  # within one bf16 rounding


def test_from_model_routes_hidden_matrices_stateless_and_the_rest_to_adamw(capsys):
    model = tiny_llama()
    opt = slimopt.create_optimizer(model, "sinkgd", lr=0.02, print_plan=True)
    table = capsys.readouterr().out
    assert "embed_tokens.weight" in table and "stateless" in table
    routes = {n: g["update"] for g in opt.param_groups for n in g["param_names"]}
    assert set(routes) == {n for n, _ in model.named_parameters()}
    for name, update in routes.items():
        expected = STATELESS if any(h in name for h in HIDDEN) else ADAMW
        assert update == expected, name
    assert routes["embed_tokens.weight"] == routes["lm_head.weight"] == routes["norm.weight"] == ADAMW
    assert opt.plan is not None and "sinkgd/swan routing" in opt.plan.table()
    assert "elements stateless" in opt.routing_table()


def test_adamw_part_equals_torch_adamw_and_state_bytes_count_only_it():
    model = tiny_llama()
    opt = slimopt.create_optimizer(model, "sinkgd", lr=0.01, weight_decay=0.0, adamw_lr=3e-3,
                                   adamw_betas=(0.8, 0.95), adamw_eps=1e-7, adamw_weight_decay=0.1)
    adamw_names = [n for g in opt.param_groups if g["update"] == ADAMW for n in g["param_names"]]
    twin = {n: nn.Parameter(p.detach().clone()) for n, p in model.named_parameters() if n in adamw_names}
    # The fallback runs torch's fused AdamW kernel on CPU (1 ulp from the for-loop: tests/test_ops_adamw.py)
    ref = torch.optim.AdamW(list(twin.values()), lr=3e-3, betas=(0.8, 0.95), eps=1e-7, weight_decay=0.1,
                            fused=True)
    params = dict(model.named_parameters())
    for step in range(3):
        opt.zero_grad()
        lm_loss(model, seed=step).backward()
        for n, p in twin.items():
            p.grad = params[n].grad.clone()
        opt.step()
        ref.step()
    for n, p in twin.items():
        assert torch.equal(params[n].detach(), p.detach()), n
    adamw_numel = sum(p.numel() for p in twin.values())
    assert slimopt.state_bytes(opt) == 2 * 4 * adamw_numel + 4 * len(twin)  # m, v in fp32 + step counters
    for g in opt.param_groups:
        if g["update"] == STATELESS:
            assert all(p not in opt.state or not opt.state[p] for p in g["params"])


def test_marked_groups_and_auto_groups():
    gen = torch.Generator().manual_seed(1)
    a = nn.Parameter(torch.randn(8, 6, generator=gen))
    b = nn.Parameter(torch.randn(8, 6, generator=gen))
    c = nn.Parameter(torch.randn(6, generator=gen))
    opt = SinkGD([{"params": [a], "use_adamw": True}, {"params": [b, c]}], lr=0.01)
    updates = [(g["update"], len(g["params"])) for g in opt.param_groups]
    assert updates == [(ADAMW, 1), (STATELESS, 1), (ADAMW, 1)]  # the auto group split by shape
    opt2 = SinkGD([{"params": [a], "update": "stateless"}], lr=0.01)
    assert opt2.param_groups[0]["update"] == STATELESS
    with pytest.raises(ValueError, match="update"):
        SinkGD([{"params": [a], "update": "sgd"}])
    with pytest.raises(RuntimeError, match="needs a matrix"):
        opt3 = SinkGD([{"params": [c], "update": "stateless"}])
        c.grad = torch.ones_like(c)
        opt3.step()


def test_named_parameters_route_by_name_without_from_model():
    model = tiny_llama()
    opt = SinkGD(model.named_parameters(), lr=0.02)
    routes = {n: g["update"] for g in opt.param_groups for n in g["param_names"]}
    assert routes["embed_tokens.weight"] == ADAMW and routes["layers.0.mlp.up_proj.weight"] == STATELESS


def test_adamw_lr_defaults_to_the_group_lr_and_follows_schedulers():
    model = tiny_llama()
    opt = slimopt.create_optimizer(model, "sinkgd", lr=0.04)
    assert {g["lr"] for g in opt.param_groups} == {0.04}
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda s: 0.5)
    opt.step()  # no gradients: a no-op, but keeps the scheduler's order check quiet
    sched.step()
    assert {g["lr"] for g in opt.param_groups} == {0.02}


def test_conv_weights_as_matrices():
    torch.manual_seed(2)
    model = nn.Sequential(nn.Conv2d(3, 8, 3), nn.Flatten(), nn.LazyLinear(4))
    model(torch.randn(1, 3, 6, 6))
    default = SinkGD(model.named_parameters(), lr=0.1)
    assert [g["update"] for g in default.param_groups if any(p is model[0].weight for p in g["params"])] == [ADAMW]
    opt = SinkGD(model.named_parameters(), lr=0.1, scale=1.0, conv_as_matrix=True)
    w = model[0].weight
    assert [g["update"] for g in opt.param_groups if any(p is w for p in g["params"])] == [STATELESS]
    w0 = w.detach().clone()
    w.grad = torch.randn_like(w)
    opt.step()
    expected = w0.reshape(8, -1).double() - 0.1 * sr_sinkhorn_reference(w.grad.reshape(8, -1), 5).double()
    torch.testing.assert_close(w.detach().reshape(8, -1).double(), expected, rtol=0, atol=2e-6)


class Conv1D(nn.Module):
    """GPT-2's layer, by its class name: it stores its weight (in, out)."""

    def __init__(self, n_in, n_out):
        super().__init__()
        self.weight = nn.Parameter(torch.randn(n_in, n_out))


def test_gpt2_conv1d_layout_is_normalised_as_out_by_in():
    class Block(nn.Module):
        def __init__(self):
            super().__init__()
            self.mlp = nn.Module()
            self.mlp.c_fc = Conv1D(6, 10)
            self.mlp.c_proj = Conv1D(10, 10)  # square: only the layout, not the shape, says (in, out)

    model = Block()
    opt = SinkGD.from_model(model, lr=0.1, scale=1.0, iters=1)
    assert opt.param_groups[0]["param_layouts"][0]["out_dim"] == 1
    w = model.mlp.c_fc.weight
    w0 = w.detach().clone()
    w.grad = torch.randn_like(w)
    opt.step()
    # rows of the (out, in) view are w's columns: after one round they have norm sqrt(in) ... then columns
    expected = w0.t().double() - 0.1 * sr_sinkhorn_reference(w.grad.t(), 1).double()
    torch.testing.assert_close(w.detach().t().double(), expected, rtol=0, atol=2e-6)
    sq = model.mlp.c_proj.weight
    sq0 = sq.detach().clone()
    sq.grad = torch.randn_like(sq) * torch.rand(10, 1)  # rows of (in, out) storage scaled differently
    w.grad = None
    opt.step()
    expected = sq0.t().double() - 0.1 * sr_sinkhorn_reference(sq.grad.t(), 1).double()
    torch.testing.assert_close(sq.detach().t().double(), expected, rtol=0, atol=2e-6)


@pytest.mark.parametrize("kwargs, argument", [({"iters": 0}, "iters"), ({"scale": 0.0}, "scale"),
                                              ({"eps": -1.0}, "eps"), ({"adamw_lr": -1.0}, "adamw_lr"),
                                              ({"adamw_betas": (0.9, 1.0)}, "adamw_betas"),
                                              ({"adamw_weight_decay": -1.0}, "adamw_weight_decay")])
def test_invalid_hyperparameters_name_the_argument(kwargs, argument):
    with pytest.raises(ValueError, match=argument):
        SinkGD([nn.Parameter(torch.zeros(2, 2))], **kwargs)


def test_trains_a_tiny_llama():
    model = tiny_llama()
    opt = slimopt.create_optimizer(model, "sinkgd", lr=0.02, scale=0.25)
    first = lm_loss(model).item()
    for _ in range(30):
        opt.zero_grad()
        loss = lm_loss(model)  # one fixed batch: the loss must fall
        loss.backward()
        opt.step()
    assert math.isfinite(loss.item()) and loss.item() < 0.6 * first


# -- the stacked path against the per-matrix reference ---------------------------------------------------
#
# SinkGD.update_matrices updates a bucket of same-shaped matrices as stacks (ops.normalize.sinkgd_update_
# stacked_); update_matrix, one matrix at a time, is the reference. Tolerances: the two compute the same
# fp32 quantities in another order (batched products instead of mv, the floors and target norms folded
# into baddbmm's alpha = 1/n, which is inexact unless n is a power of two): the scale vectors, hence the
# update, differ by a few ulps per Sinkhorn round, measured <= 5e-7 of the step size; atol 2e-6 * step.
# rtol, 4 fp32 ulps of W: the decay factor 1 - lr scale wd is rounded from a double on one path and from
# fp32 products on the other (1 ulp of W), W is rounded once at the end (1 ulp), and a GPU may contract
# W + r G c into one FMA on either path (1 ulp). Each step starts both copies from the same values.
from _hybrid_twins import FP32_ULP, per_matrix, step_in_lockstep  # noqa: E402
from _hybrid_twins import twins as _twins  # noqa: E402


def twins(shapes, dtype=torch.float32, seed=0, **kwargs):
    return _twins(SinkGD, shapes, dtype, seed, **kwargs)


def set_grads(params_a, params_b, seed, dtype=None):
    g = torch.Generator().manual_seed(seed)
    for a, b in zip(params_a, params_b):
        grad = torch.randn(a.shape, generator=g) * torch.rand(a.shape[0], 1, generator=g).mul(10) if a.numel() \
            else torch.zeros(a.shape)
        a.grad, b.grad = grad.to(dtype or a.dtype), grad.to(dtype or a.dtype).clone()


ODD = [(37, 53), (37, 53), (53, 37), (53, 37), (53, 37), (1, 9), (9, 1), (1, 1), (0, 5), (5, 0), (33, 33)]


@pytest.mark.parametrize("weight_decay", [0.0, 0.1], ids=["no_wd", "wd"])
@pytest.mark.parametrize("tensor_lr", [False, True], ids=["float_lr", "tensor_lr"])
@pytest.mark.parametrize("stack_numel", [None, 2500], ids=["one_stack", "chunked"])
def test_stacked_path_equals_the_per_matrix_reference_fp32(weight_decay, tensor_lr, stack_numel):
    lr = torch.tensor(0.1) if tensor_lr else 0.1
    a, opt_a, b, opt_b = twins(ODD, lr=lr, scale=0.5, weight_decay=weight_decay)
    if stack_numel:  # 2500 elements: the (37, 53) pair goes in two stacks, the three (53, 37) in 3
        opt_a.stack_numel = {"cpu": stack_numel}
    step_in_lockstep(a, opt_a, b, opt_b, set_grads, atol=2e-6 * 0.05)
    assert len(opt_a.state) == 0


@pytest.mark.parametrize("weight_decay", [0.0, 0.1], ids=["no_wd", "wd"])
def test_stacked_path_equals_the_per_matrix_reference_bf16(weight_decay):
    a, opt_a, b, opt_b = twins(ODD, dtype=torch.bfloat16, seed=3, lr=0.1, scale=0.5, weight_decay=weight_decay)
    p0 = [p.detach().clone() for p in a]
    set_grads(a, b, seed=7)
    opt_a.step()
    opt_b.step()
    for x, y, w in zip(a, b, p0):
        assert x.dtype == torch.bfloat16
        if weight_decay == 0:
            # W + U computed in fp32 and rounded once on both paths: U differs by fp32 ulps, which almost
            # never moves a bf16 rounding (measured: bitwise equal); allow one bf16 ulp
            torch.testing.assert_close(x, y, rtol=2.0**-7, atol=1e-6)
        else:
            # the reference rounds W * (1 - lr wd) to bf16 before adding U (two roundings); the stacked
            # path rounds W * decay + U once: they differ by up to one bf16 ulp of the result plus one of W
            bound = 2.0**-8 * (y.double().abs() + w.double().abs()) * 2 + 1e-6
            assert ((x.double() - y.double()).abs() <= bound).all()


class _GPT2Block(nn.Module):
    """GPT-2's Conv1D weights (stored (in, out), seen as their transposes), optionally beside a Linear."""

    def __init__(self, with_linear: bool = False):
        super().__init__()
        self.mlp = nn.Module()
        self.mlp.c_fc = Conv1D(6, 10)
        self.mlp.c_proj = Conv1D(10, 6)
        self.attn = nn.Module()
        self.attn.c_proj = Conv1D(6, 10)  # the same (out, in) view as c_fc: one bucket, one stack
        if with_linear:
            self.attn.q_proj = nn.Linear(6, 10, bias=False)  # an (out, in) weight beside them


def _gpt2_twins(with_linear: bool = False, **options):
    """Two equal blocks: SinkGD with ``options`` on the first, the per-matrix reference on the second."""
    torch.manual_seed(4)
    models = [_GPT2Block(with_linear), _GPT2Block(with_linear)]
    models[1].load_state_dict(models[0].state_dict())
    opts = [SinkGD.from_model(models[0], lr=0.1, scale=1.0, weight_decay=0.1, **options),
            per_matrix(SinkGD.from_model(models[1], lr=0.1, scale=1.0, weight_decay=0.1))]
    return models, opts


def _gpt2_step_in_lockstep(models, opts, g: torch.Generator) -> None:
    """One step of both twins from the first one's weights and the same gradients (columns scaled apart);
    then their weights agree within 4 fp32 ulps (relative) and 2e-6 lr."""
    grads = [torch.randn(p.shape, generator=g) * torch.rand(1, p.shape[1], generator=g)
             for p in models[0].parameters()]
    with torch.no_grad():
        for x, y in zip(models[0].parameters(), models[1].parameters()):
            y.copy_(x)
    for model, opt in zip(models, opts):
        for p, grad in zip(model.parameters(), grads):
            p.grad = grad.clone()
        opt.step()
    for x, y in zip(models[0].parameters(), models[1].parameters()):
        torch.testing.assert_close(x, y, rtol=4 * FP32_ULP, atol=2e-6 * 0.1)


def test_gpt2_conv1d_transposed_views_take_the_stacked_path():
    models, opts = _gpt2_twins()
    _gpt2_step_in_lockstep(models, opts, torch.Generator().manual_seed(0))
    # and the reference itself is Algorithm 4 on the (out, in) view
    w = models[0].mlp.c_fc.weight
    w0 = w.detach().clone()
    w.grad = torch.randn_like(w)
    for p in (models[0].mlp.c_proj.weight, models[0].attn.c_proj.weight):
        p.grad = None
    opts[0].step()
    expected = w0.t().double() * (1 - 0.1 * 0.1) - 0.1 * sr_sinkhorn_reference(w.grad.t(), 5).double()
    torch.testing.assert_close(w.detach().t().double(), expected, rtol=0, atol=2e-6)


def _step_with_bad_gradients(a, opt_a, b, opt_b, bad: dict[int, tuple[tuple[int, int], float]]) -> list[torch.Tensor]:
    """Plant ``bad`` (matrix -> (position, NaN or inf)) in ``a``'s gradients and step ``opt_a``: those matrices must
    stay exactly as they were (not even decayed), the others step as the reference ``opt_b`` does, which sees the
    finite gradients only. Returns ``a`` before the step."""
    for i, (where, value) in bad.items():
        a[i].grad[where] = value
    before = [p.detach().clone() for p in a]
    opt_a.step()
    for i, p in enumerate(a):
        b[i].grad = None if i in bad else p.grad.clone()
    opt_b.step()
    for i, p in enumerate(a):
        if i in bad:
            assert torch.equal(p, before[i])
        else:
            torch.testing.assert_close(p, b[i], rtol=4 * FP32_ULP, atol=2e-6 * 0.05)
    return before


def test_skip_policy_leaves_a_matrix_with_a_nonfinite_gradient_alone_without_a_host_sync():
    a, opt_a, b, opt_b = twins([(12, 20)] * 4, lr=0.1, scale=0.5, weight_decay=0.1, nonfinite="skip")
    set_grads(a, b, seed=1)
    _step_with_bad_gradients(a, opt_a, b, opt_b, {1: ((2, 3), float("nan")), 3: ((2, 3), float("inf"))})


def test_raise_policy_names_the_matrix_and_changes_nothing():
    a, opt_a, _, _ = twins([(12, 20)] * 3, lr=0.1, nonfinite="raise")
    set_grads(a, a, seed=2)
    a[1].grad[0, 0] = float("nan")
    before = [p.detach().clone() for p in a]
    with pytest.raises(FloatingPointError, match=r"params'\]\[1\]"):
        opt_a.step()
    assert all(torch.equal(x, y) for x, y in zip(a, before))


@pytest.mark.parametrize("stacked", [True, False], ids=["stacked", "per_matrix"])
def test_a_nonfinite_update_leaves_that_weight_unchanged(stacked):
    """A finite gradient whose square overflows fp32 (|g| > 1.8e19) gives NaN scales: that matrix keeps its
    weights (decay included), the others in its bucket step, nothing non-finite is written."""
    a, opt_a, b, opt_b = twins([(8, 12)] * 3, lr=0.1, weight_decay=0.1)
    opt = opt_a if stacked else opt_b
    params = a if stacked else b
    set_grads(params, params, seed=5)
    params[1].grad[4] = 3e30  # a row of finite, huge entries
    before = [p.detach().clone() for p in params]
    opt.step()
    assert torch.equal(params[1], before[1])
    assert all(torch.isfinite(p).all() for p in params)
    assert not torch.equal(params[0], before[0]) and not torch.equal(params[2], before[2])


def test_triton_option_is_deprecated_and_takes_the_default_path():
    g = torch.Generator().manual_seed(6)
    w1, w2 = nn.Parameter(torch.randn(10, 14, generator=g)), None
    w2 = nn.Parameter(w1.detach().clone())
    with pytest.warns(FutureWarning, match="triton"):
        opt2 = SinkGD([w2], lr=0.1, triton=True)
    opt1 = SinkGD([w1], lr=0.1)
    assert "triton" not in opt2.param_groups[0]
    w1.grad = torch.randn(10, 14, generator=g)
    w2.grad = w1.grad.clone()
    opt1.step()
    opt2.step()
    assert torch.equal(w1, w2)


def test_the_check_reads_one_norm_per_gradient_and_looks_again_before_raising():
    """The non-finite check is an l2 norm per gradient (one multi-tensor op); a norm that overflows on
    finite values (here 1e30 entries) is looked at again and does not raise."""
    a, opt, _, _ = twins([(6, 8)] * 2, lr=0.1, nonfinite="raise")
    bias = nn.Parameter(torch.zeros(8))
    opt.add_param_group({"params": [bias], "update": "adamw"})
    set_grads(a, a, seed=3)
    bias.grad = torch.full((8,), 1e30)  # finite; its squares overflow fp32
    opt.step()
    assert all(torch.isfinite(p).all() for p in [*a, bias])
    bias.grad[3] = -float("inf")
    with pytest.raises(FloatingPointError, match="non-finite gradient"):
        opt.step()


# -- the Triton path (backend="triton": CPU tensors under the interpreter here) ---------------------------
#
# SinkGD steps the matrices the kernels take (fp32/bf16 views whose storage rows are contiguous) with
# ops.sinkhorn_triton.SinkhornScaledAdd: 2 iters + 1 launches per group, dtype and layout. The same lockstep
# against the per-matrix reference, with the same tolerances as the stacked path: the kernels sum the same fp32
# quantities in another order (tiles of partial sums; on a GPU the tiles reduce in yet another order) and add
# the floors where the reference clamps with them: a few ulps of the scales, <= 2e-6 of the step size in the
# update; W within 4 fp32 ulps (one rounding, the decay factor rounded from another expression, an FMA that
# the reference's addcmul may take; the kernels take none: enable_fp_fusion=False).

import os  # noqa: E402

from slimopt.ops.triton_support import triton_available  # noqa: E402

# CPU tensors through the Triton interpreter (on a GPU machine the kernels run on CUDA tensors instead: the
# tests of ops.sinkhorn_triton and the gpu-marked test below)
needs_triton = pytest.mark.skipif(not triton_available() or os.environ.get("TRITON_INTERPRET") != "1",
                                  reason="needs triton and TRITON_INTERPRET=1 (CPU tensors)")


# several shapes, a single row and column, an empty matrix: each program of the interpreter costs ~50 ms
TRITON_ODD = [(37, 53), (53, 37), (53, 37), (1, 9), (9, 1), (0, 5), (33, 33)]


def kernel_steps(opt):
    """The SinkhornScaledAdd objects the Triton path built, by (device, param dtype, grad dtype, transposed)."""
    return {key: entry[1] for (_, key), entry in getattr(opt, "_sinkhorn_steps", {}).items()}


@needs_triton
@pytest.mark.parametrize("weight_decay, tensor_lr", [(0.0, False), (0.1, True)], ids=["float_lr", "tensor_lr_wd"])
def test_triton_path_equals_the_per_matrix_reference_fp32(weight_decay, tensor_lr):
    lr = torch.tensor(0.1) if tensor_lr else 0.1
    a, opt_a, b, opt_b = twins(TRITON_ODD, lr=lr, scale=0.5, weight_decay=weight_decay, backend="triton")
    step_in_lockstep(a, opt_a, b, opt_b, set_grads, atol=2e-6 * 0.05, steps=2)
    # every non-empty matrix of the group (several shapes) in one SinkhornScaledAdd; the empty ones need nothing
    steps = kernel_steps(opt_a)
    assert list(steps) == [(torch.device("cpu"), torch.float32, torch.float32, False)]
    assert next(iter(steps.values())).count == sum(1 for s in TRITON_ODD if s[0] * s[1])
    assert len(opt_a.state) == 0


@needs_triton
@pytest.mark.parametrize("iters", [1, 2])
def test_triton_path_with_few_rounds(iters):
    a, opt_a, b, opt_b = twins([(24, 40), (40, 24), (24, 40)], lr=0.1, scale=0.5, iters=iters, weight_decay=0.1,
                               backend="triton")
    step_in_lockstep(a, opt_a, b, opt_b, set_grads, atol=2e-6 * 0.05, steps=2)


@needs_triton
@pytest.mark.parametrize("weight_decay", [0.0, 0.1], ids=["no_wd", "wd"])
def test_triton_path_bf16_equals_the_stacked_path_and_the_reference(weight_decay):
    kwargs = {"lr": 0.1, "scale": 0.5, "weight_decay": weight_decay}
    a, opt_a, b, opt_b = twins(TRITON_ODD, dtype=torch.bfloat16, seed=3, backend="triton", **kwargs)
    c, opt_c, _, _ = twins(TRITON_ODD, dtype=torch.bfloat16, seed=3, backend="torch", **kwargs)
    p0 = [p.detach().clone() for p in a]
    set_grads(a, b, seed=7)
    for x, y in zip(a, c):
        y.grad = x.grad.clone()
    for opt in (opt_a, opt_b, opt_c):
        opt.step()
    assert list(kernel_steps(opt_a)) == [(torch.device("cpu"), torch.bfloat16, torch.bfloat16, False)]
    for x, y, z, w in zip(a, b, c, p0):
        assert x.dtype == torch.bfloat16
        # the stacked path too computes W * decay + U in fp32 and rounds once: U differs by fp32 ulps, which
        # moves a bf16 rounding only where the value sits on a boundary: one bf16 ulp at most
        torch.testing.assert_close(x, z, rtol=2.0**-7, atol=1e-6)
        if weight_decay == 0:
            torch.testing.assert_close(x, y, rtol=2.0**-7, atol=1e-6)
        else:  # the reference rounds W * decay to bf16 before adding U (see the stacked path's test)
            bound = 2.0**-8 * (y.double().abs() + w.double().abs()) * 2 + 1e-6
            assert ((x.double() - y.double()).abs() <= bound).all()


@needs_triton
def test_triton_path_gpt2_conv1d_views_and_linear_layers_in_one_group():
    """GPT-2's Conv1D weights are seen as the transposes of their storage: the kernels read the storage rows
    and put the Sinkhorn rows on its columns. A group with both orders takes one SinkhornScaledAdd each."""
    models, opts = _gpt2_twins(with_linear=True, backend="triton")
    g = torch.Generator().manual_seed(0)
    for _ in range(2):
        _gpt2_step_in_lockstep(models, opts, g)
    layouts = sorted(key[3] for key in kernel_steps(opts[0]))
    assert layouts == [False, True]
    assert {s.count for s in kernel_steps(opts[0]).values()} == {1, 3}


@needs_triton
def test_triton_path_skip_leaves_a_matrix_with_a_nonfinite_gradient_alone_and_counts_it():
    a, opt_a, b, opt_b = twins([(12, 20)] * 3 + [(20, 12)], lr=0.1, scale=0.5, weight_decay=0.1, backend="triton")
    assert opt_a.param_groups[0]["nonfinite"] == "skip"  # the default
    set_grads(a, b, seed=1)
    before = _step_with_bad_gradients(a, opt_a, b, opt_b, {1: ((2, 3), float("nan")), 3: ((0, 0), float("inf"))})
    assert opt_a.nonfinite_skips == 2
    set_grads(a, b, seed=2)  # finite again: every matrix steps, nothing more is counted
    opt_a.step()
    assert all(not torch.equal(x, y) for x, y in zip(a, before))
    assert opt_a.nonfinite_skips == 2


@needs_triton
def test_triton_path_leaves_a_matrix_whose_squares_overflow_alone():
    a, opt_a, _, _ = twins([(8, 12)] * 3, lr=0.1, weight_decay=0.1, backend="triton", nonfinite="raise")
    set_grads(a, a, seed=5)
    a[1].grad[4] = 3e30  # finite (the "raise" check passes), but its squares overflow fp32
    before = [p.detach().clone() for p in a]
    opt_a.step()
    assert torch.equal(a[1], before[1])
    assert all(torch.isfinite(p).all() for p in a)
    assert not torch.equal(a[0], before[0]) and not torch.equal(a[2], before[2])
    assert opt_a.nonfinite_skips == 1


@needs_triton
def test_triton_path_raise_names_the_matrix_and_changes_nothing():
    a, opt_a, _, _ = twins([(12, 20)] * 3, lr=0.1, nonfinite="raise", backend="triton")
    set_grads(a, a, seed=2)
    a[1].grad[0, 0] = float("inf")
    before = [p.detach().clone() for p in a]
    with pytest.raises(FloatingPointError, match=r"params'\]\[1\]"):
        opt_a.step()
    assert all(torch.equal(x, y) for x, y in zip(a, before))


@needs_triton
def test_triton_path_reads_nothing_back_and_launches_per_group_not_per_matrix(monkeypatch):
    """nonfinite="skip" with a tensor lr: no value goes to the host; 2 iters + 1 kernel launches for 6
    matrices of three shapes; the aten ops around them: the skip count's sum and add (and the profiler's
    markers of the step)."""
    from torch.utils._python_dispatch import TorchDispatchMode

    from slimopt.ops import sinkhorn_triton

    a, opt_a, _, _ = twins([(12, 20), (20, 12), (16, 16)] * 2, lr=torch.tensor(0.1), weight_decay=0.1,
                           backend="triton")
    set_grads(a, a, seed=3)
    opt_a.step()
    launches, inside = [], [False]

    def counted(name, run):
        def launch(*args, **kwargs):  # the interpreter's own torch ops (argument copies) are not the step's
            launches.append(name)
            inside[0] = True
            try:
                return run(*args, **kwargs)
            finally:
                inside[0] = False
        return launch

    for name in ("_sinkhorn_half_step_kernel", "_scaled_add_kernel"):
        kernel = getattr(sinkhorn_triton, name)
        monkeypatch.setattr(kernel, "run", counted(name, kernel.run))

    def refuse(*args, **kwargs):
        raise AssertionError("a host read in the step")

    for method in ("item", "tolist", "__bool__", "__float__", "__int__"):
        monkeypatch.setattr(torch.Tensor, method, refuse)

    class Ops(TorchDispatchMode):
        names: list[str] = []

        def __torch_dispatch__(self, func, types, args=(), kwargs=None):
            if not inside[0]:
                self.names.append(str(func))
            return func(*args, **(kwargs or {}))

    with Ops() as ops:
        opt_a.step()
    monkeypatch.undo()
    assert launches == ["_sinkhorn_half_step_kernel"] * 10 + ["_scaled_add_kernel"]
    assert not [n for n in ops.names if n.startswith(("aten._local_scalar_dense", "aten.item"))]
    assert len([n for n in ops.names if n not in ("aten.detach.default", "prim.device.default")]) <= 4


def test_a_state_dict_saved_before_the_backend_option_loads():
    w, bias = nn.Parameter(torch.randn(4, 6)), nn.Parameter(torch.randn(6))
    opt = SinkGD([("q_proj.weight", w), ("norm.weight", bias)], lr=0.1, backend="torch")
    w.grad, bias.grad = torch.randn(4, 6), torch.randn(6)
    opt.step()
    saved = opt.state_dict()
    for group in saved["param_groups"]:
        del group["backend"]
    opt.load_state_dict(saved)
    assert [g["backend"] for g in opt.param_groups] == ["torch", "torch"]
    assert len(opt.state) == 1  # the norm's AdamW state came back
    del saved["param_groups"][0]["scale"]
    with pytest.raises(ValueError, match="lacks scale"):  # the other keys are still checked
        opt.load_state_dict(saved)


def test_backend_is_checked_and_auto_keeps_cpu_tensors_on_the_torch_path():
    w = nn.Parameter(torch.randn(6, 8))
    with pytest.raises(ValueError, match="backend"):
        SinkGD([w], backend="cuda")
    opt = SinkGD([w], lr=0.1)
    assert opt.param_groups[0]["backend"] == "auto"
    w.grad = torch.randn(6, 8)
    opt.step()
    assert not kernel_steps(opt)  # CPU tensors: the stacked torch path


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available() or not triton_available(), reason="needs a CUDA device and triton")
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["fp32", "bf16"])
def test_cuda_auto_takes_the_kernels_and_equals_the_per_matrix_reference(dtype):
    torch.manual_seed(0)
    shapes = [(256, 320), (320, 256), (256, 320), (64, 64)]
    values = [torch.randn(s, device="cuda").to(dtype) for s in shapes]
    a = [nn.Parameter(v.clone()) for v in values] + [nn.Parameter(torch.randn(96, 40, device="cuda").to(dtype).t())]
    b = [nn.Parameter(p.detach().clone()) for p in a[:-1]] + [nn.Parameter(a[-1].detach().t().clone().t())]
    opt_a = SinkGD([{"params": a, "update": "stateless"}], lr=0.1, scale=0.5, weight_decay=0.1)
    opt_b = per_matrix(SinkGD([{"params": b, "update": "stateless"}], lr=0.1, scale=0.5, weight_decay=0.1))
    for seed in range(2):
        g = torch.Generator(device="cuda").manual_seed(seed)
        for x, y in zip(a, b):
            grad = torch.randn(x.shape, generator=g, device="cuda") * torch.rand(x.shape[0], 1, generator=g,
                                                                                   device="cuda") * 10
            x.grad = grad.to(dtype) if x.is_contiguous() else grad.to(dtype).t().contiguous().t()
            y.grad = x.grad.clone()
        with torch.no_grad():
            for x, y in zip(a, b):
                y.copy_(x)
        opt_a.step()
        opt_b.step()
        for x, y in zip(a, b):
            if dtype == torch.float32:
                torch.testing.assert_close(x, y, rtol=4 * FP32_ULP, atol=2e-6 * 0.05)
            else:  # W rounded once here, twice by the reference (W * decay, then + U): see the bf16 tests above
                bound = 2.0**-8 * (y.float().abs() + x.float().abs()) * 2 + 1e-6
                assert ((x.float() - y.float()).abs() <= bound).all()
    assert sorted(key[3] for key in kernel_steps(opt_a)) == [False, True]


@needs_triton
@pytest.mark.parametrize("layers", [4, 24])
def test_triton_path_launches_at_the_1b_layout(layers, monkeypatch):
    """The 1b preset's layout (219 tensors at 24 layers, tiny widths; tests/test_launches_hybrid.py): a step on
    the Triton path is 2 iters + 1 kernel launches for all 7 * layers matrices (one dtype, one layout), whatever
    the depth, and the rest of the step (AdamW for embeddings, head and norms, the skip count) stays within the
    launch budget. The kernels are counted, not run (the interpreter would take minutes at this size)."""
    from slimopt.ops import sinkhorn_triton
    from test_launches_hybrid import BUDGET, NOT_LAUNCHES, Ops, model

    launches = []
    for name in ("_sinkhorn_half_step_kernel", "_scaled_add_kernel"):
        monkeypatch.setattr(getattr(sinkhorn_triton, name), "run",
                            lambda *args, _name=name, **kwargs: launches.append(_name))
    m = model(layers)
    for p in m.parameters():
        p.grad = torch.randn_like(p) * 1e-3
    opt = slimopt.create_optimizer(m, "sinkgd", lr=1e-3, backend="triton")
    opt.step()
    launches.clear()
    counter = Ops()
    with counter:
        opt.step()
    aten = [n for n in counter.names if n not in map(str, NOT_LAUNCHES)]
    assert launches == ["_sinkhorn_half_step_kernel"] * 10 + ["_scaled_add_kernel"]
    assert [s.count for s in kernel_steps(opt).values()] == [7 * layers]
    assert len(aten) + len(launches) <= BUDGET
    assert not [n for n in aten if n.startswith(("aten._local_scalar_dense", "aten.item"))]
