"""Adam-mini against independent references.

* Blocks of one element are exactly AdamW: torch.optim.AdamW (for-loop) is the reference.
* The fast kernels against the obvious float64/scatter reference, and that reference against a
  hand-written per-block loop.
* The multi-tensor path (``foreach=True``, the default) against the per-tensor path (``foreach=False``):
  every rule, odd and empty shapes, fp32 and bf16, tensor lr, weight decay, per-tensor step counts, the
  non-finite policies; ``m``, ``v`` and the step counters bit for bit, ``p`` to a rounding tolerance.
* The official package (adam-mini 1.1.1) on a LLaMA-named model, where the partitions coincide.
* Memory: state bytes by formula, and the per-parameter bound on a LLaMA-shaped model.
"""

from __future__ import annotations

import copy
import math
import warnings

import pytest
import torch

import slimopt
from slimopt import AdamMini
from slimopt.ops import blockstats
from slimopt.ops.blockstats import (
    block_adam_foreach,
    block_adam_step,
    block_adam_step_reference,
    block_mean_sq,
    block_mean_sq_reference,
    block_state_shape,
)


def llama_pairs(hidden=32, layers=1, vocab=64, ffn=48, heads=4, kv=2, bias=False, dtype=torch.float32):
    """(name, Parameter) pairs with HF LLaMA names and shapes (plus optional q/k/v biases, as Qwen2)."""
    hd = hidden // heads
    shapes = [("model.embed_tokens.weight", (vocab, hidden))]
    for i in range(layers):
        pre = f"model.layers.{i}."
        shapes += [(pre + "self_attn.q_proj.weight", (heads * hd, hidden)),
                   (pre + "self_attn.k_proj.weight", (kv * hd, hidden)),
                   (pre + "self_attn.v_proj.weight", (kv * hd, hidden)),
                   (pre + "self_attn.o_proj.weight", (hidden, heads * hd)),
                   (pre + "mlp.gate_proj.weight", (ffn, hidden)),
                   (pre + "mlp.up_proj.weight", (ffn, hidden)),
                   (pre + "mlp.down_proj.weight", (hidden, ffn)),
                   (pre + "input_layernorm.weight", (hidden,)),
                   (pre + "post_attention_layernorm.weight", (hidden,))]
        if bias:
            shapes += [(pre + "self_attn.q_proj.bias", (heads * hd,)), (pre + "self_attn.k_proj.bias", (kv * hd,))]
    shapes += [("model.norm.weight", (hidden,)), ("lm_head.weight", (vocab, hidden))]
    gen = torch.Generator().manual_seed(0)
    return [(n, torch.nn.Parameter(torch.randn(s, generator=gen).to(dtype))) for n, s in shapes]


def random_grads(params, gen, scale=1.0):
    for p in params:
        p.grad = (torch.randn(p.shape, generator=gen) * scale).to(p.dtype)


# --------------------------------------------------------------------------------------------------
# blocks of size one == AdamW


def assert_close_to_reference(p, ref, *, steps, lr, msg=""):
    """The multi-tensor path's parameters against the per-tensor path's after ``steps`` steps.

    Both compute the same update; the multi-tensor path forms it as ``m * (lr / bc1 / d)`` (one rounding of
    the per-block factor) where the per-tensor path computes ``(-lr / bc1 * m) / d``, so an update differs
    by a few ulps of the update, and adding it to ``p`` may round ``p`` to the neighbouring value: at most
    one ulp of ``p`` per step (m and v, checked bit for bit elsewhere, do not depend on p; weight decay
    carries an earlier difference forward, scaled by 1 - lr wd). Hence ``rtol`` = steps ulps (2^-23 in fp32,
    2^-8 in bf16) and ``atol`` = steps x lr x 2^-18 (a few float32 ulps of an update up to ~16 lr, for
    elements whose value is near zero). On a GPU, which contracts ``p - m * r`` into one FMA, the same
    bound holds.
    """
    ulp = 2.0**-8 if p.dtype == torch.bfloat16 else 2.0**-23
    torch.testing.assert_close(p.detach(), ref.detach(), rtol=steps * ulp, atol=steps * lr * 2.0**-18, msg=msg)


