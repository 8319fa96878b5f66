"""MicroAdam (slimopt.optim.microadam) against torch.optim.Adam and a slow float64 reference."""

from __future__ import annotations

import copy
import io
import math

import pytest
import torch

import slimopt
import slimopt.optim.microadam as microadam_module
from slimopt import MicroAdam
from slimopt.ops.sparse_window import (
    adam_update_from_window,
    apply_window_update_,
    dense_update_,
    row_weights,
    window_weights,
)
from slimopt.ops.topk import topk_blocks
from slimopt.optim.microadam import chunk_spans

# --------------------------------------------------------------------------------------------------
# a slow, obvious reference: python loops over blocks and buckets, float64 arithmetic. It keeps the
# same storage formats as the optimizer (bf16 window values and bucket bounds, 4-bit codes) because
# those roundings are part of the algorithm.


def _bf16_outward(x: float, down: bool) -> float:
    y = float(torch.tensor(x, dtype=torch.float64).to(torch.bfloat16))
    while (y > x) if down else (y < x):  # step one bf16 ulp outwards
        t = torch.tensor(y, dtype=torch.bfloat16)
        y = float(torch.nextafter(t, torch.tensor(-math.inf if down else math.inf, dtype=torch.bfloat16)))
    return y


def reference_step(p, g, state, hp, t):
    """One MicroAdam step in float64. ``state`` holds unpacked codes, bounds, window (m, k) rows."""
    m, bq, block, k_init = hp["m"], hp["quant_block_size"], hp["topk_block_size"], hp["k_init"]
    beta1, beta2 = hp["betas"]
    d = p.numel()
    codes, lo, hi = state["codes"], state["lo"], state["hi"]
    a = g.double().reshape(-1).clone()
    for q in range(0, d, bq):  # (4) a = g + Q^-1(e)
        b = q // bq
        a[q:q + bq] += lo[b] + codes[q:q + bq].double() * (hi[b] - lo[b]) / 15
    row = (t - 1) % m
    rel_row, val_row = [], []
    for start in range(0, d, block):  # (5) Top-K per block, ties to the lower index; (6) zero them
        seg = a[start:start + block]
        k = max(1, math.ceil(round(seg.numel() * k_init, 9)))
        sel = sorted(torch.sort(-seg.abs(), stable=True).indices[:k].tolist())
        rel_row += sel
        val_row += [float(seg[i].to(torch.bfloat16)) for i in sel]
        seg[sel] = 0
    state["rel"][row] = torch.tensor(rel_row)
    state["val"][row] = torch.tensor(val_row, dtype=torch.float64)
    for q in range(0, d, bq):  # (7, 8) quantise the rest
        b, seg = q // bq, a[q:q + bq]
        lo[b], hi[b] = _bf16_outward(float(seg.min()), True), _bf16_outward(float(seg.max()), False)
        step = (hi[b] - lo[b]) / 15
        c = torch.floor((seg - lo[b]) / step + 0.5) if step > 0 else torch.zeros_like(seg)
        codes[q:q + bq] = c.clamp(0, 15).to(torch.uint8)
    first = torch.zeros(d, dtype=torch.float64)  # (10) moments from the window rows by age
    second = torch.zeros(d, dtype=torch.float64)
    for r in range(min(t, m)):
        age = (t - 1 - r) % m
        pos = state["rel"][r] + state["starts"]
        for j in range(pos.numel()):
            first[pos[j]] += beta1**age * state["val"][r][j]
            second[pos[j]] += beta2**age * state["val"][r][j] ** 2
    m_hat = first * (1 - beta1) / (1 - beta1**t)
    v_hat = second * (1 - beta2) / (1 - beta2**t)
    u = m_hat / (v_hat.sqrt() + hp["eps"])
    p64 = p.double().reshape(-1) * (1 - hp["lr"] * hp["weight_decay"]) - hp["lr"] * u  # (11)
    return p64.view_as(p)


