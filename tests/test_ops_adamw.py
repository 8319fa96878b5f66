"""The AdamW fallback kernel against torch.optim.AdamW."""

from __future__ import annotations

import pytest
import torch

from slimopt.ops.adamw import adamw_multi, adamw_reference

HYPER = {"lr": 3e-3, "beta1": 0.9, "beta2": 0.95, "eps": 1e-8, "weight_decay": 0.1}


def torch_adamw(params, grads_per_step, foreach, fused=None):
    ps = [p.clone().requires_grad_() for p in params]
    opt = torch.optim.AdamW(ps, lr=HYPER["lr"], betas=(HYPER["beta1"], HYPER["beta2"]), eps=HYPER["eps"],
                            weight_decay=HYPER["weight_decay"], foreach=foreach, fused=fused)
    for grads in grads_per_step:
        for p, g in zip(ps, grads):
            p.grad = g
        opt.step()
    return [p.detach() for p in ps], opt


def ours(params, grads_per_step, **kwargs):
    ps = [p.clone() for p in params]
    ms = [torch.zeros_like(p) for p in ps]
    vs = [torch.zeros_like(p) for p in ps]
    for t, grads in enumerate(grads_per_step, start=1):
        adamw_multi(ps, grads, ms, vs, [float(t)] * len(ps), **HYPER, **kwargs)
    return ps, ms, vs


def tensors(shapes, dtype=torch.float32, seed=0, steps=4):
    g = torch.Generator().manual_seed(seed)
    params = [torch.randn(s, generator=g).to(dtype) for s in shapes]
    grads = [[torch.randn(s, generator=g).to(dtype) for s in shapes] for _ in range(steps)]
    return params, grads


SHAPES = [(300, 70), (5,), (64, 64), (3, 4, 5), (1,), (2000,)]


@pytest.mark.parametrize("foreach", [False, True], ids=["forloop", "foreach"])
def test_reference_equals_torch_adamw(foreach):
    params, grads = tensors(SHAPES)
    expected, opt = torch_adamw(params, grads, foreach)
    ps = [p.clone() for p in params]
    ms = [torch.zeros_like(p) for p in ps]
    vs = [torch.zeros_like(p) for p in ps]
    for t, gs in enumerate(grads, start=1):
        for p, g, m, v in zip(ps, gs, ms, vs):
            adamw_reference(p, g, m, v, float(t), **HYPER)
    for a, b in zip(ps, expected):
        assert torch.equal(a, b)  # same ops in the same order as torch's for-loop and foreach paths


@pytest.mark.parametrize("chunk_numel", [1000, 4096, 1 << 16], ids=["ragged", "small", "default"])
def test_multi_tensor_and_chunked_paths_equal_torch_adamw(chunk_numel):
    # (300, 70) and (2000,) are chunked at the small sizes; 1000 does not divide them (ragged last chunk).
    params, grads = tensors(SHAPES, seed=1)
    expected, opt = torch_adamw(params, grads, foreach=False)
    got, ms, vs = ours(params, grads, chunk_numel=chunk_numel, fused=False)
    for a, b in zip(got, expected):
        # Elementwise ops on the same values: bitwise equal in practice; allow one fp32 ulp in case a
        # vectorised and a scalar tail loop round an FMA differently.
        torch.testing.assert_close(a, b, rtol=1.2e-7, atol=0)
    for p, m, v in zip(opt.param_groups[0]["params"], ms, vs):
        torch.testing.assert_close(m, opt.state[p]["exp_avg"], rtol=1.2e-7, atol=0)
        torch.testing.assert_close(v, opt.state[p]["exp_avg_sq"], rtol=1.2e-7, atol=0)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["fp32", "bf16"])
