"""The device helpers the Triton kernel modules share (ops.triton_helpers), in a kernel of their own.

CPU tensors under TRITON_INTERPRET=1 (tests/conftest.py); on a GPU the same tests run compiled. The helpers are
exact bit operations, so the references are exact too: torch's own fp32 -> bf16 cast (round to nearest, ties to
even) and the values as stored.
"""

from __future__ import annotations

import pytest
import torch

from slimopt.ops.tables import AddressTable
from slimopt.ops.triton_helpers import POINTER_KINDS, float64_bits, pow2, round_fp32
from slimopt.ops.triton_support import triton_available

pytestmark = pytest.mark.skipif(not triton_available(), reason="needs triton")

if triton_available():
    from slimopt.ops.triton_helpers import bf16_nearest, bf16_nearest_finite, typed_pointer
    from slimopt.ops.triton_support import tl, triton

    @triton.jit
    def _round_kernel(x_ptr, out_ptr, n, FINITE: tl.constexpr, BLOCK: tl.constexpr):
        offs = tl.program_id(0) * BLOCK + tl.arange(0, BLOCK)
        mask = offs < n
        x = tl.load(x_ptr + offs, mask=mask, other=0.0)
        if FINITE:
            y = bf16_nearest_finite(x)
        else:
            y = bf16_nearest(x)
        tl.store(out_ptr + offs, y, mask=mask)

    @triton.jit
    def _gather_kernel(table_ptr, out_ptr, n, KIND: tl.constexpr, BLOCK: tl.constexpr):
        offs = tl.arange(0, BLOCK)
        mask = offs < n
        src = typed_pointer(tl.load(table_ptr), KIND)
        tl.store(out_ptr + offs, tl.load(src + offs, mask=mask, other=0).to(tl.float32), mask=mask)


def _device() -> str:
    return "cuda" if torch.cuda.is_available() else "cpu"


def _round(x: torch.Tensor, finite: bool) -> torch.Tensor:
    out = torch.empty_like(x)
    _round_kernel[(triton.cdiv(x.numel(), 1024),)](x, out, x.numel(), FINITE=finite, BLOCK=1024)
    return out


def test_bf16_nearest_rounds_as_torchs_cast():
    generator = torch.Generator().manual_seed(0)
    x = torch.randn(4096, generator=generator) * torch.logspace(-30, 30, 4096)
    # ties: finite values halfway between two bf16 numbers (low 16 bits 0x8000), both parities of the kept bit
    high = torch.randint(0, 0x7F80, (512,), generator=generator, dtype=torch.int32)  # below the inf/NaN exponent
    ties = (high << 16 | 0x8000).view(torch.float32)
    x = torch.cat([x, ties, -ties, torch.tensor([0.0, -0.0, 1.0, 3.0e38])]).to(_device())
    expected = x.to(torch.bfloat16).float()
    assert torch.equal(_round(x, finite=False), expected)
    assert torch.equal(_round(x, finite=True), expected)


def test_bf16_nearest_finite_leaves_nan_and_inf_alone():
    x = torch.tensor([float("inf"), float("-inf"), float("nan"), 1.00390625], device=_device())
    out = _round(x, finite=True)
    assert out[0] == float("inf") and out[1] == float("-inf") and out[2].isnan() and out[3] == 1.0


@pytest.mark.parametrize("dtype, kind", [*POINTER_KINDS.items(), (torch.int16, 3), (torch.uint8, 4)])
def test_typed_pointer_reads_each_kind(dtype, kind):
    src = torch.arange(1, 11, device=_device()).to(dtype)
    out = torch.zeros(10, device=_device())
    _gather_kernel[(1,)](AddressTable(_device())([src]), out, 10, KIND=kind, BLOCK=16)
    assert torch.equal(out, src.float())


def test_host_numbers():
    assert [pow2(x) for x in (0, 1, 2, 3, 4, 5, 1000, 1024, 1025)] == [1, 1, 2, 4, 4, 8, 1024, 1024, 2048]
    assert float64_bits(1.0) == 0x3FF0000000000000 and float64_bits(-2.0) == -0x4000000000000000
    assert round_fp32(0.1) == float(torch.tensor(0.1, dtype=torch.float32)) != 0.1
