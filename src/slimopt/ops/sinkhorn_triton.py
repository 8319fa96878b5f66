"""Triton kernels for SR-Sinkhorn scaled updates of many matrices at once (the GPU path beside
``slimopt.ops.normalize``'s torch functions).

For k matrices (W_t, G_t), m_t x n_t, one launch per half-step for all of them, then one for the update:

    W_t <- W_t * decay + alpha * diag(r_t) G_t diag(c_t),     (r_t, c_t) = SR-Sinkhorn scales of G_t (L rounds)

SR-Sinkhorn's iterates are diag(r) G diag(c) (``normalize.sinkhorn_scales``), so its L rounds need only the
squared scales R = r^2, C = c^2, each half-step a weighted sum of squares read straight from G, with no copy
of G anywhere (no stack, no G*G):

    row pass     R_i = n / (sum_j G_ij^2 C_j + f)         f = eps^2 mean(G^2), kept >= n 1e-37
    column pass  C_j = m / (sum_i G_ij^2 R_i + eps^2)

as ``normalize.sinkhorn_scales_stacked`` computes them (floors added, not clamped). The first row pass takes
C = 1 and stores the raw sums S_i = sum_j G_ij^2; the first column pass derives f from their total (every
program of a matrix sums the m values itself, in the same order: the same f, bit for bit, no extra launch)
and the first R_i = n / (S_i + f) on the fly, and stores f for the later row passes.

Tables (built once per list of matrices; ``meta`` holds sizes only, the addresses are tables of their
own, ``tables.AddressTable``, uploaded only when they change): per matrix its storage rows a, columns b and
row stride (the kernels read storage rows contiguously, so a GPT-2 Conv1D weight, whose (out, in) view is the
transpose of its storage, is the same matrix with the Sinkhorn rows on the storage columns: ``transposed``,
a constexpr of the launch; a list with both storage orders is two ``SinkhornScaledAdd``), the offsets of its R and C
in one flat fp32 vector, and the first program of each of its two tilings: blocks of storage rows (the
program owns them and loops over the columns) and blocks of storage columns (it owns those and loops over
the rows). Every sum has one owner, which adds its tile's partial sums in a fixed order: no atomics, the same
result every run.

==============================  ==================================================================  ========
kernel                          reads and writes, per element of G (s_g bytes: 4 fp32, 2 bf16)      launches
==============================  ==================================================================  ========
``_sinkhorn_half_step_kernel``  reads G (s_g); per row or column, reads the other scale vector and    2L
                                writes its own (4 B each, L2); per matrix a floor and an int8 flag
``_scaled_add_kernel``          reads G (s_g) and W (s_p), writes W (s_p); reads R and C (L2)         1
==============================  ==================================================================  ========

Bytes per element at L = 5: 10 s_g + s_g + 2 s_p = 52 B for fp32 G and W, 26 B for bf16 (the torch stacked
path: 84 B and ~41 launches per stack). What would cut them further, and why it is not done:

* the cache. The 2L passes re-read G. Run over groups of matrices whose gradients fit in L2 (H100 50 MB, H200
  60 MB; one 2048 x 5461 fp32 gradient is 45 MB), each group's 2L + 1 passes before the next group's, all but
  the first pass would read G from L2: s_g + 2 s_p + s_g from HBM, 16 B fp32 (8 B bf16), under fused AdamW's
  28 (14): a real GPU within 1x. At 1.34B (1.2B in matrices) that is ~120 groups of 40 MB of fp32 gradients,
  ~1,300 launches: ~8 ms of launch overhead eagerly against ~13 ms of HBM reads saved (if every re-read hits
  L2, which the hardware does not promise: two L2 partitions, other traffic, replacement), and 10x the step's
  launch budget (150). Not done: it pays only under a CUDA graph (which this step allows: no host sync, fixed
  tables and buffers) and needs a GPU to measure the hit rate. The code allows it: one ``SinkhornScaledAdd``
  per group of matrices, launched group after group.
* fewer passes. L = 5 is the paper's. A round could be one pass if a program computed its rows' R and then
  added those rows' column partial sums (reduced in a fixed order by a small launch), but that reads its rows
  twice, and they do not stay on chip between the two reads (16 rows of 5461 fp32 are 350 KB): the second
  read would come from HBM again at these widths.

Arithmetic: fp32 throughout (squares of bf16 G widened first), division and square root correctly rounded
(``div_rn``, ``sqrt_rn``), and no FMA contraction (``enable_fp_fusion=False``): every operation rounds as
written, on a GPU as under the interpreter, so a GPU and the interpreter differ only in the order of the
tiles' reductions (``tl.sum``). The sums run in another order than the torch paths' (``mv``, batched
products), so results match those to a few ulps, not bit for bit. A bf16 W is computed in fp32 and rounded to
nearest once (on the bits: the interpreter's cast truncates).

Non-finite: a NaN/inf in G, or squares that overflow fp32, makes that matrix's C non-finite (a NaN in f or R
reaches every column). The last column pass sets the matrix's flag (stores of one value, reset by the first
row pass), and the update leaves a flagged matrix exactly as it was, decay included. ``step`` returns the
flags; nothing is read back to the host.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
import torch
from torch import Tensor

from .tables import AddressTable, upload
from .triton_helpers import EXACT, POINTER_KINDS, bf16_nearest_finite, pow2, typed_pointer
from .triton_support import tl, triton
from .weight_decay import decay_factor

__all__ = ["SinkhornScaledAdd", "storage_order"]

_META = 8  # int64 per matrix: a, b, row stride, R offset, C offset, first row-block program, first column-block one
# Tiles on a GPU (4 warps): programs that own blocks of 8 storage rows read 256 columns at a time (1 KB per row
# and load); programs that own blocks of 128 storage columns read 32 rows at a time. 16 to 32 fp32 accumulators
# per thread.
_OWN_ROWS, _ROW_STEP = 8, 256
_WALK_ROWS, _OWN_COLS = 32, 128
# Under the interpreter (CPU tensors, tests) each program costs ~50 ms whatever its tile: fewer, taller ones.
_OWN_ROWS_INTERPRETED, _ROW_STEP_INTERPRETED = 64, 128
_WALK_ROWS_INTERPRETED, _OWN_COLS_INTERPRETED = 64, 128
_VECTOR_BLOCK = 256  # lanes of the first column pass's sum of S
PARAM_DTYPES = (torch.float32, torch.bfloat16)
GRAD_DTYPES = (torch.float32, torch.bfloat16, torch.float16)


def storage_order(param: Tensor, grad: Tensor) -> tuple[bool, int] | None:
    """``(transposed, row_stride)`` of a non-empty (m, n) view whose storage rows the kernels can read
    contiguously, its gradient laid out the same way, or None. ``transposed``: the view's rows are its
    storage's columns (strides (1, s), a GPT-2 Conv1D weight seen as (out, in))."""
    if param.ndim != 2 or param.numel() == 0 or param.stride() != grad.stride() or param.shape != grad.shape:
        return None
    m, n = param.shape
    s0, s1 = param.stride()
    if s1 == 1 and (m == 1 or s0 >= n):
        return False, max(s0, n)
    if s0 == 1 and (n == 1 or s1 >= m):
        return True, max(s1, m)
    return None