def _step_beside(mine, opt, ref, torch_opt, gen, *, steps):
    """``steps`` steps of ``opt`` (on the named pairs ``mine``) and of torch's ``torch_opt`` (on ``ref``), both on the
    same random gradients."""
    for _ in range(steps):
        random_grads(ref, gen)
        for (_, p), r in zip(mine, ref):
            p.grad = r.grad.clone()
        opt.step()
        torch_opt.step()


@pytest.mark.parametrize("foreach", [False, True], ids=["per_tensor", "foreach"])
def test_elementwise_blocks_equal_torch_adamw_bit_for_bit(foreach):
    pairs = llama_pairs(bias=True)
    mine = [(n, torch.nn.Parameter(p.detach().clone())) for n, p in pairs]
    ref = [torch.nn.Parameter(p.detach().clone()) for _, p in pairs]
    kw = {"lr": 3e-3, "betas": (0.9, 0.95), "eps": 1e-8, "weight_decay": 0.1}
    opt = AdamMini(mine, overrides={"*": "elementwise"}, no_decay_roles=(), num_heads=4, num_kv_heads=2,
                   foreach=foreach, **kw)
    torch_opt = torch.optim.AdamW(ref, foreach=False, **kw)
    _step_beside(mine, opt, ref, torch_opt, torch.Generator().manual_seed(1), steps=5)
    for (name, p), r in zip(mine, ref):
        assert torch.equal(opt.state[p]["exp_avg"], torch_opt.state[r]["exp_avg"]), name
        assert torch.equal(opt.state[p]["exp_avg_sq"], torch_opt.state[r]["exp_avg_sq"]), name
        if foreach:  # the update formed as m * (lr / bc1 / d): rounding only
            assert_close_to_reference(p, r, steps=5, lr=kw["lr"], msg=name)
        else:  # same ops in the same order as torch's for-loop AdamW: identical bits
            assert torch.equal(p, r), name


def test_single_element_rows_through_the_block_path_equal_adamw():
    # (n, 1) matrices under the "rows" rule: every block is one element, but v goes through the block
    # path (squared norms, broadcast denominators). mean(g²) of one element is g² up to the rounding of
    # sqrt-then-square (1 ulp), so the updates agree to float32 rounding, not bit for bit.
    gen = torch.Generator().manual_seed(2)
    shapes = [(7, 1), (1, 1), (33, 1)]
    mine = [(f"layers.0.mlp.fc{i}.weight", torch.nn.Parameter(torch.randn(s, generator=gen)))
            for i, s in enumerate(shapes)]
    ref = [torch.nn.Parameter(p.detach().clone()) for _, p in mine]
    kw = {"lr": 1e-2, "betas": (0.9, 0.999), "eps": 1e-8, "weight_decay": 0.05}
    opt = AdamMini(mine, **kw)
    assert all(row.rule == "rows" and row.block_size == 1 for row in opt.plan)
    torch_opt = torch.optim.AdamW(ref, foreach=False, **kw)
    _step_beside(mine, opt, ref, torch_opt, gen, steps=6)
    for (_, p), r in zip(mine, ref):
        torch.testing.assert_close(p, r, rtol=1e-6, atol=1e-7)


# --------------------------------------------------------------------------------------------------
# kernels