def _unpacked_state(opt_state, d, hp):
    from slimopt.ops.quant import unpack_nibbles

    layout = topk_blocks(d, hp["topk_block_size"], hp["k_init"])
    starts = torch.cat([torch.full((layout.k_block,), b * layout.block_size) for b in range(layout.full_blocks)]
                       + [torch.full((layout.k_tail,), layout.full_blocks * layout.block_size)])
    return {
        "codes": unpack_nibbles(opt_state["ef_codes"], d).clone(),
        "lo": [float(x) for x in opt_state["ef_min"]],
        "hi": [float(x) for x in opt_state["ef_max"]],
        "rel": [r.long() for r in opt_state["window_indices"]],
        "val": [r.double() for r in opt_state["window_values"]],
        "starts": starts.long(),
    }


@pytest.mark.parametrize("chunk", [1 << 18, 512])  # one chunk, and several chunks of whole blocks
def test_vectorised_matches_slow_float64_reference(monkeypatch, chunk):
    monkeypatch.setattr(microadam_module, "CHUNK_ELEMENTS", chunk)
    monkeypatch.setattr(microadam_module, "WINDOW_CHUNK_ELEMENTS", chunk // 2)
    torch.manual_seed(0)
    # 845 = 3 blocks of 256 + a 77-entry tail; 13 buckets of 64 + a 13-entry tail; odd length
    hp = dict(lr=1e-2, betas=(0.9, 0.999), eps=1e-8, weight_decay=0.1, m=3, k_init=0.05, quant_block_size=64,
              topk_block_size=256)
    p = torch.randn(5, 169, requires_grad=True)
    opt = MicroAdam([p], **hp)
    for t in range(1, 6):  # past m: the ring wraps
        g = torch.randn_like(p)
        before = _unpacked_state(opt.state[p], p.numel(), hp) if t > 1 else None
        if before is None:
            layout = topk_blocks(p.numel(), 256, 0.05)
            before = {"codes": torch.zeros(p.numel(), dtype=torch.uint8), "lo": [0.0] * 14, "hi": [0.0] * 14,
                      "rel": [torch.zeros(layout.k_total, dtype=torch.long)] * 3,
                      "val": [torch.zeros(layout.k_total, dtype=torch.float64)] * 3}
            before["starts"] = _unpacked_state(
                {"ef_codes": torch.zeros(423, dtype=torch.uint8), "ef_min": torch.zeros(14),
                 "ef_max": torch.zeros(14), "window_indices": torch.zeros(3, 1), "window_values": torch.zeros(3, 1)},
                p.numel(), hp)["starts"]
        expected = reference_step(p.detach(), g, before, hp, t)
        p.grad = g
        opt.step()
        after = _unpacked_state(opt.state[p], p.numel(), hp)
        row = (t - 1) % hp["m"]
        assert torch.equal(after["rel"][row], before["rel"][row])  # identical Top-K sets
        # bf16 window values: fp32 vs float64 accumulators can round to neighbouring bf16 values
        torch.testing.assert_close(after["val"][row], before["val"][row], rtol=2**-8, atol=0)
        torch.testing.assert_close(torch.tensor(after["lo"]), torch.tensor(before["lo"]), rtol=2**-8, atol=0)
        torch.testing.assert_close(torch.tensor(after["hi"]), torch.tensor(before["hi"]), rtol=2**-8, atol=0)
        # codes: a float64 vs fp32 quotient can fall on either side of a rounding midpoint, rarely
        assert (after["codes"].int() - before["codes"].int()).abs().le(1).all()
        assert (after["codes"] != before["codes"]).float().mean() < 0.01
        # params: fp32 arithmetic vs float64; one step moves them by about lr, fp32 adds ~1e-7 relative
        torch.testing.assert_close(p.detach().double(), expected, rtol=1e-5, atol=1e-6)
        p.data.copy_(expected)  # continue from the reference's result (no drift between the two)


def test_small_tensors_packed_into_shared_chunks_step_exactly_as_alone(monkeypatch):
    """Tensors of whole blocks and buckets share chunks of the compression pass, and so do tensors shorter
    than a block of one length (as blocks of that length); each must get bit for bit what it gets
    stepped alone: mixed dtypes, a tensor that skips a step (its own ring row), a tensor end with a
    partial block (a chunk by itself), a tensor split over two chunks."""
    monkeypatch.setattr(microadam_module, "CHUNK_ELEMENTS", 1024)
    packed_sizes = []
    compress = microadam_module._compress_chunk

    def spy(segments, chunk_block, *args):
        packed_sizes.append((len(segments), chunk_block))
        return compress(segments, chunk_block, *args)

    monkeypatch.setattr(microadam_module, "_compress_chunk", spy)
    hp = dict(lr=1e-2, m=3, k_init=0.05, quant_block_size=64, topk_block_size=256, weight_decay=0.1)
    torch.manual_seed(0)
    # (1152,): two spans, 1024 and a last partial block of 128 that is packed with the short tensors
    shapes = [(2, 256), (256,), (3, 256), (300,), (4, 64), (6, 256), (2, 128), (128,), (2, 64), (128,), (192,),
              (100,), (1152,), (128,)]
    dtypes = [torch.float32, torch.bfloat16, torch.float32, torch.float32, torch.float16, torch.float32,
              torch.bfloat16, torch.float32, torch.bfloat16, torch.float32, torch.float32, torch.float32,
              torch.float32, torch.float32]
    together = [torch.randn(s).to(d).requires_grad_() for s, d in zip(shapes, dtypes)]
    alone = [t.detach().clone().requires_grad_() for t in together]
    optimizer = MicroAdam(together, **hp)
    singles = [MicroAdam([t], **hp) for t in alone]
    for step in range(5):
        for i, (a, b) in enumerate(zip(together, alone)):
            g = None if (i in (2, 8) and step == 1) else torch.randn(a.shape).to(a.dtype)
            a.grad, b.grad = g, (None if g is None else g.clone())
        optimizer.step()
        for single in singles:
            single.step()
    assert max(size for size, block in packed_sizes if block == 256) > 1  # the packing did happen
    assert max(size for size, block in packed_sizes if block == 128) == 3  # three short tensors of 128
    assert (2, 128) in packed_sizes  # 1152's last 128 with the (128,) after it
    for a, b, single in zip(together, alone, singles):
        assert torch.equal(a, b)
        for key, value in optimizer.state[a].items():
            assert torch.equal(value, single.state[b][key]), key


def test_dense_window_equals_adam():
    """k_init=1 keeps every coordinate: no error feedback, and m >= steps keeps every gradient, so the
    window sums are Adam's EMAs exactly. The only difference is that the window stores values in bf16
    (relative error <= 2**-9 each); m_hat and sqrt(v_hat) each inherit that relative error, so each
    update differs by <= ~2**-8 relative, i.e. <= lr * 2**-8 * |u| per step with |u| <= ~1. Over 20 steps
    that bounds the drift by 20 * 1e-2 * 2**-8 ~ 8e-4; we check 1e-3, while the params move ~0.1."""
    torch.manual_seed(1)
    w = torch.randn(300, 50)
    p_micro, p_adam = w.clone().requires_grad_(), w.clone().requires_grad_()
    micro = MicroAdam([p_micro], lr=1e-2, k_init=1.0, m=20, topk_block_size=2048)
    adam = torch.optim.Adam([p_adam], lr=1e-2)
    for _ in range(20):
        g = torch.randn_like(w)
        p_micro.grad, p_adam.grad = g.clone(), g.clone()
        micro.step()
        adam.step()
    assert (p_adam - w).abs().max() > 0.05
    torch.testing.assert_close(p_micro, p_adam, rtol=0, atol=1e-3)
    assert micro.state[p_micro]["ef_codes"].eq(0).all()  # nothing was left for the error feedback


def test_dense_window_equals_adam_bit_for_bit_on_bf16_gradients():
    """With gradients that are already bf16-representable the window is lossless: fp32 rounding only."""
    torch.manual_seed(2)
    w = torch.randn(64, 64)
    p_micro, p_adam = w.clone().requires_grad_(), w.clone().requires_grad_()
    micro = MicroAdam([p_micro], lr=1e-2, weight_decay=0.1, k_init=1.0, m=8, topk_block_size=1024)
    adam = torch.optim.AdamW([p_adam], lr=1e-2, weight_decay=0.1)
    for _ in range(8):
        g = torch.randn_like(w).bfloat16().float()
        p_micro.grad, p_adam.grad = g.clone(), g.clone()
        micro.step()
        adam.step()
    torch.testing.assert_close(p_micro, p_adam, rtol=1e-5, atol=1e-6)  # different fp32 op orders


def test_row_ages():
    assert row_weights(1, 4, 0.5) == [1.0, 0.0, 0.0, 0.0]
    assert row_weights(3, 4, 0.5) == [0.25, 0.5, 1.0, 0.0]
    # step 6 writes row (6 - 1) % 4 = 1; rows 0, 3, 2 were written at steps 5, 4, 3
    assert row_weights(6, 4, 0.5) == [0.5, 1.0, 0.125, 0.25]


def test_tensor_that_skips_steps_keeps_its_own_ages():
    """A tensor stepped only at some global steps must evolve exactly as if it were alone."""
    torch.manual_seed(3)
    a0, b0 = torch.randn(40, 30), torch.randn(500)
    a, b, b_alone = a0.clone().requires_grad_(), b0.clone().requires_grad_(), b0.clone().requires_grad_()
    kw = dict(lr=1e-2, m=3, k_init=0.1, topk_block_size=128)
    together, alone = MicroAdam([a, b], **kw), MicroAdam([b_alone], **kw)
    for t in range(8):
        a.grad = torch.randn_like(a)
        g = torch.randn_like(b)
        b.grad = g.clone() if t % 3 != 1 else None  # b skips every third step
        together.step()
        if t % 3 != 1:
            b_alone.grad = g.clone()
            alone.step()
    assert int(together.state[b]["step"]) == int(alone.state[b_alone]["step"]) == 5
    assert int(together.state[a]["step"]) == 8
    assert torch.equal(b, b_alone)
    for key in ("window_indices", "window_values", "ef_codes", "ef_min", "ef_max"):
        assert torch.equal(together.state[b][key], alone.state[b_alone][key]), key


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_low_precision_params_follow_fp32(dtype):
    torch.manual_seed(4)
    w = torch.randn(200, 40).to(dtype).float()
    p32, plow = w.clone().requires_grad_(), w.clone().to(dtype).requires_grad_()
    o32, olow = MicroAdam([p32], lr=1e-2, k_init=0.05), MicroAdam([plow], lr=1e-2, k_init=0.05)
    for _ in range(5):
        g = torch.randn_like(w).to(dtype)
        p32.grad, plow.grad = g.float(), g.clone()
        g_before = plow.grad.clone()
        o32.step()
        olow.step()
        assert torch.equal(plow.grad, g_before)  # p.grad is never written
    assert plow.dtype == dtype and torch.isfinite(plow).all()
    # same gradients, same algorithm; the low-precision param rounds once per step (<= 1 ulp each)
    ulp = 2**-7 if dtype == torch.bfloat16 else 2**-10
    torch.testing.assert_close(plow.float(), p32.detach(), rtol=5 * ulp, atol=5 * ulp * 1e-2)


def test_grad_untouched_fp32():
    p = torch.randn(1000, requires_grad=True)
    p.grad = torch.randn(1000)
    g = p.grad.clone()
    MicroAdam([p]).step()
    assert torch.equal(p.grad, g)


@pytest.mark.parametrize("m,k_init,bq", [(10, 0.01, 64), (4, 0.05, 32), (20, 0.01, 100_000)])
def test_state_bytes_match_the_formula(m, k_init, bq):
    shapes = [(4096, 1024), (1024, 3000), (50_000,)]
    params = [torch.zeros(s, requires_grad=True) for s in shapes]
    opt = MicroAdam(params, m=m, k_init=k_init, quant_block_size=bq)
    for p in params:
        p.grad = torch.randn_like(p)
    opt.step()
    d = sum(p.numel() for p in params)
    formula = (0.5 + 4 * m * k_init + 4 / bq) * d
    assert slimopt.state_bytes(opt) <= formula * 1.01
    assert slimopt.state_bytes(opt) >= (0.5 + 4 * m * k_init) * d


def test_save_load_resumes_bit_exactly():
    torch.manual_seed(5)
    p = torch.randn(3000, requires_grad=True)
    opt = MicroAdam([p], lr=1e-2, k_init=0.05, m=4)
    grads = [torch.randn(3000) for _ in range(8)]
    for g in grads[:4]:
        p.grad = g.clone()
        opt.step()
    buffer = io.BytesIO()
    torch.save({"p": p.detach().clone(), "opt": opt.state_dict()}, buffer)
    for g in grads[4:]:
        p.grad = g.clone()
        opt.step()
    buffer.seek(0)
    saved = torch.load(buffer, weights_only=True)
    q = saved["p"].clone().requires_grad_()
    resumed = MicroAdam([q], lr=1e-2, k_init=0.05, m=4)
    resumed.load_state_dict(copy.deepcopy(saved["opt"]))
    assert resumed.state[q]["window_indices"].dtype == torch.int16
    assert resumed.state[q]["ef_codes"].dtype == torch.uint8
    for g in grads[4:]:
        q.grad = g.clone()
        resumed.step()
    assert torch.equal(p, q)


@pytest.mark.parametrize("k_init", [1e-4, 0.3, 0.999, 1.0])
def test_any_density_trains(k_init):
    torch.manual_seed(6)
    target = torch.randn(64, 64)
    p = torch.zeros(64, 64, requires_grad=True)
    opt = MicroAdam([p], lr=2e-2, k_init=k_init, m=5)
    for _ in range(60):
        p.grad = p.detach() - target
        opt.step()
    assert torch.isfinite(p).all() and (p - target).norm() < target.norm()


def test_chunk_spans_cover_a_tensor_beyond_int32():
    n = 2**31 + 77_777
    layout = topk_blocks(n, 4096, 0.01)
    spans = list(chunk_spans(layout, 64))
    assert spans[0].start == 0 and spans[-1].end == n and spans[-1].columns[1] == layout.k_total
    assert spans[-1].code_bytes[1] == (n + 1) // 2 and spans[-1].buckets[1] == math.ceil(n / 64)
    for prev, cur in zip(spans, spans[1:]):
        assert prev.end == cur.start and prev.columns[1] == cur.columns[0]
        assert prev.buckets[1] == cur.buckets[0] and prev.code_bytes[1] == cur.code_bytes[0]
        assert prev.end % 4096 == 0 and prev.end % 64 == 0  # whole blocks, whole buckets
        assert prev.end - prev.start <= max(microadam_module.CHUNK_ELEMENTS, 4096)


@pytest.mark.parametrize("kwargs,arg", [
    (dict(lr=-1.0), "lr"), (dict(betas=(1.0, 0.9)), "betas[0]"), (dict(eps=-1e-8), "eps"),
    (dict(weight_decay=-0.1), "weight_decay"), (dict(m=0), "m"), (dict(m=2.5), "m"),
    (dict(k_init=0.0), "k_init"), (dict(k_init=1.5), "k_init"), (dict(quant_block_size=0), "quant_block_size"),
    (dict(topk_block_size=40_000), "topk_block_size"), (dict(backend="cuda"), "backend"),
])
def test_validation_names_the_argument(kwargs, arg):
    with pytest.raises(ValueError, match=arg.replace("[", r"\[").replace("]", r"\]")):
        MicroAdam([torch.zeros(3, requires_grad=True)], **kwargs)


def test_empty_and_tiny_tensors():
    ps = [torch.zeros(0, requires_grad=True), torch.ones(1, requires_grad=True), torch.ones(3, requires_grad=True)]
    opt = MicroAdam(ps, lr=0.1)
    for p in ps:
        p.grad = torch.ones_like(p)
    opt.step()
    assert torch.allclose(ps[1], torch.tensor([0.9]))  # first step: Adam's sign step on the selected entry
    assert ps[2].tolist() == pytest.approx([0.9, 1.0, 1.0])  # one of three kept; ties to the lower index


@pytest.mark.parametrize("dtype,wd", [(torch.float32, 0.0), (torch.float32, 0.1), (torch.bfloat16, 0.1)])
def test_fused_window_update_equals_the_slow_reference(dtype, wd):
    """apply_window_update_ (fused dense update) against the slow direction + dense update: the same sums,
    the bias corrections folded into the row weights, so equal to a few fp32 roundings of u."""
    torch.manual_seed(9)
    n, m, k = 5000, 4, 300
    positions = torch.stack([torch.randperm(n)[:k] for _ in range(m)])  # unique within a row, repeats across
    values = torch.randn(m, k).bfloat16()
    p = torch.randn(n).to(dtype)
    u = adam_update_from_window(positions, values, n, 6, (0.9, 0.999), 1e-8)
    expected = p.clone()
    dense_update_(expected, u, 1e-2, wd)
    moments = torch.zeros(2, n + 7)  # wider than needed, as the step's shared buffer may be
    before = p.clone()
    apply_window_update_(p, positions, values, window_weights(6, m, (0.9, 0.999)), 1e-8, 1e-2, wd, moments)
    assert moments.eq(0).all()
    off_window = torch.ones(n, dtype=torch.bool).index_fill_(0, positions.view(-1), False)
    assert torch.equal(p[off_window], expected[off_window])  # off the window: decay only, exactly
    # lr * u is ~1e-2: a few fp32 roundings of u move it by ~1e-9, so p may differ by the rounding of the
    # last addition: at most 2 ulps of p (fp32), or one bf16 rounding
    tol = dict(rtol=2**-22, atol=1e-7) if dtype == torch.float32 else dict(rtol=2**-8, atol=0)
    torch.testing.assert_close(p, expected, **tol)
    assert not torch.equal(p, before)


def test_deepcopy_keeps_the_backend_and_steps_like_the_original():
    # torch's Optimizer.__getstate__ keeps only defaults, state and groups: settings must live there.
    torch.manual_seed(0)
    p = torch.nn.Parameter(torch.randn(32, 16))
    opt = MicroAdam([p], lr=1e-2, backend="torch")
    p.grad = torch.randn_like(p)
    opt.step()
    twin_p, twin = copy.deepcopy((p, opt))  # one memo: the copied state is keyed by the copied parameter
    assert twin.param_groups[0]["backend"] == "torch"
    grad = torch.randn_like(p)
    p.grad, twin_p.grad = grad, grad.clone()
    opt.step()
    twin.step()
    assert torch.equal(p, twin_p)


def test_load_state_dict_checks_the_state_layout_of_tensors_above_one_block():
    """load_state_dict finds the expected state shapes by a step on meta tensors; that must work for
    tensors of several Top-K blocks too (their selection cannot run on meta tensors, only the state)."""
    p = torch.nn.Parameter(torch.randn(64, 128))  # 8192 entries: two blocks of 4096
    optimizer = MicroAdam([p], lr=1e-2)
    p.grad = torch.randn_like(p)
    optimizer.step()
    bad = copy.deepcopy(optimizer.state_dict())
    bad["state"][0]["window_indices"] = bad["state"][0]["window_indices"][:, :-1].clone()
    with pytest.raises(ValueError, match="window_indices"):
        MicroAdam([p], lr=1e-2).load_state_dict(bad)
    MicroAdam([p], lr=1e-2).load_state_dict(optimizer.state_dict())  # the good one loads
