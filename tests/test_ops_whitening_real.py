"""Whitening real gradients: the weight gradients of a small 2-layer transformer, row-standardised.

With 64 tokens the gradients' Gram matrices have condition numbers from 1e4 to 1.5e11 (the issue
measured 1e5-1e10 on real models); with 16 tokens each gradient has rank 16 of 64 (a singular Gram). Both are
compared with the float64 pseudo-inverse whitening.
"""

from __future__ import annotations

import functools

import pytest
import torch
from torch import nn

from slimopt.ops.newton_schulz import inverse_sqrt_newton_schulz, whiten, whiten_pinv_reference
from test_ops_newton_schulz import assert_same_whitening  # one tolerance argument for both files

ACCURACY = 0.99  # the issue asks for >= 0.95; measured >= 0.998


def cosine(x: torch.Tensor, y: torch.Tensor) -> float:
    x, y = x.double(), y.double()
    return ((x * y).sum() / (x.norm() * y.norm())).item()


def row_standardise(g: torch.Tensor) -> torch.Tensor:
    """SWAN's GradNorm in fp32 (rows on the short side): each row minus its mean, over its std."""
    g = g.float()
    g = g - g.mean(dim=1, keepdim=True)
    return g / g.std(dim=1, unbiased=False, keepdim=True)


@functools.cache
def gradients(tokens: int, seed: int = 1) -> dict[str, torch.Tensor]:
    """Row-standardised weight gradients (short side first) of the transformer layers, seeded."""
    d = 64
    with torch.random.fork_rng():
        torch.manual_seed(seed)
        model = nn.Sequential(
            nn.Embedding(256, d),
            nn.TransformerEncoderLayer(d, 4, 172, dropout=0.0, batch_first=True),
            nn.TransformerEncoderLayer(d, 4, 172, dropout=0.0, batch_first=True),
            nn.Linear(d, 256),
        )
    gen = torch.Generator().manual_seed(seed)
    rows = max(1, tokens // 32)
    seq = tokens // rows
    # Arithmetic byte sequences: structured, so that the gradients are not isotropic noise.
    ids = (torch.arange(seq + 1)[None] * torch.randint(1, 5, (rows, 1), generator=gen)
           + torch.randint(0, 256, (rows, 1), generator=gen)) % 256
    logits = model(ids[:, :-1])
    nn.functional.cross_entropy(logits.flatten(0, 1), ids[:, 1:].flatten()).backward()
    out = {}
    for name, p in model.named_parameters():
        if p.ndim == 2 and name.startswith(("1.", "2.")):  # the transformer layers' matrices
            g = p.grad.t() if p.shape[0] > p.shape[1] else p.grad
            out[name] = row_standardise(g)
    return out


def gram_condition_and_rank(x: torch.Tensor) -> tuple[float, int]:
    s = torch.linalg.svdvals(x.double())
    s = s[s > 1e-6 * s[0]]  # the pseudo-inverse reference's cutoff
    return (s[0] / s[-1]).item() ** 2, len(s)


def split_by_range(x: torch.Tensor, w: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """w's parts in the span of x's left singular vectors above the reference cutoff, and outside it."""
    u, s, _ = torch.linalg.svd(x.double(), full_matrices=True)
    r = int((s > 1e-6 * s[0]).sum())
    return u[:, :r].t() @ w.double(), u[:, r:].t() @ w.double()


def coupled_newton_schulz_whiten(x: torch.Tensor, iters: int) -> torch.Tensor:
    """What whiten computed before: coupled Newton-Schulz on the Frobenius-scaled Gram."""
    gram = x @ x.t()
    scale = torch.linalg.matrix_norm(gram)
    return inverse_sqrt_newton_schulz(gram / scale, iters) @ x / scale.sqrt()


def test_ill_conditioned_real_gradients():
    grads = gradients(64)
    conds = [gram_condition_and_rank(x)[0] for x in grads.values()]
    assert max(conds) > 1e10 and sum(c > 1e5 for c in conds) >= 6  # the 1e5..1e10 and beyond
    old, few = [], []
    for name, x in grads.items():
        ref = whiten_pinv_reference(x)
        assert cosine(whiten(x), ref) >= ACCURACY, name
        old.append(cosine(coupled_newton_schulz_whiten(x, 10), ref))
        few.append(cosine(whiten(x, 4), ref))
    assert min(old) < 0.95 and min(few) < 0.95  # the threshold separates good from bad whitening


def test_rank_deficient_real_gradients():
    grads = gradients(16)
    for name, x in grads.items():
        _, rank = gram_condition_and_rank(x)
        assert rank == 16 < x.shape[0], name  # a singular Gram: 48 null directions out of 64
        ref = whiten_pinv_reference(x)
        noise = {}
        for iters in (None, 30):
            w = whiten(x, iters)
            assert torch.isfinite(w).all()
            assert cosine(w, ref) >= ACCURACY, (name, iters)
            # In the null directions the output holds whitened fp32 rounding noise: small, and
            # shrinking with the polishing steps past the default.
            noise[iters] = torch.linalg.matrix_norm(split_by_range(x, w)[1], 2).item()
        assert noise[None] < 0.1 and noise[30] < noise[None] / 2, (name, noise)


@pytest.mark.parametrize("tokens", [16, 64])
def test_real_gradients_batched_as_one_stack(tokens):
    grads = [x for x in gradients(tokens).values() if x.shape == (64, 172)]
    assert len(grads) == 4
    w = whiten(torch.stack(grads))
    for x, wx in zip(grads, w):
        # The stack is contiguous and a transposed gradient is not: the matmuls sum in another order.
        assert_same_whitening(x, wx, whiten(x))
