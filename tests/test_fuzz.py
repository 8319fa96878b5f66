"""Property-based tests: odd shapes, dtypes and hyper-parameters never crash an optimizer or make NaNs.

Shapes cover 0-d, one element, empty, 1xN, Nx1, odd sizes and sizes just around MicroAdam's Top-K block
and quantisation bucket (drawn small, so the boundaries are crossed cheaply). Hidden-matrix names route
2-D tensors to the stateless SinkGD/SWAN update and Adam-mini's row blocks, 1-D tensors to the norm rules.
Properties after a few steps on random gradients of any magnitude:

* parameters and every floating state tensor stay finite;
* ``slimopt.state_bytes`` equals the bytes of the state tensors and does not grow after the first step;
* a zero learning rate with no weight decay leaves every parameter exactly unchanged.

``max_examples`` is kept small: the suite must stay fast.
"""

from __future__ import annotations

import inspect
import warnings

import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

import slimopt

NAMES = slimopt.get_supported_optimizers()

# Boundaries drawn around: MicroAdam's Top-K block / bucket (set small below), SWAN/SinkGD's 1-row and
# 1-column matrices.
SIZES = st.sampled_from([1, 2, 3, 5, 7, 8, 9, 15, 16, 17, 31, 32, 33, 63, 64, 65])
SHAPES = st.one_of(
    st.just(()),
    st.just((0,)),
    st.just((0, 4)),
    st.tuples(SIZES),
    st.tuples(SIZES, SIZES),
    st.tuples(st.just(1), SIZES),
    st.tuples(SIZES, st.just(1)),
    st.tuples(st.sampled_from([2, 3]), SIZES, st.sampled_from([1, 3])),
)

# Optimizer-specific hyper-parameters, used when the constructor takes them.
SPECIFIC = {
    "m": st.integers(1, 4),
    "k_init": st.sampled_from([0.01, 0.1, 0.5, 1.0]),
    "quant_block_size": st.sampled_from([1, 2, 7, 16, 64]),
    "topk_block_size": st.sampled_from([1, 3, 16, 32, 100]),
    "iters": st.integers(1, 6),
    "ns_iters": st.integers(1, 6),
    "betas": st.tuples(st.sampled_from([0.0, 0.5, 0.9]), st.sampled_from([0.0, 0.9, 0.999])),
    "eps": st.sampled_from([1e-8, 1e-6, 1e-3]),
    "scale": st.sampled_from([0.05, 1.0]),
}



def param_name(i: int, shape: tuple[int, ...]) -> str:
    if len(shape) == 2:
        return f"layers.{i}.mlp.up_proj.weight"
    if len(shape) == 1:
        return f"layers.{i}.input_layernorm.weight"
    return f"layers.{i}.extra_{len(shape)}d"


def floating_state(opt):
    for state in opt.state.values():
        for value in state.values():
            if torch.is_tensor(value) and value.is_floating_point():
                yield value


def tensor_bytes(opt) -> int:
    seen, total = set(), 0
    for state in opt.state.values():
        for value in state.values():
            if torch.is_tensor(value):
                storage = value.untyped_storage()
                if storage.data_ptr() not in seen and storage.nbytes():
                    seen.add(storage.data_ptr())
                    total += storage.nbytes()
    return total


@st.composite
def cases(draw, cls):
    shapes = draw(st.lists(SHAPES, min_size=1, max_size=4))
    dtype = draw(st.sampled_from([torch.float32, torch.bfloat16]))
    accepted = inspect.signature(cls.__init__).parameters
    options = {k: draw(s) for k, s in SPECIFIC.items() if k in accepted}
    if "k_init" in options and "topk_block_size" in options:
        options["k_init"] = max(options["k_init"], 1.0 / options["topk_block_size"])
    lr = draw(st.sampled_from([0.0, 1e-4, 1e-2, 0.5]))
    weight_decay = draw(st.sampled_from([0.0, 0.1]))
    # Up to 1e15: a gradient whose square overflows fp32 (|g| > 1.8e19) is outside any Adam-type contract
    # (torch's AdamW turns it into NaN at beta2 = 0: inf * 0 in the moment update).
    magnitude = draw(st.sampled_from([0.0, 1e-30, 1e-6, 1.0, 1e4, 1e15]))
    seed = draw(st.integers(0, 2**16))
    return shapes, dtype, options, lr, weight_decay, magnitude, seed


@pytest.mark.parametrize("shape", [(0, 4), (4, 0), (0,), (), (1,), (1, 1)])
@pytest.mark.parametrize("name", NAMES)
def test_empty_and_tiny_tensors(name, shape):
    cls = slimopt.load_optimizer(name)
    p = torch.nn.Parameter(torch.full(shape, 0.5))
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        opt = cls([p], lr=0.1) if cls.__module__.startswith("torch.") else cls([(param_name(0, shape), p)], lr=0.1)
    for _ in range(2):
        p.grad = torch.ones(shape)
        opt.step()
    assert torch.isfinite(p).all()
    if p.numel() and not (name == "swan" and len(shape) == 2):
        # A positive gradient moves the tensor down. Not for SWAN's matrices: it standardises each row
        # of the gradient to zero mean, so a constant gradient is no update at all (by design).
        assert (p < 0.5).all()


@pytest.mark.parametrize("name", NAMES)
def test_odd_shapes_dtypes_and_hyperparameters(name):
    cls = slimopt.load_optimizer(name)

    @settings(max_examples=12, deadline=None, suppress_health_check=[HealthCheck.too_slow])
    @given(case=cases(cls))
    def check(case):
        shapes, dtype, options, lr, weight_decay, magnitude, seed = case
        g = torch.Generator().manual_seed(seed)
        params = [torch.nn.Parameter(torch.randn(s, generator=g).to(dtype)) for s in shapes]
        named = [(param_name(i, s), p) for i, (s, p) in enumerate(zip(shapes, params))]
        initial = [p.detach().clone() for p in params]
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")  # plan warnings for tensors it does not recognise
            if cls.__module__.startswith("torch."):
                opt = cls(params, lr=lr, weight_decay=weight_decay,
                          **{k: v for k, v in options.items() if k in ("betas", "eps")})
            else:
                opt = cls(named, lr=lr, weight_decay=weight_decay, **options)
        sizes = []
        for _ in range(3):
            for p in params:
                p.grad = (torch.randn(p.shape, generator=g) * magnitude).to(dtype)
            opt.step()
            sizes.append(slimopt.state_bytes(opt))
            assert all(torch.isfinite(p).all() for p in params), (shapes, options)
            assert all(torch.isfinite(t).all() for t in floating_state(opt)), (shapes, options)
        assert sizes[0] == sizes[1] == sizes[2] == tensor_bytes(opt)
        if lr == 0.0 and weight_decay == 0.0:
            assert all(torch.equal(a, b) for a, b in zip(initial, params))

    check()