LAYOUTS = {
    "rows": ((12, 5), {"rule": "rows", "out_dim": 0, "n_blocks": 12, "unit": 1}),
    "rows_conv1d": ((5, 12), {"rule": "rows", "out_dim": 1, "n_blocks": 12, "unit": 1}),
    "heads": ((12, 5), {"rule": "heads", "out_dim": 0, "n_blocks": 3, "unit": 4}),
    # [q q k | v]: 2 q heads and 1 k head of head_dim 4, then 4 v neurons; Conv1D layout (in, out)
    "qkv_concat_conv1d": ((5, 16), {"rule": "qkv", "out_dim": 1, "n_blocks": 3 + 4,
                                    "segments": [[0, 12, 4], [12, 4, 1]]}),
    # 2 kv groups of [q q k v], head_dim 2 (NeoX/Falcon)
    "qkv_grouped": ((16, 3), {"rule": "qkv", "out_dim": 0, "n_blocks": 2 * (3 + 2),
                              "segments": [[0, 6, 2], [6, 2, 1], [8, 6, 2], [14, 2, 1]]}),
    "whole": ((6, 7), {"rule": "whole", "out_dim": 0, "n_blocks": 1}),
    "whole_1d": ((9,), {"rule": "whole", "out_dim": 0, "n_blocks": 1}),
    "conv4d_rows": ((6, 2, 3, 3), {"rule": "rows", "out_dim": 0, "n_blocks": 6, "unit": 1}),
    "elementwise": ((10,), {"rule": "elementwise", "out_dim": 0, "n_blocks": 10}),
}


def _loop_block_means(grad, layout):
    """Per-block mean of g², by slicing each block out by hand (float64)."""
    g = grad.double()
    if layout["rule"] == "whole":
        return (g**2).mean()
    g = g.movedim(layout["out_dim"], 0)
    segments = layout.get("segments") or [[0, g.shape[0], layout.get("unit", 1)]]
    means = []
    for start, length, unit in segments:
        for b in range(start, start + length, unit):
            means.append((g[b:b + unit] ** 2).mean())
    return torch.stack(means)


@pytest.mark.parametrize("case", [c for c in LAYOUTS if c != "elementwise"])
def test_block_means_reference_and_fast_against_a_hand_loop(case):
    shape, layout = LAYOUTS[case]
    grad = torch.randn(shape, generator=torch.Generator().manual_seed(3))
    expected = _loop_block_means(grad, layout)
    ref = block_mean_sq_reference(grad, layout)
    assert ref.shape == block_state_shape(layout, shape)
    torch.testing.assert_close(ref, expected, rtol=1e-12, atol=0)  # both float64
    fast = block_mean_sq(grad, layout)
    assert fast.dtype == torch.float32
    torch.testing.assert_close(fast.double(), expected, rtol=1e-6, atol=0)  # float32 accumulation


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["fp32", "bf16"])
@pytest.mark.parametrize("case", sorted(LAYOUTS))
def test_fast_step_matches_reference_step(case, dtype):
    shape, layout = LAYOUTS[case]
    gen = torch.Generator().manual_seed(4)
    p_fast = torch.randn(shape, generator=gen).to(dtype)
    p_ref = p_fast.clone()
    m_fast, m_ref = torch.zeros_like(p_fast), torch.zeros_like(p_ref)
    v_fast = torch.zeros(block_state_shape(layout, shape), dtype=torch.float32)
    v_ref = v_fast.clone()
    kw = {"lr": 1e-2, "beta1": 0.9, "beta2": 0.95, "eps": 1e-8, "weight_decay": 0.1}
    for step in range(1, 5):
        grad = torch.randn(shape, generator=gen).to(dtype)
        block_adam_step(p_fast, grad, m_fast, v_fast, float(step), layout, **kw)
        block_adam_step_reference(p_ref, grad, m_ref, v_ref, float(step), layout, **kw)
    # v differs by float32 accumulation order (squared norm vs scatter in float64, rel ~1e-7); the
    # parameter by that, times lr, plus one rounding of p in its own dtype.
    tol = {"rtol": 1e-5, "atol": 1e-7} if dtype == torch.float32 else {"rtol": 1e-2, "atol": 1e-2}
    torch.testing.assert_close(v_fast, v_ref, rtol=1e-5, atol=0)
    torch.testing.assert_close(m_fast, m_ref, rtol=0, atol=0)  # m is the same lerp
    torch.testing.assert_close(p_fast, p_ref, **tol)


# --------------------------------------------------------------------------------------------------
# the multi-tensor path against the per-tensor path