def test_fused_path_is_torch_fused_adamw_and_close_to_the_for_loop(dtype):
    params, grads = tensors(SHAPES, dtype=dtype, seed=5)
    fused, _ = torch_adamw(params, grads, foreach=None, fused=True)
    got, ms, _ = ours(params, grads)  # fused where it applies (every tensor here is contiguous)
    assert ms[0].dtype == dtype
    for a, b in zip(got, fused):
        assert torch.equal(a, b)
    if dtype == torch.float32:
        loop, _ = torch_adamw(params, grads, foreach=False)
        for a, b in zip(got, loop):
            # The fused kernel contracts multiply-adds differently from the for-loop: a few elements
            # differ by one ulp of the parameter (or of the ~lr-sized update, for parameters near zero).
            torch.testing.assert_close(a, b, rtol=2.4e-7, atol=1e-9)


def test_bf16_params_match_torch_adamw_in_bf16():
    params, grads = tensors([(200, 30), (7,)], dtype=torch.bfloat16, seed=2)
    expected, _ = torch_adamw(params, grads, foreach=False)
    got, ms, _ = ours(params, grads, chunk_numel=512, fused=False)
    assert ms[0].dtype == torch.bfloat16
    for a, b in zip(got, expected):
        torch.testing.assert_close(a, b, rtol=0, atol=0)


def test_non_contiguous_tensors():
    g = torch.Generator().manual_seed(3)
    base = torch.randn(80, 60, generator=g)
    p = base.t()  # non-contiguous: goes through the multi-tensor path
    grad = torch.randn(60, 80, generator=g)
    expected, _ = torch_adamw([p.contiguous()], [[grad]], foreach=False)
    m, v = torch.zeros_like(p), torch.zeros_like(p)
    adamw_multi([p], [grad], [m], [v], [1.0], **HYPER, chunk_numel=256)  # not fusable: strided
    torch.testing.assert_close(p, expected[0], rtol=0, atol=0)


def test_per_tensor_step_counts():
    params, grads = tensors([(50, 50), (40,)], seed=4, steps=1)
    ps = [p.clone() for p in params]
    ms = [torch.full_like(p, 0.01) for p in ps]
    vs = [torch.full_like(p, 0.02) for p in ps]
    adamw_multi(ps, grads[0], ms, vs, [7.0, 2.0], **HYPER, chunk_numel=512)
    for p0, p, g, step in zip(params, ps, grads[0], (7.0, 2.0)):
        ref, m, v = p0.clone(), torch.full_like(p0, 0.01), torch.full_like(p0, 0.02)
        adamw_reference(ref, g, m, v, step, **HYPER)
        torch.testing.assert_close(p, ref, rtol=2.4e-7, atol=1e-9)  # fused path: ~1 ulp (see above)


def test_found_inf_skips_the_update_on_the_device():
    params, grads = tensors([(30, 7), (5,)], seed=6, steps=1)
    for fused in (None, False):
        for flag, moves in ((1.0, False), (0.0, True)):
            ps = [p.clone() for p in params]
            ms, vs = [torch.zeros_like(p) for p in ps], [torch.zeros_like(p) for p in ps]
            adamw_multi(ps, grads[0], ms, vs, [torch.tensor(1.0)] * 2, **HYPER, fused=fused,
                        found_inf=torch.tensor(flag))
            assert all(torch.equal(a, b) != moves for a, b in zip(ps, params))
            assert all((m.abs().sum() > 0) == moves for m in ms)


def test_fused_path_is_one_op_for_all_tensors_with_tensor_steps_and_lr():
    """Multi-tensor, no loop over tensors, nothing read back: steps and lr stay tensors (on the device)."""
    from torch.utils._python_dispatch import TorchDispatchMode

    class Ops(TorchDispatchMode):
        names: list = []

        def __torch_dispatch__(self, func, types, args=(), kwargs=None):
            self.names.append(str(func))
            return func(*args, **(kwargs or {}))

    params, grads = tensors([(8, 3)] * 40 + [(5,)] * 10, seed=7, steps=1)
    ms, vs = [torch.zeros_like(p) for p in params], [torch.zeros_like(p) for p in params]
    steps = [torch.tensor(1.0) for _ in params]
    hyper = {**HYPER, "lr": torch.tensor(HYPER["lr"])}
    with Ops() as counter:
        adamw_multi(params, grads[0], ms, vs, steps, **hyper)
    assert counter.names == ["aten._fused_adamw_.tensor_lr"]
