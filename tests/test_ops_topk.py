"""Block-wise Top-K (slimopt.ops.topk) against a slow loop over blocks."""

from __future__ import annotations

import math

import pytest
import torch

from slimopt.ops.topk import block_starts, block_topk, block_topk_fast, k_for, topk_blocks


def slow_block_topk(x: torch.Tensor, block_size: int, k_init: float) -> list[int]:
    """One block at a time: stable sort by decreasing |x| (so ties go to the lower index)."""
    out: list[int] = []
    for start in range(0, x.numel(), block_size):
        block = x[start:start + block_size].double()
        k = max(1, math.ceil(round(block.numel() * k_init, 9)))
        order = torch.sort(-block.abs(), stable=True).indices[:k]
        out += sorted(order.tolist())
    return out


@pytest.mark.parametrize("n,block,k_init", [(1, 256, 0.01), (255, 256, 0.01), (1000, 256, 0.01),
                                            (4096, 512, 0.05), (777, 100, 0.3), (300, 64, 1.0)])
def test_matches_slow_reference(n, block, k_init):
    torch.manual_seed(n)
    x = torch.randn(n)
    rel = block_topk(x, block, k_init)
    assert rel.tolist() == slow_block_topk(x, block, k_init)
    layout = topk_blocks(n, block, k_init)
    assert rel.numel() == layout.k_total
    assert int(rel.max()) < block  # block-relative


def test_ties_go_to_the_lower_index():
    x = torch.tensor([1.0, -2.0, 2.0, 2.0, -2.0, 0.5, 2.0, 1.0])  # five entries tie at |2|
    assert block_topk(x, 8, 3 / 8).tolist() == [1, 2, 3]
    bf16_like = torch.randn(2000).to(torch.bfloat16).float()  # few distinct values: many ties
    assert block_topk(bf16_like, 500, 0.02).tolist() == slow_block_topk(bf16_like, 500, 0.02)


def test_k_per_block():
    assert k_for(4096, 0.01) == 41 and k_for(100, 0.07) == 7 and k_for(3, 0.01) == 1 and k_for(5, 1.0) == 5
    layout = topk_blocks(10_000, 4096, 0.01)
    assert (layout.full_blocks, layout.k_block, layout.tail, layout.k_tail) == (2, 41, 1808, 19)
    starts = block_starts(layout)
    assert starts[:41].eq(0).all() and starts[41:82].eq(4096).all() and starts[82:].eq(8192).all()


def test_index_math_beyond_int32():
    """A tensor above 2**31 entries: the layout is Python-int arithmetic and indices stay block-relative."""
    n = 2**31 + 12_345
    layout = topk_blocks(n, 32768, 0.01)
    assert layout.full_blocks * layout.block_size + layout.tail == n
    assert layout.k_total == layout.full_blocks * 328 + math.ceil(12_345 * 0.01)


@pytest.mark.parametrize("n,block,k_init", [(8192, 4096, 0.01), (65536, 32768, 0.01), (5000, 1024, 0.02),
                                            (4096, 4096, 0.3), (3000, 1000, 0.01)])
@pytest.mark.parametrize("data", ["gauss", "bf16_ties", "heavy_tail", "sorted", "constant"])
def test_fast_selection_equals_reference(n, block, k_init, data):
    """The group prefilter must give exactly block_topk's answer, ties and adversarial layouts included
    (sorted data puts every large entry in a few groups; constant data ties everything)."""
    torch.manual_seed(n)
    x = {"gauss": lambda: torch.randn(n), "bf16_ties": lambda: torch.randn(n).bfloat16().float(),
         "heavy_tail": lambda: torch.randn(n) ** 5, "sorted": lambda: torch.randn(n).sort().values,
         "constant": lambda: torch.full((n,), -0.5)}[data]()
    assert torch.equal(block_topk_fast(x, block, k_init), block_topk(x, block, k_init))