# Every rule and layout, odd and empty shapes: name -> (shape, an override rule or None for the plan's own).
MIXED = {
    "model.embed_tokens.weight": ((64, 32), None),  # rows (tokens)
    "model.layers.0.self_attn.q_proj.weight": ((32, 32), None),  # heads: 4 of head_dim 8
    "model.layers.0.self_attn.q_proj.bias": ((32,), None),  # elementwise: a bias
    "model.layers.0.self_attn.k_proj.weight": ((16, 32), None),  # heads: 2 kv heads
    "model.layers.0.self_attn.v_proj.weight": ((16, 32), None),
    "model.layers.0.self_attn.o_proj.weight": ((32, 32), None),
    "model.layers.0.mlp.up_proj.weight": ((48, 32), None),
    "model.layers.0.mlp.down_proj.weight": ((32, 48), None),
    "model.layers.0.input_layernorm.weight": ((32,), None),  # whole
    "model.layers.1.attention.query_key_value.weight": ((64, 32), None),  # fused qkv, per kv group (NeoX)
    "model.layers.2.self_attn.qkv_proj.weight": ((64, 32), None),  # fused qkv, [q | k | v]
    "h.0.attn.c_attn.weight": ((32, 64), None),  # GPT-2 Conv1D (in, out): fused qkv along dim 1
    "h.0.mlp.c_fc.weight": ((32, 128), None),  # rows along dim 1
    "odd.rows.weight": ((7, 3), "rows"),
    "odd.one.weight": ((1, 1), "rows"),
    "odd.no_columns.weight": ((5, 0), "rows"),  # blocks of no elements
    "odd.no_rows.weight": ((0, 4), "rows"),  # no blocks at all
    "odd.empty.weight": ((0,), "whole"),
    "odd.scalar.weight": ((), "whole"),  # a 0-d parameter
    "odd.conv.weight": ((6, 2, 3, 3), "rows"),
    "odd.matrix.weight": ((3, 5), "elementwise"),
    "odd.cube.weight": ((3, 5, 2), "whole"),
    "odd.large.weight": ((300, 256), "rows"),  # more than CAT_MAX_NUMEL elements: a reduction of its own
    "model.norm.weight": ((32,), None),
    "lm_head.weight": ((64, 32), None),
}
MIXED_KW = {"betas": (0.9, 0.95), "eps": 1e-8, "num_heads": 4, "num_kv_heads": 2, "head_dim": 8}


def mixed_overrides(without=()):
    return {name: rule for name, (_, rule) in MIXED.items() if rule and name not in without}


def mixed_pairs(dtype=torch.float32, without=()):
    gen = torch.Generator().manual_seed(0)
    return [(n, torch.nn.Parameter(torch.randn(shape, generator=gen).to(dtype))) for n, (shape, _) in MIXED.items()
            if n not in without]


def train_mixed(foreach, dtype=torch.float32, lr=3e-3, weight_decay=0.1, steps=5, poison=None, without=(),
                **kwargs):
    """``steps`` steps on MIXED (less ``without``); every third tensor has no gradient in step 2 (its
    counter lags), and ``poison=(step, name, value)`` writes a value into one gradient."""
    pairs = mixed_pairs(dtype, without)
    opt = AdamMini(pairs, lr=lr, weight_decay=weight_decay, foreach=foreach, overrides=mixed_overrides(without),
                   **MIXED_KW, **kwargs)
    gen = torch.Generator().manual_seed(1)
    for step in range(steps):
        for i, (name, p) in enumerate(pairs):
            p.grad = None if step == 1 and i % 3 == 0 else torch.randn(p.shape, generator=gen).to(dtype)
            if poison and poison[0] == step and poison[1] == name:
                p.grad.view(-1)[0] = poison[2]
        opt.step()
    return pairs, opt


def assert_paths_agree(fast, ref, *, steps, lr):
    (fast_pairs, fast_opt), (ref_pairs, ref_opt) = fast, ref
    for (name, p), (_, q) in zip(fast_pairs, ref_pairs):
        a, b = fast_opt.state[p], ref_opt.state[q]
        assert a.keys() == b.keys(), name
        assert torch.equal(a["exp_avg"], b["exp_avg"]), name  # the same lerp
        assert torch.equal(a["exp_avg_sq"], b["exp_avg_sq"]), name  # the same sums of squares, in the same order
        assert a["step"].dtype == b["step"].dtype == torch.float32 and a["step"].shape == () and \
            int(a["step"]) == int(b["step"]), name
        assert_close_to_reference(p, q, steps=steps, lr=lr, msg=name)


