"""The Llama-family decoder (Llama, Mistral, Qwen2): one readable forward over a paged KV cache.

q/k/v and gate/up are fused into one matmul each; LoRA deltas are added by a hook on the output
slice of each of the seven projections, so the base matmul runs once for the whole batch.
"""

from __future__ import annotations

from typing import Protocol

import torch
import torch.nn.functional as F
from torch import nn

from node.models.attention import AttentionBatch, paged_attention
from node.models.config import ModelConfig
from node.models.quant import linear
from node.models.rotary import RotaryEmbedding


class LoRAHook(Protocol):
    def apply(self, layer: int, group: str, x: torch.Tensor, out: torch.Tensor) -> None:
        """Add the batch's LoRA deltas of a projection group ("qkv", "o", "gate_up", "down") in `layer`
        for their shared input x [T, in] into their fused output out [T, sum of out features]."""
        ...


def _param(*shape: int, dtype: torch.dtype) -> nn.Parameter:
    return nn.Parameter(torch.empty(shape, dtype=dtype), requires_grad=False)


class RMSNorm(nn.Module):
    def __init__(self, size: int, eps: float, dtype: torch.dtype):
        super().__init__()
        self.weight, self.eps = _param(size, dtype=dtype), eps

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x32 = x.float()
        x32 = x32 * torch.rsqrt(x32.pow(2).mean(-1, keepdim=True) + self.eps)
        return self.weight * x32.to(x.dtype)


class DecoderLayer(nn.Module):
    def __init__(self, cfg: ModelConfig, index: int, dtype: torch.dtype):
        super().__init__()
        self.cfg, self.index = cfg, index
        h = cfg.hidden_size
        self.input_norm = RMSNorm(h, cfg.rms_norm_eps, dtype)
        self.post_attention_norm = RMSNorm(h, cfg.rms_norm_eps, dtype)
        self.qkv_weight = _param(cfg.q_size + 2 * cfg.kv_size, h, dtype=dtype)
        self.qkv_bias = _param(cfg.q_size + 2 * cfg.kv_size, dtype=dtype) if cfg.qkv_bias else None
        self.o_weight = _param(h, cfg.q_size, dtype=dtype)
        self.o_bias = _param(h, dtype=dtype) if cfg.o_bias else None
        self.gate_up_weight = _param(2 * cfg.intermediate_size, h, dtype=dtype)
        self.down_weight = _param(h, cfg.intermediate_size, dtype=dtype)

    def forward(self, x: torch.Tensor, positions: torch.Tensor, batch: AttentionBatch,
                kv: tuple[torch.Tensor, torch.Tensor], rotary: RotaryEmbedding, lora: LoRAHook | None,
                ) -> torch.Tensor:
        cfg, i = self.cfg, self.index
        h = self.input_norm(x)
        qkv = linear(h, self.qkv_weight, self.qkv_bias)  # [T, q + 2 kv]
        if lora is not None:
            lora.apply(i, "qkv", h, qkv)
        q, k, v = qkv.split([cfg.q_size, cfg.kv_size, cfg.kv_size], dim=-1)
        q = q.reshape(-1, cfg.num_heads, cfg.head_dim)  # [T, H, D]
        k = k.reshape(-1, cfg.num_kv_heads, cfg.head_dim)  # [T, KVH, D]
        v = v.reshape(-1, cfg.num_kv_heads, cfg.head_dim)
        q, k = rotary(positions, q, k)
        attn = paged_attention(q, k, v, kv[0], kv[1], batch, cfg.head_dim ** -0.5)  # [T, H * D]
        o = linear(attn, self.o_weight, self.o_bias)
        if lora is not None:
            lora.apply(i, "o", attn, o)
        x = x + o
        h = self.post_attention_norm(x)
        gate_up = linear(h, self.gate_up_weight)  # [T, 2 I]
        if lora is not None:
            lora.apply(i, "gate_up", h, gate_up)
        gate, up = gate_up.split(cfg.intermediate_size, dim=-1)
        act = F.silu(gate) * up
        down = linear(act, self.down_weight)
        if lora is not None:
            lora.apply(i, "down", act, down)
        return x + down


class LlamaForCausalLM(nn.Module):
    def __init__(self, cfg: ModelConfig, dtype: torch.dtype, max_positions: int):
        super().__init__()
        self.cfg = cfg
        self.embed = _param(cfg.vocab_size, cfg.hidden_size, dtype=dtype)
        self.layers = nn.ModuleList(DecoderLayer(cfg, i, dtype) for i in range(cfg.num_layers))
        self.norm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps, dtype)
        tied = cfg.tie_embeddings
        self.lm_head = self.embed if tied else _param(cfg.vocab_size, cfg.hidden_size, dtype=dtype)
        scaling = dict(cfg.rope_scaling) if cfg.rope_scaling else None
        self.rotary = RotaryEmbedding(cfg.head_dim, max_positions, cfg.rope_theta, scaling)

    def forward(self, input_ids: torch.Tensor, positions: torch.Tensor, batch: AttentionBatch,
                kv_caches: list[tuple[torch.Tensor, torch.Tensor]], lora: LoRAHook | None = None,
                ) -> torch.Tensor:
        """input_ids, positions: [T] -> final hidden states [T, hidden] (normed)."""
        x = F.embedding(input_ids, self.embed)
        for layer, kv in zip(self.layers, kv_caches, strict=True):
            x = layer(x, positions, batch, kv, self.rotary, lora)
        return self.norm(x)

    def logits(self, hidden: torch.Tensor) -> torch.Tensor:
        """hidden: [N, hidden] -> float32 logits [N, vocab]."""
        return F.linear(hidden, self.lm_head).float()
