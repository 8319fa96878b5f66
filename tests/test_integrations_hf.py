"""HF Trainer: every optimizer through ``optimizer_cls_and_kwargs``, and an exact resume.

A tiny ``LlamaForCausalLM`` (local config, no download) trains on CPU. The resume test is the one that
matters: a run interrupted at a checkpoint and resumed with ``resume_from_checkpoint`` must end with
the *same bits* as the uninterrupted run (Trainer saves the optimizer with ``torch.save`` and loads it
with ``weights_only=True``; our optimizers must survive that and keep their state dtypes).
"""

from __future__ import annotations

import warnings

import pytest
import torch

import slimopt
from slimopt.integrations import OptimizerFactory, hf_optimizer_cls_and_kwargs, weight_decay_groups
from slimopt.registry import spec

transformers = pytest.importorskip("transformers")
pytest.importorskip("accelerate")  # the Trainer needs it

NAMES = slimopt.get_supported_optimizers()
SEQ, VOCAB = 16, 64



def tiny_llama(seed: int):
    torch.manual_seed(seed)
    config = transformers.LlamaConfig(vocab_size=VOCAB, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                                      num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=SEQ)
    return transformers.LlamaForCausalLM(config)


class TokenData(torch.utils.data.Dataset):
    """Random token sequences with a learnable pattern (each token repeats the one two places back)."""

    def __init__(self, n: int = 48):
        g = torch.Generator().manual_seed(0)
        start = torch.randint(0, VOCAB, (n, 2), generator=g)
        self.ids = start.repeat(1, SEQ // 2)

    def __len__(self):
        return len(self.ids)

    def __getitem__(self, i):
        return {"input_ids": self.ids[i], "labels": self.ids[i]}


def training_args(out, max_steps: int, **kw):
    return transformers.TrainingArguments(
        output_dir=str(out), max_steps=max_steps, per_device_train_batch_size=4, learning_rate=kw.pop("lr", 1e-2),
        lr_scheduler_type="linear", warmup_steps=2, weight_decay=0.01, save_strategy="steps", save_steps=3,
        logging_strategy="no", report_to=[], use_cpu=True, seed=0, data_seed=0, dataloader_num_workers=0,
        disable_tqdm=True, **kw)


def run(model, args, optimizer_cls_and_kwargs, resume=None):
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # plan warnings for unrecognised tensors, Trainer deprecations
        trainer = transformers.Trainer(model=model, args=args, train_dataset=TokenData(),
                                       optimizer_cls_and_kwargs=optimizer_cls_and_kwargs)
        trainer.train(resume_from_checkpoint=resume)
    return trainer


@pytest.mark.parametrize("name", NAMES)
def test_trainer_resume_from_checkpoint_is_bit_exact(name, tmp_path):
    lr = spec(name).example_lr
    full = tiny_llama(seed=0)
    before = {n: p.detach().clone() for n, p in full.named_parameters()}
    trainer = run(full, training_args(tmp_path / "full", 6, lr=lr), hf_optimizer_cls_and_kwargs(name, lr=lr,
                                                                                            weight_decay=0.01))
    assert isinstance(trainer.optimizer.optimizer, slimopt.load_optimizer(name))
    moved = [n for n, p in full.named_parameters() if not torch.equal(p, before[n])]
    assert len(moved) == len(before), "every tensor trains"

    resumed = tiny_llama(seed=1)  # another init: everything must come from the checkpoint
    run(resumed, training_args(tmp_path / "full", 6, lr=lr),
        hf_optimizer_cls_and_kwargs(name, lr=lr, weight_decay=0.01), resume=str(tmp_path / "full" / "checkpoint-3"))
    for (n, a), b in zip(full.named_parameters(), resumed.parameters()):
        assert torch.equal(a, b), f"{name}: {n} differs after resume"


@pytest.mark.parametrize("name", NAMES)
def test_trainer_takes_the_optimizer_class_itself(name, tmp_path):
    """``optimizer_cls_and_kwargs=(cls, kwargs)``: the Trainer calls ``cls(two bare groups, **kwargs)``.
    Every optimizer must construct and train from that, keeping the Trainer's decay split."""
    cls = slimopt.load_optimizer(name)
    model = tiny_llama(seed=0)
    before = [p.detach().clone() for p in model.parameters()]
    trainer = run(model, training_args(tmp_path, 2), (cls, {"lr": spec(name).example_lr}))
    opt = trainer.optimizer.optimizer
    assert isinstance(opt, cls)
    assert any(not torch.equal(a, b) for a, b in zip(before, model.parameters()))
    assert all(torch.isfinite(p).all() for p in model.parameters())
    decays = {id(p): g["weight_decay"] for g in opt.param_groups for p in g["params"]}
    assert decays[id(model.model.norm.weight)] == 0.0
    assert decays[id(model.model.layers[0].mlp.up_proj.weight)] == 0.01


def test_factory_builds_through_create_optimizer_with_names():
    model = tiny_llama(seed=0)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        opt = OptimizerFactory()(model, name="adammini", lr=1e-3, weight_decay=0.1)
    names = [n for g in opt.param_groups for n in g["param_names"]]
    assert sorted(names) == sorted(n for n, _ in model.named_parameters())
    # The partition came from model.config: q_proj is cut into 4 heads, k_proj into 2 (GQA).
    layouts = {n: lay for g in opt.param_groups for n, lay in zip(g["param_names"], g["param_layouts"])}
    assert layouts["model.layers.0.self_attn.q_proj.weight"]["n_blocks"] == 4
    assert layouts["model.layers.0.self_attn.k_proj.weight"]["n_blocks"] == 2


def test_factory_without_from_model_uses_the_trainers_decay_split():
    model = tiny_llama(seed=0)
    opt = OptimizerFactory("adamw")(model, lr=1e-3, weight_decay=0.1)
    decays = {id(p): g["weight_decay"] for g in opt.param_groups for p in g["params"]}
    assert decays[id(model.model.norm.weight)] == 0.0
    assert decays[id(model.model.layers[0].input_layernorm.weight)] == 0.0
    assert decays[id(model.model.embed_tokens.weight)] == 0.1
    assert len(decays) == len(list(model.parameters()))
    groups = weight_decay_groups(model, 0.1)
    assert [len(g["params"]) for g in groups] == [len(g["params"]) for g in opt.param_groups]


def test_factory_errors_name_what_is_missing():
    with pytest.raises(ValueError, match="name"):
        OptimizerFactory()(torch.nn.Linear(2, 2), lr=1e-3)
    with pytest.raises(ValueError, match="lr"):
        OptimizerFactory("adamw")(torch.nn.Linear(2, 2))
    with pytest.raises(ValueError, match="lr"):
        hf_optimizer_cls_and_kwargs("adamw")
