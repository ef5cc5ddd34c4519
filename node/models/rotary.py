"""Rotary position embeddings, HF half-rotation layout, with transformers' rope scalings.

Frequencies follow transformers' `ROPE_INIT_FUNCTIONS` (default, linear, llama3, yarn, dynamic,
longrope), computed in float32 as they are there, and yarn's and longrope's attention factor scales
cos and sin. Two of them depend on the sequence length in transformers: "dynamic" (NTK) recomputes
its base once a forward reaches past `max_position_embeddings`, "longrope" switches from the short
to the long factors past `original_max_position_embeddings`. Here a token's rotation depends on its
own position alone: position p is rotated as transformers rotates a step whose sequence is p + 1
long. That is exactly what transformers' generate does one token at a time once the prompt fits in
the trained length (cached keys keep the rotation they were written with), and it keeps every
cached key valid whatever follows it. A prompt longer than that is rotated per position here, where
a single transformers forward rotates all of it for its full length.
"""

from __future__ import annotations

import math

import torch

from node.models.config import Rope


def _arange_half(dim: int) -> torch.Tensor:
    return torch.arange(0, dim, 2, dtype=torch.int64).float() / dim  # [D/2] exponents


def inverse_frequencies(dim: int, rope: Rope, max_positions: int) -> tuple[torch.Tensor, float]:
    """([max_positions, D/2] float32 angular frequencies of each position, attention factor)."""
    inv = 1.0 / (rope.theta ** _arange_half(dim))
    attention = 1.0
    if rope.kind == "linear":
        inv = inv / float(rope.param("factor"))
    elif rope.kind == "llama3":
        inv = _llama3(inv, rope)
    elif rope.kind == "yarn":
        inv, attention = _yarn(dim, rope)
    elif rope.kind == "dynamic":
        return _dynamic(dim, rope, max_positions), attention
    elif rope.kind == "longrope":
        return _longrope(dim, rope, max_positions)
    return inv.expand(max_positions, -1), attention


def _llama3(inv: torch.Tensor, rope: Rope) -> torch.Tensor:
    factor = float(rope.param("factor"))
    low, high = float(rope.param("low_freq_factor")), float(rope.param("high_freq_factor"))
    old_len = float(rope.param("original_max_position_embeddings"))
    low_wavelen, high_wavelen = old_len / low, old_len / high
    wavelen = 2 * math.pi / inv
    scaled = torch.where(wavelen > low_wavelen, inv / factor, inv)
    smooth = (old_len / wavelen - low) / (high - low)
    smoothed = (1 - smooth) * scaled / factor + smooth * scaled
    is_medium = (wavelen >= high_wavelen) & (wavelen <= low_wavelen)
    return torch.where(is_medium, smoothed, scaled)


def _mscale(scale: float, mscale: float = 1.0) -> float:
    return 1.0 if scale <= 1 else 0.1 * mscale * math.log(scale) + 1.0


def _yarn(dim: int, rope: Rope) -> tuple[torch.Tensor, float]:
    """YaRN: interpolate the low frequencies, keep the high ones, ramp between; scale attention."""
    original = rope.param("original_max_position_embeddings")
    factor = rope.param("factor") or rope.max_position_embeddings / original
    attention = rope.param("attention_factor")
    if attention is None:
        mscale, mscale_all = rope.param("mscale"), rope.param("mscale_all_dim")
        attention = _mscale(factor, mscale) / _mscale(factor, mscale_all) if mscale and mscale_all else _mscale(factor)
    beta_fast, beta_slow = rope.param("beta_fast") or 32, rope.param("beta_slow") or 1

    def correction_dim(rotations: float) -> float:
        return (dim * math.log(original / (rotations * 2 * math.pi))) / (2 * math.log(rope.theta))

    low, high = correction_dim(beta_fast), correction_dim(beta_slow)
    if rope.param("truncate", True):
        low, high = math.floor(low), math.ceil(high)
    low, high = max(low, 0), min(high, dim - 1)
    if low == high:
        high += 0.001
    ramp = torch.clamp((torch.arange(dim // 2, dtype=torch.float32) - low) / (high - low), 0, 1)
    pos_freqs = rope.theta ** (torch.arange(0, dim, 2).float() / dim)
    extrapolation = 1 - ramp  # [D/2]: 1 keeps the frequency, 0 interpolates it
    inv = (1.0 / (factor * pos_freqs)) * (1 - extrapolation) + (1.0 / pos_freqs) * extrapolation
    return inv, float(attention)


def _dynamic(dim: int, rope: Rope, max_positions: int) -> torch.Tensor:
    """NTK: position p uses the base transformers computes for a sequence max(p + 1, trained) long."""
    factor, trained = float(rope.param("factor")), rope.max_position_embeddings
    seq_lens = torch.arange(1, max_positions + 1).clamp(min=trained)  # [P] int64
    bases = rope.theta * ((factor * seq_lens / trained) - (factor - 1)) ** (dim / (dim - 2))  # [P] float32
    inv = 1.0 / (bases[:, None] ** _arange_half(dim)[None, :])  # [P, D/2]
    default = 1.0 / (rope.theta ** _arange_half(dim))
    is_trained = (torch.arange(max_positions) < trained)[:, None]
    return torch.where(is_trained, default, inv)


def _longrope(dim: int, rope: Rope, max_positions: int) -> tuple[torch.Tensor, float]:
    """LongRoPE: per-frequency factors, the long ones at positions past the original length."""
    original = rope.param("original_max_position_embeddings")
    factor = rope.param("factor") or rope.max_position_embeddings / original
    attention = rope.param("attention_factor")
    if attention is None:
        attention = 1.0 if factor <= 1.0 else math.sqrt(1 + math.log(factor) / math.log(original))
    shape = _arange_half(dim)
    short = 1.0 / (torch.tensor(rope.param("short_factor"), dtype=torch.float32) * rope.theta ** shape)
    long = 1.0 / (torch.tensor(rope.param("long_factor"), dtype=torch.float32) * rope.theta ** shape)
    is_long = (torch.arange(max_positions) + 1 > original)[:, None]  # [P, 1]
    return torch.where(is_long, long, short), float(attention)


class RotaryEmbedding(torch.nn.Module):
    """Precomputed cos/sin tables indexed by absolute position."""

    cos: torch.Tensor  # [P, D] buffers
    sin: torch.Tensor

    def __init__(self, head_dim: int, max_positions: int, rope: Rope):
        super().__init__()
        inv, attention = inverse_frequencies(head_dim, rope, max_positions)  # [P, D/2]
        freqs = torch.arange(max_positions, dtype=torch.float32)[:, None] * inv  # [P, D/2]
        emb = torch.cat([freqs, freqs], dim=-1)  # [P, D]
        self.register_buffer("cos", emb.cos() * attention, persistent=False)
        self.register_buffer("sin", emb.sin() * attention, persistent=False)

    def forward(self, positions: torch.Tensor, q: torch.Tensor, k: torch.Tensor,
                ) -> tuple[torch.Tensor, torch.Tensor]:
        """q: [T, H, D], k: [T, KVH, D], positions: [T] -> rotated q, k in their dtype."""
        cos = self.cos[positions].unsqueeze(1)  # [T, 1, D]
        sin = self.sin[positions].unsqueeze(1)
        return _rotate(q, cos, sin), _rotate(k, cos, sin)


def _rotate(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    x32 = x.float()
    half = x32.shape[-1] // 2
    rotated = torch.cat([-x32[..., half:], x32[..., :half]], dim=-1)
    return (x32 * cos + rotated * sin).to(x.dtype)
