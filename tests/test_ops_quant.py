"""The 4-bit bucketed min-max quantiser (slimopt.ops.quant)."""

from __future__ import annotations

import math

import pytest
import torch

from slimopt.ops.quant import (
    LEVELS,
    bucket_ranges,
    dequantize_4bit,
    num_buckets,
    pack_nibbles,
    quantize_4bit,
    unpack_nibbles,
)


def _per_entry(values: torch.Tensor, n: int, bucket: int) -> torch.Tensor:
    """Spread one value per bucket over the n entries (a plain reference for broadcasting)."""
    return values.float().repeat_interleave(bucket)[:n]


@pytest.mark.parametrize("n,bucket", [(1, 64), (63, 64), (64, 64), (1001, 64), (999, 7), (500, 1000)])
@pytest.mark.parametrize("offset", [0.0, 1000.0, -3.0e-3])
def test_round_trip_within_half_a_step(n, bucket, offset):
    torch.manual_seed(n + bucket)
    x = torch.randn(n) * torch.rand(1) + offset
    lo, hi = bucket_ranges(x, bucket)
    assert lo.dtype == hi.dtype == torch.bfloat16 and lo.numel() == num_buckets(n, bucket)
    lo_e, hi_e = _per_entry(lo, n, bucket), _per_entry(hi, n, bucket)
    # outward bf16 rounding: every entry lies inside its bucket's stored range
    assert (lo_e <= x).all() and (x <= hi_e).all()
    packed = quantize_4bit(x, lo, hi, bucket)
    assert packed.dtype == torch.uint8 and packed.numel() == (n + 1) // 2
    x_hat = dequantize_4bit(packed, lo, hi, n, bucket)
    half_step = (hi_e - lo_e) / LEVELS / 2
    # half a grid step, plus fp32 rounding of the grid arithmetic (a few ulps of the magnitudes involved)
    slack = 4 * torch.finfo(torch.float32).eps * (x.abs() + lo_e.abs() + hi_e.abs())
    assert ((x_hat - x).abs() <= half_step + slack).all()


def test_codes_hit_both_ends_without_overflow():
    x = torch.tensor([-1.0, 1.0] + [0.3] * 62)
    lo, hi = bucket_ranges(x, 64)
    codes = unpack_nibbles(quantize_4bit(x, lo, hi, 64), 64)
    assert codes[0] == 0 and codes[1] == LEVELS and int(codes.max()) <= LEVELS


def test_tiny_range_bucket_decodes_to_lo_without_nan():
    """A range so small that 1/step overflows: (x - lo) * inf would make NaN codes (whose conversion to
    uint8 is undefined); such a bucket decodes to lo instead, off by less than its range."""
    x = torch.zeros(130)
    x[3], x[5], x[70] = 3e-38, 2e-38, -3e-38  # normal fp32 values, range / 15 below the smallest normal
    lo, hi = bucket_ranges(x, 64)
    assert ((hi.float() - lo.float()) / LEVELS < torch.finfo(torch.float32).tiny).all()
    codes = unpack_nibbles(quantize_4bit(x, lo, hi, 64), 130)
    assert codes.eq(0).all()
    x_hat = dequantize_4bit(quantize_4bit(x, lo, hi, 64), lo, hi, 130, 64)
    assert torch.equal(x_hat, _per_entry(lo.float(), 130, 64))
    assert ((x_hat - x).abs() <= 15 * torch.finfo(torch.float32).tiny).all()


@pytest.mark.parametrize("value", [0.0, 2.5, -(2.0**-70)])  # bf16-representable: min == max exactly
def test_zero_range_bucket_decodes_exactly(value):
    x = torch.full((130,), value)
    lo, hi = bucket_ranges(x, 64)
    x_hat = dequantize_4bit(quantize_4bit(x, lo, hi, 64), lo, hi, 130, 64)
    assert torch.isfinite(x_hat).all()
    assert torch.equal(lo, hi) and torch.equal(x_hat, x)


def test_nibble_order_and_inverse():
    codes = torch.tensor([1, 2, 3, 4, 15], dtype=torch.uint8)
    packed = pack_nibbles(codes)
    assert packed.tolist() == [0x12, 0x34, 0xF0]  # entry 2i in the high nibble, odd tail padded with 0
    assert torch.equal(unpack_nibbles(packed, 5), codes)
    rand = torch.randint(0, 16, (1000,), dtype=torch.uint8)
    assert torch.equal(unpack_nibbles(pack_nibbles(rand), 1000), rand)


@pytest.mark.parametrize("down", [True, False])
def test_outward_bf16_rounding_equals_nextafter_after_a_cast(down):
    """The bit-level rounding against the obvious definition, subnormals, signed zeros and huge values included."""
    from slimopt.ops.quant import _round_bf16

    torch.manual_seed(0)
    x = torch.cat([torch.randn(5000) * 1e-3, torch.randn(5000).bfloat16().float(), torch.zeros(3), -torch.zeros(3),
                   torch.tensor([3e38, -3e38, 1e-40, -1e-40, 1.0, -1.0])])
    y = x.to(torch.bfloat16)
    wrong_side = y.float() > x if down else y.float() < x
    expected = torch.where(wrong_side, torch.nextafter(y, torch.full_like(y, -math.inf if down else math.inf)), y)
    got = _round_bf16(x, down)
    assert torch.equal(got.view(torch.int16), expected.view(torch.int16))
    assert ((got.float() <= x) if down else (got.float() >= x)).all()
