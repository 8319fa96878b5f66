"""Block-wise Top-K by magnitude with block-relative indices.

A 1-D tensor of length n is cut into blocks of ``block_size`` entries; the last block may be shorter.
A full block keeps ``k_block = ceil(block_size * k_init)`` entries, the short tail block
``ceil(tail * k_init)``; every block keeps at least one. Entries are ranked by ``|x|`` and equal
magnitudes by position (the lower index wins), so the selected *set* is fully determined by the input;
within a block the indices come out in ascending order. Indices are relative to the start of their
block, which keeps them below 2**15 (int16 in the window) whatever the size of the tensor.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass

import torch
from torch import Tensor

__all__ = ["MAX_BLOCK_SIZE", "TopKBlocks", "block_starts", "block_topk", "block_topk_fast", "k_for", "topk_blocks"]

MAX_BLOCK_SIZE = 1 << 15  # block-relative indices 0..32767 fit int16


def k_for(length: int, k_init: float) -> int:
    """Entries kept from a block of ``length``: ceil(length * k_init), at least 1, at most length."""
    # round() first so that e.g. 100 * 0.07 = 7.000000000000001 still gives 7
    return max(1, min(length, math.ceil(round(length * k_init, 9))))


@dataclass(frozen=True)
class TopKBlocks:
    """How a 1-D tensor of ``n`` entries is cut into Top-K blocks."""

    n: int
    block_size: int
    k_block: int  # entries kept per full block
    tail: int  # length of the short last block (0 if n is a multiple of block_size)
    k_tail: int  # entries kept from it (0 if there is none)

    @property
    def full_blocks(self) -> int:
        return self.n // self.block_size

    @property
    def k_total(self) -> int:
        return self.full_blocks * self.k_block + self.k_tail


def topk_blocks(n: int, block_size: int, k_init: float) -> TopKBlocks:
    """How ``n`` entries are cut into Top-K blocks of ``block_size``, keeping ``k_init`` of each."""
    tail = n % block_size
    return TopKBlocks(n, block_size, k_for(block_size, k_init), tail, k_for(tail, k_init) if tail else 0)


def block_starts(blocks: TopKBlocks, device: torch.device | str = "cpu") -> Tensor:
    """int64 offset of the block each of the ``k_total`` selected entries belongs to (length k_total)."""
    column = torch.arange(blocks.k_total, device=device)
    return torch.div(column, blocks.k_block, rounding_mode="floor").clamp_(max=blocks.full_blocks) \
        * blocks.block_size


def _unique_keys(magnitude: Tensor, column: Tensor, width: int) -> Tensor:
    """int64 keys that order like |x| and, among equal |x|, put the lower column first.

    ``magnitude`` is |x| (fp32, non-negative): its int32 bits order like the values themselves."""
    return magnitude.view(torch.int32).to(torch.int64).mul_(width).add_((width - 1) - column)


def _column_of(keys: Tensor, width: int) -> Tensor:
    return (width - 1) - keys.remainder(width)


def _topk_rows(rows: Tensor, k: int) -> Tensor:
    """Ascending column indices of the k largest |rows| per row, ties to the lower column."""
    width = rows.shape[1]
    keys = _unique_keys(rows.abs(), torch.arange(width, device=rows.device), width)
    top = keys.topk(k, dim=1, sorted=False).values
    return _column_of(top, width).sort(dim=1).values


def block_topk(x: Tensor, block_size: int, k_init: float) -> Tensor:
    """Block-relative int64 indices (length ``k_total``) of each block's top entries of the fp32 ``x``."""
    return _block_topk(x, block_size, k_init, _topk_rows)