@pytest.mark.parametrize("variant", ["default", "chunked", "uncat", "no_0d"])
@pytest.mark.parametrize("lr_kind", ["float", "tensor"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["fp32", "bf16"])
def test_foreach_path_matches_per_tensor_path(dtype, lr_kind, variant, monkeypatch):
    if variant in ("chunked", "uncat"):  # several concatenations per shape, or every gradient reduced alone
        monkeypatch.setattr(blockstats, "_PLANS", {})
        monkeypatch.setattr(blockstats, "CAT_CHUNK_NUMEL", 3000)
        monkeypatch.setattr(blockstats, "CAT_MAX_NUMEL", 2048 if variant == "chunked" else -1)
    # without a 0-d parameter, whole tensors' values are (1,)-shaped pieces of one split (else 0-d ones)
    without = ("odd.scalar.weight",) if variant == "no_0d" else ()
    lr = torch.tensor(3e-3) if lr_kind == "tensor" else 3e-3
    fast, ref = train_mixed(True, dtype, lr=lr, without=without), train_mixed(False, dtype, lr=lr, without=without)
    assert {row.rule for row in fast[1].plan} == {"rows", "heads", "qkv", "whole", "elementwise"}
    assert_paths_agree(fast, ref, steps=5, lr=3e-3)
    if lr_kind == "tensor":
        assert isinstance(fast[1].param_groups[0]["lr"], torch.Tensor)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["fp32", "bf16"])
def test_foreach_kernel_matches_per_tensor_kernel(dtype):
    # the kernels alone, on every layout of LAYOUTS at once, step counters as tensors
    cases = sorted(LAYOUTS)
    gen = torch.Generator().manual_seed(8)
    shapes, layouts = [LAYOUTS[c][0] for c in cases], [LAYOUTS[c][1] for c in cases]
    p_fast = [torch.randn(s, generator=gen).to(dtype) for s in shapes]
    p_ref = [p.clone() for p in p_fast]
    m_fast, m_ref = [torch.zeros_like(p) for p in p_fast], [torch.zeros_like(p) for p in p_ref]
    v_fast = [torch.zeros(block_state_shape(lay, s), dtype=torch.float32) for lay, s in zip(layouts, shapes)]
    v_ref = [v.clone() for v in v_fast]
    steps = [torch.zeros((), dtype=torch.float32) for _ in cases]
    kw = {"lr": 1e-2, "beta1": 0.9, "beta2": 0.95, "eps": 1e-8}
    decays = [0.1 if i % 2 else 0.0 for i in range(len(cases))]
    for step in range(1, 5):
        grads = [torch.randn(s, generator=gen).to(dtype) for s in shapes]
        block_adam_foreach(p_fast, grads, m_fast, v_fast, steps, layouts, weight_decays=decays, **kw)
        for i in range(len(cases)):
            block_adam_step(p_ref[i], grads[i], m_ref[i], v_ref[i], float(step), layouts[i], weight_decay=decays[i],
                           **kw)
    for i, case in enumerate(cases):
        assert int(steps[i]) == 4, case
        assert torch.equal(m_fast[i], m_ref[i]), case
        assert torch.equal(v_fast[i], v_ref[i]), case
        assert_close_to_reference(p_fast[i], p_ref[i], steps=4, lr=kw["lr"], msg=case)


@pytest.mark.parametrize("target", ["model.layers.0.mlp.up_proj.weight", "model.layers.0.self_attn.q_proj.bias",
                                    "model.norm.weight", "odd.scalar.weight", "h.0.attn.c_attn.weight"])
