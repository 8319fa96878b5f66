"""4-bit asymmetric min-max quantisation in buckets, two codes per byte.

A 1-D tensor is cut into consecutive buckets of ``bucket_size`` entries (the last may be shorter).
Each bucket keeps its minimum ``lo`` and maximum ``hi`` in bf16 and every entry becomes a code in
0..15 on the uniform grid ``lo + code * (hi - lo) / 15``. Codes are packed two per byte: entry ``2i``
in the high nibble of byte ``i``, entry ``2i + 1`` in the low nibble (an odd tail leaves a zero low
nibble).

Two details the original CUDA kernels leave out:

* ``lo`` and ``hi`` are rounded *outwards* to bf16 (down and up), so every entry lies inside the stored
  range and the round trip is off by at most half a grid step. Rounding to nearest could put an entry
  outside the range and its code would have to be clamped, costing up to a whole extra step.
* a bucket whose entries are all equal has step 0: its codes are 0 and it decodes to ``lo`` exactly,
  instead of dividing 0 by 0. So does a bucket whose step is below the smallest normal fp32 (a range
  under ~1.8e-37), where 1/step would overflow to inf and (x - lo) * inf make NaN codes: it decodes to
  ``lo``, off by less than 1.8e-37. Codes are clamped to 0..15 so one can never spill into its
  neighbour.
"""

from __future__ import annotations

import torch
from torch import Tensor

__all__ = [
    "LEVELS",
    "bucket_ranges",
    "dequantize_4bit",
    "num_buckets",
    "pack_nibbles",
    "quantize_4bit",
    "quantize_scratch_size",
    "unpack_nibbles",
]

LEVELS = 15  # 4 bits: codes 0..15, i.e. 15 steps between lo and hi
TINY = torch.finfo(torch.float32).tiny  # the smallest normal fp32: the least step that is quantised