def _block_topk(x: Tensor, block_size: int, k_init: float, full_rows: Callable[[Tensor, int], Tensor]) -> Tensor:
    """``block_topk`` with ``full_rows(rows, k)`` ranking the full blocks (the short tail block: ``_topk_rows``)."""
    if x.dtype != torch.float32:
        x = x.float()
    blocks = topk_blocks(x.numel(), block_size, k_init)
    n_full = blocks.full_blocks * block_size
    parts = []
    if blocks.full_blocks:
        parts.append(full_rows(x[:n_full].view(-1, block_size), blocks.k_block).view(-1))
    if blocks.tail:
        parts.append(_topk_rows(x[n_full:].view(1, -1), blocks.k_tail).view(-1))
    return torch.cat(parts) if len(parts) > 1 else parts[0]


# --------------------------------------------------------------------------------------------------
# The same selection, cheaper on CPU: most of a block can be ruled out before any ranking.
#
# Cut a block into groups of G entries (strided) and rank the group maxima; L is the k-th largest.
# The top k groups each hold an entry >= L, so the k-th largest |x| is >= L, and every entry >= L sits
# in a group whose maximum is >= L. Unless another group ties with the k-th at L, those are the top k
# groups: the top k entries, ties included, lie among their entries, and ranking just those gives
# exactly ``block_topk``'s answer. We keep k + 1 groups (one spare candidate group is harmless); if the
# (k+1)-th maximum equals the k-th, more groups may reach L and the block is ranked in full.
# G ~ sqrt(B/k) balances the two small rankings (B/G group maxima, k*G candidates).


def _topk_rows_by_groups(rows: Tensor, k: int) -> Tensor:
    n_rows, width = rows.shape
    group = 1 << max(1, round(math.log2(max(width / k, 1)) / 2))
    if width % group or width // group < 2 * k:  # dense selections or odd widths: rank in full
        return _topk_rows(rows, k)
    # group j of a block is the strided set {j, j + S, j + 2S, ...}: the maxima then reduce over
    # contiguous rows of length S, which vectorises far better than many tiny contiguous groups
    stride = width // group
    groups = rows.view(n_rows, group, stride)
    # max |x| per group as max(max x, -min x): two reductions cost less than writing |x| and reducing it
    group_max = torch.maximum(groups.amax(dim=1), groups.amin(dim=1).neg_())
    # Both rankings below run on the int32 bits of magnitudes, which order like the values (and cost
    # ~15% less in topk than fp32, whose comparisons check for NaN); the sign bit is cleared because a
    # group of zeros may report its maximum as -0.0.
    group_max = group_max.view(torch.int32).bitwise_and_(0x7FFFFFFF)
    # keep k + 1 groups: an extra candidate group is harmless, and the (k+1)-th maximum tells whether
    # another group ties with the k-th (then more than k + 1 groups may reach L)
    kept_max, kept = group_max.topk(k + 1, dim=1, sorted=False)
    tied = (kept_max == kept_max.amin(dim=1, keepdim=True)).sum(dim=1) > 1
    kept_groups = k + 1
    candidates = groups.gather(2, kept.unsqueeze(1).expand(-1, group, -1)).view(n_rows, group * kept_groups).abs_()
    candidates = candidates.view(torch.int32)
    offsets = torch.arange(0, width, stride, device=rows.device).view(1, group, 1)
    column = (kept.unsqueeze(1) + offsets).view(n_rows, group * kept_groups)
    # rank the candidates by value; topk's order among equal values is unspecified, so a row where a
    # candidate left out equals the k-th kept one is ranked again with the tie rule (lower column wins)
    top, chosen = candidates.topk(k, dim=1, sorted=False)
    tied |= (candidates >= top.amin(dim=1, keepdim=True)).sum(dim=1) > k
    columns = column.gather(1, chosen).sort(dim=1).values
    tied = tied.nonzero().view(-1)
    if tied.numel():
        columns[tied] = _topk_rows(rows[tied], k)
    return columns


def block_topk_fast(x: Tensor, block_size: int, k_init: float) -> Tensor:
    """Same result as ``block_topk`` (tested), ranking only the entries of the k strongest groups."""
    return _block_topk(x, block_size, k_init, _topk_rows_by_groups)