@pytest.mark.parametrize("value", [float("nan"), float("inf"), -float("inf")], ids=["nan", "inf", "-inf"])
def test_foreach_nonfinite_raise_names_the_tensor_and_changes_nothing(target, value):
    pairs, opt = train_mixed(True, steps=2, nonfinite="raise")
    before = [p.detach().clone() for _, p in pairs]
    state = copy.deepcopy(opt.state_dict())
    for _, p in pairs:
        p.grad = torch.randn(p.shape)
    dict(pairs)[target].grad.view(-1)[0] = value
    with pytest.raises(FloatingPointError, match=target.replace(".", r"\.")):
        opt.step()
    assert all(torch.equal(a, p) for a, (_, p) in zip(before, pairs))
    after = opt.state_dict()
    for pid, entry in state["state"].items():
        for key, tensor in entry.items():
            assert torch.equal(after["state"][pid][key], tensor), (pid, key)


@pytest.mark.parametrize("target", ["model.layers.0.mlp.up_proj.weight", "model.layers.0.self_attn.q_proj.bias",
                                    "odd.scalar.weight", "model.layers.1.attention.query_key_value.weight"])
def test_foreach_nonfinite_skip_matches_per_tensor_path(target):
    # an inf in step 3: that tensor and its state stay as they were, everything else steps (as the
    # per-tensor path does)
    runs = {}
    for foreach in (True, False):
        pairs, opt = train_mixed(foreach, steps=2, nonfinite="skip")
        before = copy.deepcopy(opt.state[dict(pairs)[target]])
        kept = dict(pairs)[target].detach().clone()
        others = [p.detach().clone() for name, p in pairs if name != target]
        gen = torch.Generator().manual_seed(2)
        for _, p in pairs:
            p.grad = torch.randn(p.shape, generator=gen)
        dict(pairs)[target].grad.view(-1)[-1] = float("inf")
        opt.step()
        assert torch.equal(dict(pairs)[target], kept)
        assert all(torch.equal(v, before[k]) for k, v in opt.state[dict(pairs)[target]].items())
        moved = [not torch.equal(a, p) for a, (name, p) in zip(others, [x for x in pairs if x[0] != target])]
        assert sum(moved) >= len(others) - 3  # every tensor with elements moved
        runs[foreach] = (pairs, opt)
    assert_paths_agree(runs[True], runs[False], steps=3, lr=3e-3)


def test_a_huge_finite_gradient_is_not_non_finite():
    # 1e20 is finite, its square is not (in float32): the block sums overflow, the check falls back to an
    # exact per-tensor test and lets the step run, which then does what the per-tensor path does (that
    # block's v becomes inf, its update 0)
    runs = {}
    for foreach in (True, False):
        runs[foreach] = train_mixed(foreach, steps=3, poison=(2, "model.layers.0.mlp.up_proj.weight", 1e20))
    v = runs[True][1].state[dict(runs[True][0])["model.layers.0.mlp.up_proj.weight"]]["exp_avg_sq"]
    assert torch.isinf(v[0]) and torch.isfinite(v[1:]).all()
    assert_paths_agree(runs[True], runs[False], steps=3, lr=3e-3)


def test_the_paths_share_their_state():
    # 2 steps multi-tensor, a state dict round trip into a per-tensor optimizer, 2 steps there, back to
    # the multi-tensor path for 1: the same as 5 per-tensor steps (counters move between CPU and device)
    pairs, opt = train_mixed(True, steps=2)
    gen = torch.Generator().manual_seed(3)
    ref_pairs, ref_opt = train_mixed(False, steps=2)
    other = [(n, torch.nn.Parameter(p.detach().clone())) for n, p in pairs]
    opt2 = AdamMini(other, lr=3e-3, weight_decay=0.1, foreach=False, overrides=mixed_overrides(), **MIXED_KW)
    opt2.load_state_dict(opt.state_dict())
    for step in range(3):
        opt2.foreach = step == 2
        for (_, p), (_, q) in zip(other, ref_pairs):
            q.grad = torch.randn(q.shape, generator=gen)
            p.grad = q.grad.clone()
        opt2.step()
        ref_opt.step()
    assert_paths_agree((other, opt2), (ref_pairs, ref_opt), steps=5, lr=3e-3)


def test_invalid_foreach_raises():
    with pytest.raises(ValueError, match="foreach"):
        AdamMini(llama_pairs(), num_heads=4, num_kv_heads=2, foreach="yes")


# --------------------------------------------------------------------------------------------------
# the official implementation