def num_buckets(n: int, bucket_size: int) -> int:
    return -(-n // bucket_size)


def _round_bf16(x: Tensor, down: bool) -> Tensor:
    """``x`` (finite fp32) rounded to bf16 towards -inf (``down``) or +inf, on the bits: dropping the low
    16 bits rounds towards zero, and one more bf16 ulp of magnitude (+2**16 on the int32 view, which
    is sign-magnitude) moves an inexact value away from it. Same as nextafter after a cast, ~2x cheaper."""
    bits = x.view(torch.int32)
    truncated = bits & -65536
    inexact = (bits & 65535) != 0
    away = bits < 0 if down else bits >= 0
    return torch.where(inexact & away, truncated + 65536, truncated).view(torch.float32).to(torch.bfloat16)


def _split(x: Tensor, bucket_size: int) -> tuple[Tensor, Tensor]:
    """``x`` as (full buckets, bucket_size) rows plus the shorter tail bucket (possibly empty)."""
    n_full = x.numel() // bucket_size * bucket_size
    return x[:n_full].view(-1, bucket_size), x[n_full:]


def bucket_ranges(x: Tensor, bucket_size: int) -> tuple[Tensor, Tensor]:
    """Per-bucket (min, max) of the 1-D fp32 tensor ``x``, rounded outwards to bf16."""
    full, tail = _split(x, bucket_size)
    lo, hi = full.amin(dim=1), full.amax(dim=1)  # two passes beat aminmax's one on CPU (~5x)
    if tail.numel():
        tail_lo, tail_hi = tail.amin(), tail.amax()
        lo = torch.cat([lo, tail_lo.view(1)])
        hi = torch.cat([hi, tail_hi.view(1)])
    return _round_bf16(lo, down=True), _round_bf16(hi, down=False)


def _grid(lo: Tensor, hi: Tensor) -> tuple[Tensor, Tensor]:
    """fp32 (lo, step) per bucket."""
    lo32 = lo.float()
    return lo32, (hi.float() - lo32) / LEVELS


def _inverse_step(step: Tensor) -> Tensor:
    """1/step, and 0 (every code 0) for an empty range or a step too small for 1/step to be finite."""
    return torch.where(step >= TINY, step.reciprocal(), 0.0)


def pack_nibbles(codes: Tensor) -> Tensor:
    """uint8 codes 0..15 (length n) -> ceil(n / 2) bytes, even entries in the high nibble."""
    if codes.numel() % 2:
        codes = torch.cat([codes, codes.new_zeros(1)])
    pairs = codes.view(-1, 2)
    return (pairs[:, 0] << 4) | pairs[:, 1]


def unpack_nibbles(packed: Tensor, n: int) -> Tensor:
    """Inverse of ``pack_nibbles``: ``n`` uint8 codes."""
    codes = torch.stack([packed >> 4, packed & 0xF], dim=1).view(-1)
    return codes[:n]


def quantize_4bit(x: Tensor, lo: Tensor, hi: Tensor, bucket_size: int, out: Tensor | None = None,
                  scratch: Tensor | None = None) -> Tensor:
    """Packed 4-bit codes of the 1-D fp32 ``x`` on the grids given by ``bucket_ranges`` (into ``out``).

    ``scratch``: optional fp32 buffer of >= ``quantize_scratch_size(n)`` entries (reused buffers spare
    the page faults that a fresh MiB-sized allocation costs on every call)."""
    n = x.numel()
    lo32, step = _grid(lo, hi)
    inv_step = _inverse_step(step)
    n_full_buckets = n // bucket_size
    full, tail = _split(x, bucket_size)
    if scratch is None:
        scratch = torch.empty(quantize_scratch_size(n), dtype=torch.float32, device=x.device)
    n_even = n + n % 2
    y, packed = scratch[:n_even], scratch[n_even: n_even + n_even // 2]
    y_full, y_tail = _split(y[:n], bucket_size)
    # round to nearest: floor(y + 0.5), clamped to the grid against fp rounding (trunc is the floor of
    # the non-negative clamped values)
    torch.sub(full, lo32[:n_full_buckets, None], out=y_full).mul_(inv_step[:n_full_buckets, None])
    if tail.numel():
        torch.sub(tail, lo32[-1], out=y_tail).mul_(inv_step[-1])
    if n % 2:
        y[n] = 0.0  # the low nibble of an odd tail's last byte
    pairs = y.add_(0.5).clamp_(0, LEVELS).trunc_().view(-1, 2)
    # pack while still fp32 (exact: integers below 256), then one conversion of half as many entries
    torch.add(pairs[:, 1], pairs[:, 0], alpha=16, out=packed)  # even entry in the high nibble
    if out is None:
        out = torch.empty(packed.shape[0], dtype=torch.uint8, device=x.device)
    return out.copy_(packed)


def quantize_scratch_size(n: int) -> int:
    """fp32 entries ``quantize_4bit`` works in for a tensor of ``n`` entries."""
    n_even = n + n % 2
    return n_even + n_even // 2


def dequantize_4bit(packed: Tensor, lo: Tensor, hi: Tensor, n: int, bucket_size: int,
                    out: Tensor | None = None) -> Tensor:
    """The fp32 values (length ``n``) that the packed codes stand for (into ``out``, >= 2 * bytes long)."""
    lo32, step = _grid(lo, hi)
    if out is None:
        out = torch.empty(2 * packed.numel(), dtype=torch.float32, device=packed.device)
    codes = out[: 2 * packed.numel()]
    pairs = codes.view(-1, 2)
    pairs[:, 0].copy_(packed >> 4)
    pairs[:, 1].copy_(packed & 0xF)
    codes = codes[:n]
    n_full_buckets = n // bucket_size
    full, tail = _split(codes, bucket_size)
    full.mul_(step[:n_full_buckets, None]).add_(lo32[:n_full_buckets, None])
    if tail.numel():
        tail.mul_(step[-1]).add_(lo32[-1])
    return codes
