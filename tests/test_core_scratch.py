"""core.scratch.Scratch (the work buffers the hybrids and MicroAdam's torch path reuse) and ops.weight_decay."""

from __future__ import annotations

import math

import pytest
import torch

from slimopt.core.scratch import Scratch
from slimopt.ops.weight_decay import decay_factor


def test_a_buffer_is_reused_until_a_larger_one_is_asked_for():
    scratch = Scratch("cpu")
    a = scratch.empty("work", 100)
    b = scratch.empty("work", 60)
    assert a.numel() == 100 and b.numel() == 60 and b.data_ptr() == a.data_ptr()  # the same storage, reused
    c = scratch.empty("work", 200)
    assert c.numel() == 200 and c.data_ptr() != a.data_ptr()  # grown: a new buffer
    assert scratch.empty("other", 10).data_ptr() != c.data_ptr()  # names are separate buffers
    codes = scratch.empty("codes", 8, torch.uint8)
    assert codes.dtype == torch.uint8 and codes.numel() == 8


def test_like_has_the_shape_and_shares_the_flat_buffer_with_views():
    scratch = Scratch("cpu")
    t = torch.ones(3, 4, dtype=torch.bfloat16)
    work = scratch.like(t)
    assert work.shape == (3, 4) and work.dtype == torch.float32
    assert scratch.views("k", 12, lambda flat: flat.view(2, 6)).data_ptr() == work.data_ptr()


def test_views_are_built_once_per_key_and_again_after_the_buffer_grows():
    scratch = Scratch("cpu")
    built = []

    def build(flat):
        built.append(flat.numel())
        return flat.view(2, -1)

    first = scratch.views(("a", 2), 8, build)
    assert scratch.views(("a", 2), 8, build) is first and built == [8]
    scratch.views(("b",), 4, build)  # fits in the buffer: nothing is dropped
    assert scratch.views(("a", 2), 8, build) is first and built == [8, 4]
    scratch.like(torch.empty(100))  # grows the buffer the views were made of
    again = scratch.views(("a", 2), 8, build)
    assert again is not first and built == [8, 4, 8] and again.data_ptr() == scratch.like(torch.empty(8)).data_ptr()


def test_zeros_are_zero_and_constants_are_made_once():
    scratch = Scratch("cpu")
    z = scratch.zeros("moments", 2, 5)
    assert z.shape == (2, 5) and not z.any()
    assert scratch.zeros("moments", 2, 3).data_ptr() == z.data_ptr()
    calls = []
    one = scratch.constant(("c", 1), lambda: calls.append(1) or torch.arange(3))
    assert scratch.constant(("c", 1), lambda: calls.append(1) or torch.arange(3)) is one and calls == [1]


@pytest.mark.parametrize("scale", [1.0, 0.05, 0.3])
def test_decay_factor_is_the_same_number_for_a_tensor_lr(scale):
    """A tensor lr (a scheduler's) gives the bits of ``1 - lr * scale * wd`` rounded once to its dtype, as the
    per-matrix references compute it (``1 - step_size * wd``, ``step_size = lr * scale``)."""
    generator = torch.Generator().manual_seed(0)
    for lr, wd in zip(torch.rand(200, generator=generator, dtype=torch.float64).mul_(0.1).tolist(),
                      torch.rand(200, generator=generator, dtype=torch.float64).tolist()):
        lr32 = torch.tensor(lr, dtype=torch.float32)
        step_size = lr32 * scale
        expected = 1 - step_size * wd
        assert torch.equal(decay_factor(lr32, wd, scale), expected)
        assert decay_factor(lr, wd, scale) == 1 - lr * scale * wd
    assert decay_factor(1e-3, 0.1) == 1 - 1e-3 * 0.1  # scale 1: lr * 1.0 is exact
    assert math.isclose(decay_factor(0.02, 0.1, 0.05), 1 - 1e-4, rel_tol=1e-15)
