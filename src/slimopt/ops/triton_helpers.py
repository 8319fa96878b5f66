"""What the Triton kernel modules share: device helpers inlined into their kernels, and host-side constants.

Device helpers (``@triton.jit``, inlined where they are called; no launch of their own):

* ``typed_pointer(raw, KIND)``: an int64 address read from a table, as a pointer of the element type KIND
  (``POINTER_KINDS``: 0 fp32, 1 bf16, 2 fp16; then 3 int16, 4 uint8);
* ``bf16_nearest(x)``: fp32 -> the nearest bf16 (ties to even), returned as an fp32 whose low 16 bits are zero.
  Done on the bits: the interpreter's own fp32 -> bf16 cast truncated (older Triton), and a GPU rounds the
  same way; ``bf16_nearest_finite`` leaves NaN and inf as they are.

Host side: ``EXACT``, the launch options of every kernel whose results tests hold bit-equal to a CPU reference
(no contraction of ``a * b + c`` into an FMA, so each operation rounds as written); ``pow2``, ``float64_bits``
and ``round_fp32``, the numbers the launchers compute from sizes and hyper-parameters.
"""

from __future__ import annotations

import numpy as np
import torch

from .triton_support import tl, triton

__all__ = ["EXACT", "POINTER_KINDS", "bf16_nearest", "bf16_nearest_finite", "float64_bits", "pow2", "round_fp32",
           "typed_pointer"]

# No mul + add -> FMA contraction: each operation rounds as in the torch reference, on a GPU as under the
# interpreter (the kernels are memory-bound: the extra instructions cost nothing measurable)
EXACT = {"enable_fp_fusion": False}
POINTER_KINDS = {torch.float32: 0, torch.bfloat16: 1, torch.float16: 2}  # the float KINDs of typed_pointer


def pow2(x: int) -> int:
    """The least power of two >= ``x`` (1 for x <= 1): tile sizes."""
    return 1 << max(0, int(x) - 1).bit_length()


def float64_bits(x: float) -> int:
    """The IEEE bits of a double as an int64 (Triton passes Python floats as fp32; these pass as i64)."""
    return int(np.array(x, dtype=np.float64).view(np.int64))


def round_fp32(x: float) -> float:
    """``x`` rounded to the nearest fp32, as torch's cast (no torch op: no dispatch, no sync)."""
    return float(np.float32(x))


if triton is not None:

    @triton.jit
    def typed_pointer(raw, KIND: tl.constexpr):
        """An int64 address from a table as a typed pointer: 0 fp32, 1 bf16, 2 fp16, 3 int16, 4 uint8."""
        if KIND == 0:
            out = raw.to(tl.pointer_type(tl.float32))
        elif KIND == 1:
            out = raw.to(tl.pointer_type(tl.bfloat16))
        elif KIND == 2:
            out = raw.to(tl.pointer_type(tl.float16))
        elif KIND == 3:
            out = raw.to(tl.pointer_type(tl.int16))
        else:
            out = raw.to(tl.pointer_type(tl.uint8))
        return out

    @triton.jit
    def bf16_nearest(x):
        """fp32 -> nearest bf16 (ties to even), as an fp32 whose low 16 bits are zero."""
        bits = x.to(tl.int32, bitcast=True)
        rounded = (bits + (32767 + ((bits >> 16) & 1))) & -65536
        return rounded.to(tl.float32, bitcast=True)

    @triton.jit
    def bf16_nearest_finite(x):
        """``bf16_nearest``, with NaN and inf unchanged."""
        return tl.where(tl.abs(x) < float("inf"), bf16_nearest(x), x)
else:  # a CPU-only install: the names exist so that kernel modules import; nothing launches without Triton
    typed_pointer = bf16_nearest = bf16_nearest_finite = None
