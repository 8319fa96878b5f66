"""SinkGD's Triton twin against the torch kernel (on CPU under TRITON_INTERPRET=1, at small sizes).

tests/conftest.py sets TRITON_INTERPRET=1 without a GPU, before anything imports triton (Triton reads it
when a kernel is decorated).
"""

from __future__ import annotations

import pytest
import torch

triton = pytest.importorskip("triton")

import slimopt.ops.sinkhorn_triton as kernels  # noqa: E402
from slimopt.ops.normalize import sinkhorn_scales, sr_sinkhorn_reference  # noqa: E402

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"


def gradient(m, n, dtype=torch.float32, seed=0):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(m, n, generator=g) * torch.randn(m, 1, generator=g).exp() * torch.randn(1, n, generator=g).exp()
    return x.to(dtype).to(DEVICE)


@pytest.mark.parametrize("shape", [(37, 53), (53, 37), (1, 5), (70, 130)])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["fp32", "bf16"])
def test_scales_match_the_torch_kernel(shape, dtype):
    g = gradient(*shape, dtype=dtype)
    g[shape[0] // 2] = 0  # a zero row stays zero, no NaN
    r, c = kernels.sinkhorn_scales_triton(g, 5)
    r_ref, c_ref = sinkhorn_scales(g, 5)
    x, x_ref = r[:, None] * g.float() * c[None, :], r_ref[:, None] * g.float() * c_ref[None, :]
    assert torch.isfinite(x).all()
    # Same fp32 arithmetic, different summation order: a few ulps per round.
    torch.testing.assert_close(x, x_ref, rtol=2e-5, atol=1e-6)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["fp32", "bf16"])
def test_update_matches_the_written_out_algorithm(dtype):
    g = gradient(40, 72, dtype=dtype, seed=1)
    w = gradient(40, 72, dtype=dtype, seed=2)
    expected = (w.double() * (1 - 0.05 * 0.1) - 0.05 * sr_sinkhorn_reference(g, 5).double()).to(dtype)
    kernels.sinkgd_update_triton(w, g, 5, step_size=0.05, weight_decay=0.1)
    # one rounding of W (fp32: ~1 ulp; bf16: 8 bits) plus fp32 error on the ~0.05-sized update
    tol = {"rtol": 2.4e-7, "atol": 1e-6} if dtype == torch.float32 else {"rtol": 8e-3, "atol": 1e-2}
    torch.testing.assert_close(w, expected, **tol)


def test_transposed_gradient_view():
    g = gradient(30, 20, seed=3)
    w = gradient(20, 30, seed=4)
    expected = w.double() - 0.1 * sr_sinkhorn_reference(g.t(), 3).double()
    kernels.sinkgd_update_triton(w, g.t(), 3, step_size=0.1)  # a non-row-major gradient is copied
    torch.testing.assert_close(w.double(), expected, rtol=0, atol=1e-6)


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_sinkgd_with_triton_equals_the_torch_path_on_gpu():
    from slimopt import SinkGD

    ws = [torch.nn.Parameter(gradient(96, 160, seed=5)) for _ in range(2)]
    opts = [SinkGD([ws[0]], lr=0.1, weight_decay=0.1), SinkGD([ws[1]], lr=0.1, weight_decay=0.1, triton=True)]
    for seed in range(3):
        g = gradient(96, 160, seed=10 + seed)
        for w, opt in zip(ws, opts):
            w.grad = g.clone()
            opt.step()
    torch.testing.assert_close(ws[1], ws[0], rtol=1e-6, atol=1e-6)
