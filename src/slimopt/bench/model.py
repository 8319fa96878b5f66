"""A LLaMA-style decoder for the benchmarks, written here so the harness needs no model hub.

RMSNorm, rotary position embeddings (half-split rotation, as Hugging Face LLaMA), SwiGLU MLP, optional
grouped-query attention, untied output head, no biases. Parameter names are exactly Hugging Face's
``LlamaModel`` names without the ``model.`` prefix (``layers.3.self_attn.q_proj.weight``,
``lm_head.weight``, ...), so optimizers that plan by name (Adam-mini blocks, SinkGD/SWAN routing) see the
model they were designed for. ``model.config`` carries the shape facts those planners read.

The presets follow the GaLore C4 protocol (60M ... 1B) plus small ones that train on two CPU cores.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, replace

import torch
import torch.nn.functional as F
from torch import Tensor, nn

__all__ = ["PRESETS", "LlamaConfig", "LlamaDecoder", "build_model", "count_parameters"]


@dataclass(frozen=True)
class LlamaConfig:
    vocab_size: int
    hidden_size: int
    intermediate_size: int
    num_hidden_layers: int
    num_attention_heads: int
    num_key_value_heads: int
    head_dim: int
    max_position_embeddings: int
    rms_norm_eps: float = 1e-6
    rope_theta: float = 10000.0
    initializer_range: float = 0.02

    def to_dict(self) -> dict:
        return asdict(self)


def _config(vocab: int, hidden: int, layers: int, heads: int, ffn: int, *, kv_heads: int | None = None,
            max_positions: int = 1024) -> LlamaConfig:
    return LlamaConfig(vocab_size=vocab, hidden_size=hidden, intermediate_size=ffn, num_hidden_layers=layers,
                       num_attention_heads=heads, num_key_value_heads=kv_heads or heads,
                       head_dim=hidden // heads, max_position_embeddings=max_positions)


# Byte-level presets use vocab 256; build_model(..., vocab_size=) swaps in a tokenizer's vocabulary.
PRESETS: dict[str, LlamaConfig] = {
    "tiny": _config(256, 128, 4, 4, 344, kv_heads=2, max_positions=256),     # ~0.8M, for tests
    "cpu": _config(256, 256, 4, 4, 688, max_positions=512),                 # ~3.3M, trains on 2 cores
    "step42m": _config(16384, 512, 8, 8, 1376),                             # ~42.1M, step-time benchmark
    # GaLore's LLaMA-on-C4 configurations (LLaMA tokenizer, vocab 32000).
    "60m": _config(32000, 512, 8, 8, 1376),
    "130m": _config(32000, 768, 12, 12, 2048),
    "350m": _config(32000, 1024, 24, 16, 2736),
    "1b": _config(32000, 2048, 24, 32, 5461),
}


class RMSNorm(nn.Module):
    def __init__(self, size: int, eps: float) -> None:
        super().__init__()
        self.weight = nn.Parameter(torch.ones(size))
        self.eps = eps

    def forward(self, x: Tensor) -> Tensor:
        # Normalise in float32 (bf16 autocast would otherwise square in low precision), as LLaMA does.
        x32 = x.float()
        x32 = x32 * torch.rsqrt(x32.pow(2).mean(-1, keepdim=True) + self.eps)
        return self.weight * x32.to(x.dtype)


def _rotate_half(x: Tensor) -> Tensor:
    first, second = x.chunk(2, dim=-1)
    return torch.cat((-second, first), dim=-1)


def apply_rotary(x: Tensor, cos: Tensor, sin: Tensor) -> Tensor:
    """Rotate query/key pairs (i, i + head_dim/2) by position-dependent angles (HF LLaMA layout)."""
    return x * cos + _rotate_half(x) * sin


class RotaryEmbedding(nn.Module):
    def __init__(self, head_dim: int, theta: float) -> None:
        super().__init__()
        inv_freq = 1.0 / (theta ** (torch.arange(0, head_dim, 2, dtype=torch.float32) / head_dim))
        self.register_buffer("inv_freq", inv_freq, persistent=False)  # not a parameter, not saved

    def forward(self, seq_len: int, dtype: torch.dtype) -> tuple[Tensor, Tensor]:
        positions = torch.arange(seq_len, device=self.inv_freq.device, dtype=torch.float32)
        angles = torch.outer(positions, self.inv_freq)
        angles = torch.cat((angles, angles), dim=-1)  # (seq, head_dim)
        return angles.cos().to(dtype), angles.sin().to(dtype)


class Attention(nn.Module):
    def __init__(self, config: LlamaConfig) -> None:
        super().__init__()
        self.num_heads = config.num_attention_heads
        self.num_kv_heads = config.num_key_value_heads
        self.head_dim = config.head_dim
        if self.num_heads % self.num_kv_heads:
            raise ValueError(f"num_attention_heads={self.num_heads} is not a multiple of "
                             f"num_key_value_heads={self.num_kv_heads}")
        hidden = config.hidden_size
        q_out, kv_out = self.num_heads * self.head_dim, self.num_kv_heads * self.head_dim
        self.q_proj = nn.Linear(hidden, q_out, bias=False)
        self.k_proj = nn.Linear(hidden, kv_out, bias=False)
        self.v_proj = nn.Linear(hidden, kv_out, bias=False)
        self.o_proj = nn.Linear(q_out, hidden, bias=False)

    def forward(self, x: Tensor, cos: Tensor, sin: Tensor) -> Tensor:
        batch, seq, _ = x.shape
        q = self.q_proj(x).view(batch, seq, self.num_heads, self.head_dim).transpose(1, 2)
        k = self.k_proj(x).view(batch, seq, self.num_kv_heads, self.head_dim).transpose(1, 2)
        v = self.v_proj(x).view(batch, seq, self.num_kv_heads, self.head_dim).transpose(1, 2)
        q, k = apply_rotary(q, cos, sin), apply_rotary(k, cos, sin)
        if self.num_kv_heads != self.num_heads:  # grouped-query attention: one kv head per group of q heads
            group = self.num_heads // self.num_kv_heads
            k, v = k.repeat_interleave(group, dim=1), v.repeat_interleave(group, dim=1)
        out = F.scaled_dot_product_attention(q, k, v, is_causal=True)
        return self.o_proj(out.transpose(1, 2).reshape(batch, seq, -1))


class MLP(nn.Module):
    """SwiGLU: down(silu(gate(x)) * up(x))."""

    def __init__(self, config: LlamaConfig) -> None:
        super().__init__()
        self.gate_proj = nn.Linear(config.hidden_size, config.intermediate_size, bias=False)
        self.up_proj = nn.Linear(config.hidden_size, config.intermediate_size, bias=False)
        self.down_proj = nn.Linear(config.intermediate_size, config.hidden_size, bias=False)

    def forward(self, x: Tensor) -> Tensor:
        return self.down_proj(F.silu(self.gate_proj(x)) * self.up_proj(x))


class DecoderLayer(nn.Module):
    def __init__(self, config: LlamaConfig) -> None:
        super().__init__()
        self.input_layernorm = RMSNorm(config.hidden_size, config.rms_norm_eps)
        self.self_attn = Attention(config)
        self.post_attention_layernorm = RMSNorm(config.hidden_size, config.rms_norm_eps)
        self.mlp = MLP(config)

    def forward(self, x: Tensor, cos: Tensor, sin: Tensor) -> Tensor:
        x = x + self.self_attn(self.input_layernorm(x), cos, sin)
        return x + self.mlp(self.post_attention_layernorm(x))


class LlamaDecoder(nn.Module):
    """Token ids (batch, seq) -> next-token logits (batch, seq, vocab)."""

    def __init__(self, config: LlamaConfig) -> None:
        super().__init__()
        self.config = config
        self.embed_tokens = nn.Embedding(config.vocab_size, config.hidden_size)
        self.layers = nn.ModuleList(DecoderLayer(config) for _ in range(config.num_hidden_layers))
        self.norm = RMSNorm(config.hidden_size, config.rms_norm_eps)
        self.lm_head = nn.Linear(config.hidden_size, config.vocab_size, bias=False)
        self.rotary = RotaryEmbedding(config.head_dim, config.rope_theta)
        self.reset_parameters()

    def reset_parameters(self) -> None:
        # LLaMA's initialisation: N(0, 0.02) for every matrix and the embedding, ones for the norms.
        for name, p in self.named_parameters():
            if name.endswith("layernorm.weight") or name == "norm.weight":
                nn.init.ones_(p)
            else:
                nn.init.normal_(p, mean=0.0, std=self.config.initializer_range)

    def forward(self, input_ids: Tensor) -> Tensor:
        seq = input_ids.shape[1]
        if seq > self.config.max_position_embeddings:
            raise ValueError(f"sequence length {seq} exceeds max_position_embeddings="
                             f"{self.config.max_position_embeddings}")
        x = self.embed_tokens(input_ids)
        device = x.device.type
        dtype = torch.get_autocast_dtype(device) if torch.is_autocast_enabled(device) else x.dtype
        cos, sin = self.rotary(seq, dtype)
        for layer in self.layers:
            x = layer(x, cos, sin)
        return self.lm_head(self.norm(x))


def build_model(preset: str, vocab_size: int | None = None, **overrides) -> LlamaDecoder:
    """The decoder for ``preset`` (see ``PRESETS``), optionally with another vocabulary size.

    ``overrides`` replace any other ``LlamaConfig`` field (``max_position_embeddings=...``).
    """
    if preset not in PRESETS:
        raise ValueError(f"unknown model preset {preset!r} (choose from {', '.join(PRESETS)})")
    config = PRESETS[preset]
    if vocab_size is not None:
        overrides["vocab_size"] = vocab_size
    if overrides:
        config = replace(config, **overrides)
    return LlamaDecoder(config)


def count_parameters(config: LlamaConfig) -> int:
    """Parameter count from the config alone (no allocation), for the big presets."""
    h, f, v = config.hidden_size, config.intermediate_size, config.vocab_size
    layers = config.num_hidden_layers
    q_out = config.num_attention_heads * config.head_dim
    kv_out = config.num_key_value_heads * config.head_dim
    per_layer = h * q_out + 2 * h * kv_out + q_out * h + 3 * h * f + 2 * h
    return 2 * v * h + layers * per_layer + h


def preset_summary() -> str:
    rows = [f"{name:8s} {count_parameters(c) / 1e6:8.1f}M  hidden {c.hidden_size}, "
            f"layers {c.num_hidden_layers}, heads {c.num_attention_heads}/{c.num_key_value_heads}, "
            f"ffn {c.intermediate_size}, vocab {c.vocab_size}"
            for name, c in PRESETS.items()]
    return "\n".join(rows)


def flops_per_token(config: LlamaConfig, seq_len: int) -> float:
    """Training FLOPs per token: 6 x matmul parameters plus the attention score/value products."""
    matmul_params = count_parameters(config) - config.vocab_size * config.hidden_size  # embedding is a lookup
    # Scores and weighted values: 4*seq*width per layer forward, x3 for training, halved by causal masking.
    attention = 6 * config.num_hidden_layers * seq_len * config.num_attention_heads * config.head_dim
    return 6.0 * matmul_params + attention