if triton is not None:

    @triton.jit
    def _weights(scales, lanes, ok, n_f, row_floor, FIRST: tl.constexpr):
        """The other scale vector at ``lanes``, the weights of this half-step's sums of squares; in the first column
        pass the first R = n / (S + f), from the raw row sums S the first row pass stored."""
        w = tl.load(scales + lanes, mask=ok, other=0.0)
        if FIRST:
            w = tl.div_rn(n_f, w + row_floor)
        return w

    @triton.jit
    def _sinkhorn_half_step_kernel(meta_ptr, grad_ptrs, programs_ptr, scales_ptr, floors_ptr, flags_ptr, eps_sq,
                                   G_KIND: tl.constexpr, ROWS: tl.constexpr, TRANSPOSED: tl.constexpr,
                                   FIRST: tl.constexpr, LAST: tl.constexpr, BLOCK_A: tl.constexpr,
                                   BLOCK_B: tl.constexpr, BLOCK_V: tl.constexpr, META: tl.constexpr):
        """One half-step of one block of one matrix: ROWS, R_i = n / (sum_j G_ij^2 C_j + f) for a block of
        Sinkhorn rows; else C_j = m / (sum_i G_ij^2 R_i + eps^2) for a block of columns.

        Per element of G: reads G once (s_g bytes). Per row/column: reads the other scale vector (4 B, the
        same values for every block: L2) and writes its own (4 B). FIRST (row pass): C = 1, stores the raw
        sums S and resets the matrix's flag. FIRST (column pass): derives f from sum(S) (m more reads per
        program, L2) and R = n / (S + f), stores f. LAST (column pass of the last round): stores c = sqrt(C)
        and flags the matrix when a c is not finite."""
        pid = tl.program_id(0)
        mat = tl.load(programs_ptr + pid).to(tl.int64)
        row = meta_ptr + mat * META
        a = tl.load(row)
        b = tl.load(row + 1)
        lda = tl.load(row + 2)
        if TRANSPOSED:  # the Sinkhorn rows are the storage columns
            m = b
            n = a
        else:
            m = a
            n = b
        if ROWS:
            out_off = tl.load(row + 3)
            in_off = tl.load(row + 4)
            target = n.to(tl.float32)
        else:
            out_off = tl.load(row + 4)
            in_off = tl.load(row + 3)
            target = m.to(tl.float32)
        n_f = n.to(tl.float32)
        g = typed_pointer(tl.load(grad_ptrs + mat), G_KIND)
        floor = eps_sq
        row_floor = eps_sq  # (set below where it is read: the first column pass)
        if FIRST and not ROWS:  # f = eps^2 sum(S) / (m n), >= n 1e-37, the same in every program of the matrix
            lanes = tl.arange(0, BLOCK_V)
            partial = tl.zeros((BLOCK_V,), dtype=tl.float32)
            for s0 in range(0, m, BLOCK_V):
                partial += tl.load(scales_ptr + in_off + s0 + lanes, mask=s0 + lanes < m, other=0.0)
            total = tl.sum(partial, axis=0)
            row_floor = total * tl.div_rn(eps_sq, (m * n).to(tl.float32))
            least = n_f * 1e-37
            row_floor = tl.where(row_floor < least, least, row_floor)  # a NaN total stays NaN: flagged below
        elif ROWS and not FIRST:
            floor = tl.load(floors_ptr + mat)
        if ROWS != TRANSPOSED:  # this half-step's sums run along storage rows: the program owns storage rows
            block = pid - tl.load(row + 5)
            idx = block * BLOCK_A + tl.arange(0, BLOCK_A)
            idx_ok = idx < a
            offs_rows = idx.to(tl.int64)[:, None] * lda
            acc = tl.zeros((BLOCK_A, BLOCK_B), dtype=tl.float32)
            for j0 in range(0, b, BLOCK_B):
                cols = j0 + tl.arange(0, BLOCK_B)
                cols_ok = cols < b
                x = tl.load(g + offs_rows + cols[None, :], mask=idx_ok[:, None] & cols_ok[None, :],
                            other=0.0).to(tl.float32)
                if FIRST and ROWS:
                    acc += x * x
                else:
                    acc += (x * x) * _weights(scales_ptr + in_off, cols, cols_ok, n_f, row_floor, FIRST)[None, :]
            sums = tl.sum(acc, axis=1)
        else:  # the program owns storage columns and walks down the rows
            block = pid - tl.load(row + 6)
            idx = block * BLOCK_B + tl.arange(0, BLOCK_B)
            idx_ok = idx < b
            acc = tl.zeros((BLOCK_A, BLOCK_B), dtype=tl.float32)
            for i0 in range(0, a, BLOCK_A):
                rows = i0 + tl.arange(0, BLOCK_A)
                rows_ok = rows < a
                x = tl.load(g + rows.to(tl.int64)[:, None] * lda + idx[None, :],
                            mask=rows_ok[:, None] & idx_ok[None, :], other=0.0).to(tl.float32)
                if FIRST and ROWS:
                    acc += x * x
                else:
                    acc += (x * x) * _weights(scales_ptr + in_off, rows, rows_ok, n_f, row_floor, FIRST)[:, None]
            sums = tl.sum(acc, axis=0)
        if FIRST and ROWS:
            out = sums
            tl.store(flags_ptr + mat, 0, mask=block == 0)  # read by the update; set by the last column pass
        else:
            out = tl.div_rn(target, sums + floor)
            if LAST and not ROWS:  # the column scales the update applies, c = sqrt(C) (no pass reads C after)
                out = tl.sqrt_rn(out)
        tl.store(scales_ptr + out_off + idx, out, mask=idx_ok)
        if FIRST and not ROWS:
            tl.store(floors_ptr + mat, row_floor, mask=block == 0)
        if LAST and not ROWS:
            bad = tl.sum((idx_ok & ~(tl.abs(out) < float("inf"))).to(tl.int32), axis=0)  # NaN fails < too
            tl.store(flags_ptr + mat, 1, mask=bad > 0)

    @triton.jit
    def _scaled_add_kernel(meta_ptr, param_ptrs, grad_ptrs, programs_ptr, scales_ptr, floors_ptr, flags_ptr,
                           neg_step, decay, lr_ptr, scale, weight_decay, P_KIND: tl.constexpr,
                           G_KIND: tl.constexpr, TRANSPOSED: tl.constexpr, RAW_ROWS: tl.constexpr,
                           DECAY: tl.constexpr, LR_FROM_PTR: tl.constexpr, BLOCK_A: tl.constexpr,
                           BLOCK_B: tl.constexpr, META: tl.constexpr):
        """W <- W * decay + alpha * (G_ij r_i) c_j for a block of storage rows of one matrix, r = sqrt(R) (R as
        the last row pass stored it), c as the last column pass stored it, alpha = -lr * scale; a flagged
        matrix is left alone (every load and store masked).

        Per element: reads G (s_g) and W (s_p), writes W (s_p). Per row and column: reads r and c (4 B each,
        c again for every row block: L2). RAW_ROWS (L = 1): R holds the raw sums S, r = sqrt(n / (S + f)).
        LR_FROM_PTR: the lr is a 0-d fp32 tensor read here (alpha = -(lr * scale), decay = 1 - alpha' wd in
        fp32, as torch computes them from a tensor lr); else ``neg_step`` and ``decay`` come from the host."""
        pid = tl.program_id(0)
        mat = tl.load(programs_ptr + pid).to(tl.int64)
        row = meta_ptr + mat * META
        a = tl.load(row)
        b = tl.load(row + 1)
        lda = tl.load(row + 2)
        block = pid - tl.load(row + 5)
        live_rows = tl.where(tl.load(flags_ptr + mat) != 0, 0, a)  # a flagged matrix: nothing read or written
        if TRANSPOSED:
            u_off = tl.load(row + 4)  # storage rows carry C, storage columns R
            v_off = tl.load(row + 3)
            n_f = a.to(tl.float32)
        else:
            u_off = tl.load(row + 3)
            v_off = tl.load(row + 4)
            n_f = b.to(tl.float32)
        if LR_FROM_PTR:
            step = tl.load(lr_ptr).to(tl.float32) * scale
            alpha = -step
            factor = 1.0 - step * weight_decay
        else:
            alpha = neg_step
            factor = decay
        if RAW_ROWS:
            row_floor = tl.load(floors_ptr + mat)
        idx = block * BLOCK_A + tl.arange(0, BLOCK_A)
        idx_ok = idx < live_rows
        su = tl.load(scales_ptr + u_off + idx, mask=idx_ok, other=0.0)
        if not TRANSPOSED:  # storage rows carry R: once per program
            if RAW_ROWS:
                su = tl.div_rn(n_f, su + row_floor)
            su = tl.sqrt_rn(su)
        if TRANSPOSED:
            su = su * alpha  # the columns' scale carries the step, as in add_scaled_
        p = typed_pointer(tl.load(param_ptrs + mat), P_KIND)
        g = typed_pointer(tl.load(grad_ptrs + mat), G_KIND)
        offs_rows = idx.to(tl.int64)[:, None] * lda
        for j0 in range(0, b, BLOCK_B):
            cols = j0 + tl.arange(0, BLOCK_B)
            cols_ok = cols < b
            sv = tl.load(scales_ptr + v_off + cols, mask=cols_ok, other=0.0)
            if TRANSPOSED:  # storage columns carry R: per tile
                if RAW_ROWS:
                    sv = tl.div_rn(n_f, sv + row_floor)
                sv = tl.sqrt_rn(sv)
            if not TRANSPOSED:
                sv = sv * alpha
            ok = idx_ok[:, None] & cols_ok[None, :]
            offs = offs_rows + cols[None, :]
            x = tl.load(g + offs, mask=ok, other=0.0).to(tl.float32)
            w = tl.load(p + offs, mask=ok, other=0.0)
            update = (x * su[:, None]) * sv[None, :]
            if DECAY:
                new = w.to(tl.float32) * factor + update
            else:
                new = w.to(tl.float32) + update
            if P_KIND == 1:
                new = bf16_nearest_finite(new)
            tl.store(p + offs, new.to(w.dtype), mask=ok)


