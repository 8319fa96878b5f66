"""``adamw-split``: torch AdamW with the hybrids' lr split, the fair baseline for SinkGD and SWAN; the same split
for the matrix baselines (Muon, GaLore); which optimizers take a second lr."""

from __future__ import annotations

import pytest
import torch

import slimopt
from slimopt.bench.baselines import hybrid_split, make_optimizer
from slimopt.bench.model import build_model


def test_split_follows_the_hybrids_routing():
    model = build_model("tiny")
    hidden, rest = hybrid_split(model)
    sinkgd = slimopt.create_optimizer(model, "sinkgd", lr=0.02)
    stateless = {id(p) for g in sinkgd.param_groups if g["update"] == "stateless" for p in g["params"]}
    assert {id(p) for p in hidden} == stateless and stateless
    assert {id(p) for p in rest} == {id(p) for p in model.parameters()} - stateless
    assert any(p.ndim == 1 for p in rest) and any(p.ndim == 2 for p in rest)  # norms, embedding/head


def test_split_is_adamw_with_two_lrs():
    torch.manual_seed(0)
    model = build_model("tiny")
    reference = build_model("tiny")
    reference.load_state_dict(model.state_dict())
    opt = make_optimizer(model, "adamw-split", lr=1e-3, adamw_lr=3e-2, weight_decay=0.1)
    hidden, rest = hybrid_split(reference)
    expected = torch.optim.AdamW([{"params": hidden, "lr": 1e-3}, {"params": rest, "lr": 3e-2}], weight_decay=0.1)
    for _ in range(3):
        for p, q in zip(model.parameters(), reference.parameters()):
            p.grad = torch.randn_like(p)
            q.grad = p.grad.clone()
        opt.step()
        expected.step()
    assert [g["lr"] for g in opt.param_groups] == [1e-3, 3e-2]
    for p, q in zip(model.parameters(), reference.parameters()):
        assert torch.equal(p, q)


def test_split_default_second_lr_is_the_hybrids_default():
    opt = make_optimizer(build_model("tiny"), "adamw-split", lr=1e-3)
    assert opt.param_groups[1]["lr"] == slimopt.registry.spec("sinkgd").example_lr


def test_a_variant_name_passes_constructor_options():
    from slimopt.bench.baselines import is_known, parse_name

    assert parse_name("microadam@k_init=0.05,backend=torch") == ("microadam", {"k_init": 0.05, "backend": "torch"})
    opt = make_optimizer(build_model("tiny"), "microadam@k_init=0.05,m=4")
    assert opt.defaults["k_init"] == 0.05 and opt.defaults["m"] == 4
    assert is_known("adamw-split@adamw_lr=0.01") and not is_known("nope@x=1") and not is_known("adamw@x")


def test_which_optimizers_take_a_second_lr():
    """Read from the class's constructor (an ``adamw_lr`` argument) or the baseline's entry: the pre-training
    sweep tunes it after the main lr."""
    from slimopt.bench.baselines import takes_second_lr

    assert [n for n in ("adamw", "microadam", "adammini", "sinkgd", "swan", "adamw-split", "muon", "galore",
                        "sinkgd@scale=0.1") if takes_second_lr(n)] == ["sinkgd", "swan", "adamw-split",
                                                                       "sinkgd@scale=0.1"]


def test_the_matrix_baselines_take_the_hybrids_split():
    """Muon and GaLore train the hidden matrices SinkGD and SWAN route to their matrix update (the plan, from
    module types and shapes), the rest with AdamW: GPT-2's Conv1D blocks are matrices, its embeddings wte/wpe
    are not."""
    transformers = pytest.importorskip("transformers")
    model = transformers.GPT2LMHeadModel(transformers.GPT2Config(vocab_size=64, n_embd=16, n_layer=1, n_head=2,
                                                                 n_positions=8, bos_token_id=0, eos_token_id=0))
    hidden, rest = hybrid_split(model)
    names = {id(p): n for n, p in model.named_parameters()}
    assert sorted(names[id(p)] for p in hidden) == ["transformer.h.0.attn.c_attn.weight",
                                                     "transformer.h.0.attn.c_proj.weight",
                                                     "transformer.h.0.mlp.c_fc.weight",
                                                     "transformer.h.0.mlp.c_proj.weight"]
    assert {"transformer.wte.weight", "transformer.wpe.weight"} <= {names[id(p)] for p in rest}
    if hasattr(torch.optim, "Muon"):
        muon = make_optimizer(model, "muon", lr=1e-3)
        assert [{id(p) for p in g["params"]} for g in muon.param_groups] == [{id(p) for p in hidden},
                                                                            {id(p) for p in rest}]