def test_matches_official_adam_mini_on_llama_names():
    adam_mini = pytest.importorskip("adam_mini", reason="pip install adam-mini==1.1.1 --no-deps")
    transformers = pytest.importorskip("transformers")
    cfg = transformers.LlamaConfig(vocab_size=64, hidden_size=32, intermediate_size=48, num_hidden_layers=2,
                                   num_attention_heads=4, num_key_value_heads=2)
    torch.manual_seed(0)
    ours_model = transformers.LlamaForCausalLM(cfg)
    theirs_model = copy.deepcopy(ours_model)
    kw = {"lr": 1e-2, "betas": (0.9, 0.95), "eps": 1e-8, "weight_decay": 0.1}
    ours = slimopt.create_optimizer(ours_model, "adammini", **kw)
    theirs = adam_mini.Adam_mini(theirs_model.named_parameters(), dim=32, n_heads=4, n_kv_heads=2,
                                 verbose=False, **kw)
    # Partitions coincide for LLaMA names in 1.1.1: embed/lm_head/v/o/mlp by rows, q/k by heads,
    # norms whole (and exempt from weight decay).
    gen = torch.Generator().manual_seed(5)
    for _ in range(5):
        for (_, a), b in zip(ours_model.named_parameters(), theirs_model.parameters()):
            a.grad = torch.randn(a.shape, generator=gen)
            b.grad = a.grad.clone()
        ours.step()
        theirs.step()
    # Upstream computes torch.mean(g*g) and multiplies m by a (1/bc1)/h factor where we use a squared
    # norm and addcdiv: float32 rounding differences only.
    for (name, a), b in zip(ours_model.named_parameters(), theirs_model.parameters()):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-6, msg=name)
    for (name, p), q in zip(ours_model.named_parameters(), theirs_model.parameters()):
        v_ours, v_theirs = ours.state[p]["exp_avg_sq"], theirs.state[q]["vmean"]
        torch.testing.assert_close(v_ours.reshape(-1), v_theirs.reshape(-1), rtol=1e-5, atol=0, msg=name)


# --------------------------------------------------------------------------------------------------
# construction, partition, options


def test_from_model_reads_config_and_prints_the_partition():
    transformers = pytest.importorskip("transformers")
    cfg = transformers.Qwen3Config(vocab_size=64, hidden_size=32, intermediate_size=48, num_hidden_layers=1,
                                   num_attention_heads=4, num_key_value_heads=2, head_dim=16)
    model = transformers.Qwen3ForCausalLM(cfg)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        opt = slimopt.create_optimizer(model, "adammini", lr=1e-3)
    table = opt.partition_table()
    assert "model.layers.0.self_attn.k_proj.weight" in table
    rows = {r.name: r for r in opt.plan}
    assert rows["model.layers.0.self_attn.q_proj.weight"].n_blocks == 4  # head_dim 16, not 32 / 4
    assert rows["model.layers.0.self_attn.k_proj.weight"].n_blocks == 2
    loss = model(torch.randint(0, 64, (2, 5)), labels=torch.randint(0, 64, (2, 5))).loss
    loss.backward()
    opt.step()
    state = opt.state[model.model.layers[0].self_attn.q_proj.weight]
    assert state["exp_avg_sq"].shape == (4,) and state["exp_avg_sq"].dtype == torch.float32


def test_weight_decay_exemptions_default_and_configurable():
    for no_decay, exempt in ((("norm", "bias"), True), ((), False)):
        pairs = llama_pairs(bias=True)
        before = {n: p.detach().clone() for n, p in pairs}
        opt = AdamMini(pairs, lr=0.1, weight_decay=0.5, num_heads=4, num_kv_heads=2, no_decay_roles=no_decay)
        for _ in range(3):
            for _, p in pairs:
                p.grad = torch.zeros_like(p)  # zero gradient: the update is decay alone
            opt.step()
        for n, p in pairs:
            expected = before[n] * (1 - 0.1 * 0.5) ** 3
            if exempt and ("norm" in n or n.endswith("bias")):
                expected = before[n]
            torch.testing.assert_close(p.detach(), expected, rtol=1e-6, atol=0, msg=n)