class SinkhornScaledAdd:
    """``W_t <- W_t * decay - lr * scale * SR-Sinkhorn(G_t, iters)`` for k matrices of one device, one parameter
    dtype (fp32 or bf16), one gradient dtype and one storage order, in 2 iters + 1 launches whatever k.

    Built once per list of matrices (``matrices``: per matrix (m, n, row stride) of its (m, n) view,
    stored as ``storage_order`` says; ``transposed`` as it returns): the size tables, the program tables
    and the fp32 scale vectors (sum of m + n), floors and flags (k each) live here, reused every step. The
    parameters' and gradients' addresses are tables of their own, uploaded again only when they change. No host
    sync: ``step`` returns the flags of the matrices it left alone (a NaN/inf in G, or squares overflowing).
    """

    def __init__(self, matrices: Sequence[tuple[int, int, int]], *, transposed: bool, device: torch.device | str,
                 param_dtype: torch.dtype, grad_dtype: torch.dtype) -> None:
        if triton is None:
            raise RuntimeError("SinkhornScaledAdd needs Triton (pip install triton)")
        if param_dtype not in PARAM_DTYPES or grad_dtype not in GRAD_DTYPES:
            raise ValueError(f"SinkhornScaledAdd takes fp32 or bf16 parameters and fp32, bf16 or fp16 gradients, "
                             f"got param_dtype={param_dtype} and grad_dtype={grad_dtype}")
        if not matrices or min(m * n for m, n, _ in matrices) < 1:
            raise ValueError("SinkhornScaledAdd takes a non-empty list of non-empty matrices")
        self.device = torch.device(device)
        self.count, self.transposed = len(matrices), bool(transposed)
        self.p_kind, self.g_kind = POINTER_KINDS[param_dtype], POINTER_KINDS[grad_dtype]
        if self.device.type == "cuda":
            self.row_tile, self.col_tile = (_OWN_ROWS, _ROW_STEP), (_WALK_ROWS, _OWN_COLS)
        else:
            self.row_tile = (_OWN_ROWS_INTERPRETED, _ROW_STEP_INTERPRETED)
            self.col_tile = (_WALK_ROWS_INTERPRETED, _OWN_COLS_INTERPRETED)
        dims = np.array([(n, m) if transposed else (m, n) for m, n, _ in matrices], dtype=np.int64)  # storage a, b
        sizes = np.array([(m, n) for m, n, _ in matrices], dtype=np.int64)
        a_max, b_max = int(dims[:, 0].max()), int(dims[:, 1].max())
        # small matrices (tests, toy models) take smaller tiles; at 1B sizes the caps
        self.row_tile = (min(self.row_tile[0], pow2(a_max)), min(self.row_tile[1], pow2(b_max)))
        self.col_tile = (min(self.col_tile[0], pow2(a_max)), min(self.col_tile[1], pow2(b_max)))
        row_blocks = -(-dims[:, 0] // self.row_tile[0])
        col_blocks = -(-dims[:, 1] // self.col_tile[1])
        meta = np.zeros((self.count, _META), dtype=np.int64)
        meta[:, 0:2] = dims
        meta[:, 2] = [s for _, _, s in matrices]
        lengths = sizes.sum(axis=1)
        meta[:, 3] = np.cumsum(lengths) - lengths  # R at r_off (m entries), C right after it (n)
        meta[:, 4] = meta[:, 3] + sizes[:, 0]
        meta[:, 5] = np.cumsum(row_blocks) - row_blocks
        meta[:, 6] = np.cumsum(col_blocks) - col_blocks
        self.meta = upload(meta, self.device)
        indices = np.arange(self.count, dtype=np.int32)
        self.row_programs = upload(np.repeat(indices, row_blocks), self.device)
        self.col_programs = upload(np.repeat(indices, col_blocks), self.device)
        self.row_grid, self.col_grid = (int(row_blocks.sum()),), (int(col_blocks.sum()),)
        self.scales = torch.empty(int(lengths.sum()), dtype=torch.float32, device=self.device)
        self.floors = torch.empty(self.count, dtype=torch.float32, device=self.device)
        self.flags = torch.zeros(self.count, dtype=torch.int8, device=self.device)
        self.left_alone = self.flags.view(torch.bool)  # made once: a view is a dispatched op
        self.vector_block = min(_VECTOR_BLOCK, pow2(int(sizes[:, 0].max())))
        self._params = AddressTable(self.device)
        self._grads = AddressTable(self.device)

    def step(self, params: Sequence[Tensor], grads: Sequence[Tensor], iters: int, lr: float | Tensor,
             scale: float, weight_decay: float, eps: float) -> Tensor:
        """One step of every matrix, in place. ``params`` and ``grads``: the k (m, n) views, in the order and
        storage orders the tables were built for. ``lr`` a number or a 0-d fp32 tensor on the device (read by the
        update kernel: no sync). Returns the flags (bool, (k,), on the device; valid until the next ``step``)."""
        if len(params) != self.count or len(grads) != self.count:
            raise ValueError(f"SinkhornScaledAdd.step: {len(params)} parameters and {len(grads)} gradients, the "
                             f"tables have {self.count}")
        if self.transposed:  # the tables point at storage: hand over the storage-ordered views (same addresses)
            params, grads = [p.mT for p in params], [g.mT for g in grads]
        grad_table = self._grads(grads)
        eps_sq = float(eps) * float(eps)
        for i in range(iters):
            for rows in (True, False):
                contiguous = rows != self.transposed
                tile = self.row_tile if contiguous else self.col_tile
                _sinkhorn_half_step_kernel[self.row_grid if contiguous else self.col_grid](
                    self.meta, grad_table, self.row_programs if contiguous else self.col_programs, self.scales,
                    self.floors, self.flags, eps_sq, G_KIND=self.g_kind, ROWS=rows, TRANSPOSED=self.transposed,
                    FIRST=i == 0, LAST=i == iters - 1, BLOCK_A=tile[0], BLOCK_B=tile[1],
                    BLOCK_V=self.vector_block, META=_META, **EXACT)
        lr_from_ptr = isinstance(lr, Tensor) and lr.device == self.device
        if lr_from_ptr:
            lr_ptr, neg_step, decay = lr, 0.0, 1.0
        else:
            value = float(lr)  # a number (or a tensor on another device: a CPU scalar, no device sync)
            lr_ptr, neg_step, decay = self.floors, -(value * scale), decay_factor(value, weight_decay, scale)
        _scaled_add_kernel[self.row_grid](
            self.meta, self._params(params), grad_table, self.row_programs, self.scales, self.floors, self.flags,
            neg_step, decay, lr_ptr, float(scale), float(weight_decay), P_KIND=self.p_kind, G_KIND=self.g_kind,
            TRANSPOSED=self.transposed, RAW_ROWS=iters == 1, DECAY=weight_decay != 0,
            LR_FROM_PTR=lr_from_ptr, BLOCK_A=self.row_tile[0], BLOCK_B=self.row_tile[1], META=_META, **EXACT)
        return self.left_alone