def test_bf16_first_moment_option_and_overrides():
    pairs = llama_pairs()
    opt = AdamMini(pairs, lr=1e-3, num_heads=4, num_kv_heads=2, exp_avg_dtype=torch.bfloat16,
                   overrides={"*.v_proj.weight": "whole"})
    random_grads([p for _, p in pairs], torch.Generator().manual_seed(6))
    opt.step()
    named = dict(pairs)
    v_proj = opt.state[named["model.layers.0.self_attn.v_proj.weight"]]
    assert v_proj["exp_avg"].dtype == torch.bfloat16 and v_proj["exp_avg_sq"].shape == ()
    assert opt.state[named["lm_head.weight"]]["exp_avg_sq"].shape == (64,)
    assert all(torch.isfinite(p).all() for _, p in pairs)


@pytest.mark.parametrize("kwargs, match", [
    ({"exp_avg_dtype": torch.float16}, "exp_avg_dtype"),
    ({"no_decay_roles": ("norms",)}, "no_decay_roles"),
    ({"eps": 0.0}, "eps"),
    ({"betas": (0.9, 1.0)}, "betas"),
])
def test_invalid_arguments_raise(kwargs, match):
    with pytest.raises(ValueError, match=match):
        AdamMini(llama_pairs(), num_heads=4, num_kv_heads=2, **kwargs)


def test_gpt2_conv1d_model_trains():
    transformers = pytest.importorskip("transformers")
    cfg = transformers.GPT2Config(vocab_size=64, n_embd=32, n_layer=1, n_head=4, n_positions=16,
                                  bos_token_id=0, eos_token_id=0)
    torch.manual_seed(0)
    model = transformers.GPT2LMHeadModel(cfg)
    opt = slimopt.create_optimizer(model, "adammini", lr=1e-2)
    tokens = torch.randint(0, 64, (4, 12), generator=torch.Generator().manual_seed(7))
    losses = []
    for _ in range(30):
        opt.zero_grad()
        loss = model(tokens, labels=tokens).loss
        loss.backward()
        opt.step()
        losses.append(loss.item())
    assert losses[-1] < 0.5 * losses[0]
    c_attn = opt.state[model.transformer.h[0].attn.c_attn.weight]["exp_avg_sq"]
    assert c_attn.shape == (4 + 4 + 32,)  # q heads, k heads, v neurons


# --------------------------------------------------------------------------------------------------
# memory


def _expected_state_bytes(opt, m_bytes_per_element):
    total = 0
    for row in opt.plan:
        numel = math.prod(row.shape)
        total += numel * m_bytes_per_element + 4  # m, and a float32 step counter
        total += 4 * (numel if row.rule == "elementwise" else row.n_blocks)  # float32 v
    return total


@pytest.mark.parametrize("exp_avg_dtype, m_bytes", [(None, 4), (torch.bfloat16, 2)], ids=["m_fp32", "m_bf16"])
def test_state_bytes_formula_and_bound_on_a_llama_shape(exp_avg_dtype, m_bytes):
    # LLaMA-shaped, hidden 1024 (16 heads, 8 kv heads), ffn 2752, vocab 2048, 2 layers: 27.4M parameters.
    pairs = llama_pairs(hidden=1024, layers=2, vocab=2048, ffn=2752, heads=16, kv=8)
    numel = sum(p.numel() for _, p in pairs)
    opt = AdamMini(pairs, lr=1e-3, num_heads=16, num_kv_heads=8, exp_avg_dtype=exp_avg_dtype)
    for _, p in pairs:
        p.grad = torch.zeros_like(p)
    opt.step()
    measured = slimopt.state_bytes(opt)
    assert measured == _expected_state_bytes(opt, m_bytes)
    # One v per row costs 4 / fan_in bytes per parameter: at hidden 1024 the blocks' v and the step
    # counters stay under 0.1% of fp32 m (0.004 B/param). (At hidden 512, e.g. the 42M step-time model,
    # they are 0.0064 B/param.)
    assert measured / numel <= m_bytes + 0.004, measured / numel
