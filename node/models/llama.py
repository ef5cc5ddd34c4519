"""The Llama-family decoder (Llama, Mistral, Qwen2, Qwen3, Phi-3): one readable forward over a paged KV cache.

q/k/v and gate/up are fused into one matmul each; LoRA deltas are added by a hook on the output
slice of each of the seven projections, so the base matmul runs once for the whole batch. The
family's variants are options of the same layer: q/k/v bias (Qwen2), a per-head RMSNorm of q and k
before the rotation (Qwen3), a sliding window per layer (Mistral, Qwen2/3's upper layers), rope
scalings per layer (`rotary.py`). Gemma (`gemma.py`) reuses the attention and the MLP; Phi-3
(`phi3.py`) only names its checkpoint differently.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Protocol

import torch
import torch.nn.functional as F
from torch import nn

from node.models.attention import AttentionBatch, LayerAttention, paged_attention
from node.models.config import ModelConfig, Rope
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


ACTIVATIONS: dict[str, Callable[[torch.Tensor], torch.Tensor]] = {
    "silu": F.silu, "gelu_pytorch_tanh": lambda x: F.gelu(x, approximate="tanh")}


class DecoderLayer(nn.Module):
    norm_class: type[RMSNorm] = RMSNorm

    def __init__(self, cfg: ModelConfig, index: int, dtype: torch.dtype):
        super().__init__()
        self.cfg, self.index = cfg, index
        spec = cfg.layers[index]
        self.attention_options = LayerAttention(cfg.attn_scale, spec.window, cfg.attn_softcap)
        self.act = ACTIVATIONS[cfg.activation]
        h, norm = cfg.hidden_size, self.norm_class
        self.input_norm = norm(h, cfg.rms_norm_eps, dtype)
        self.post_attention_norm = norm(h, cfg.rms_norm_eps, dtype)
        self.q_norm = norm(cfg.head_dim, cfg.rms_norm_eps, dtype) if cfg.qk_norm else None
        self.k_norm = norm(cfg.head_dim, cfg.rms_norm_eps, dtype) if cfg.qk_norm else None
        self.qkv_weight = _param(cfg.q_size + 2 * cfg.kv_size, h, dtype=dtype)
        self.qkv_bias = _param(cfg.q_size + 2 * cfg.kv_size, dtype=dtype) if cfg.qkv_bias else None
        self.o_weight = _param(h, cfg.q_size, dtype=dtype)
        self.o_bias = _param(h, dtype=dtype) if cfg.o_bias else None
        self.gate_up_weight = _param(2 * cfg.intermediate_size, h, dtype=dtype)
        self.down_weight = _param(h, cfg.intermediate_size, dtype=dtype)

    def attention(self, h: torch.Tensor, positions: torch.Tensor, batch: AttentionBatch,
                  kv: tuple[torch.Tensor, torch.Tensor], rotary: RotaryEmbedding, lora: LoRAHook | None,
                  ) -> torch.Tensor:
        """h: [T, hidden] (normed) -> the attention block's output [T, hidden], o_proj included."""
        cfg, i = self.cfg, self.index
        qkv = linear(h, self.qkv_weight, self.qkv_bias)  # [T, q + 2 kv]
        if lora is not None:
            lora.apply(i, "qkv", h, qkv)
        q, k, v = qkv.split([cfg.q_size, cfg.kv_size, cfg.kv_size], dim=-1)
        q = q.reshape(-1, cfg.num_heads, cfg.head_dim)  # [T, H, D]
        k = k.reshape(-1, cfg.num_kv_heads, cfg.head_dim)  # [T, KVH, D]
        v = v.reshape(-1, cfg.num_kv_heads, cfg.head_dim)
        if self.q_norm is not None and self.k_norm is not None:
            q, k = self.q_norm(q), self.k_norm(k)
        q, k = rotary(positions, q, k)
        attn = paged_attention(q, k, v, kv[0], kv[1], batch, self.attention_options)  # [T, H * D]
        o = linear(attn, self.o_weight, self.o_bias)
        if lora is not None:
            lora.apply(i, "o", attn, o)
        return o

    def mlp(self, h: torch.Tensor, lora: LoRAHook | None) -> torch.Tensor:
        """h: [T, hidden] (normed) -> down_proj(act(gate_proj h) * up_proj h) [T, hidden]."""
        gate_up = linear(h, self.gate_up_weight)  # [T, 2 I]
        if lora is not None:
            lora.apply(self.index, "gate_up", h, gate_up)
        gate, up = gate_up.split(self.cfg.intermediate_size, dim=-1)
        act = self.act(gate) * up
        down = linear(act, self.down_weight)
        if lora is not None:
            lora.apply(self.index, "down", act, down)
        return down

    def forward(self, x: torch.Tensor, positions: torch.Tensor, batch: AttentionBatch,
                kv: tuple[torch.Tensor, torch.Tensor], rotary: RotaryEmbedding, lora: LoRAHook | None,
                ) -> torch.Tensor:
        x = x + self.attention(self.input_norm(x), positions, batch, kv, rotary, lora)
        return x + self.mlp(self.post_attention_norm(x), lora)


class LlamaForCausalLM(nn.Module):
    layer_class: type[DecoderLayer] = DecoderLayer

    def __init__(self, cfg: ModelConfig, dtype: torch.dtype, max_positions: int):
        super().__init__()
        self.cfg = cfg
        self.embed = _param(cfg.vocab_size, cfg.hidden_size, dtype=dtype)
        self.layers = nn.ModuleList(self.layer_class(cfg, i, dtype) for i in range(cfg.num_layers))
        self.norm = self.layer_class.norm_class(cfg.hidden_size, cfg.rms_norm_eps, dtype)
        tied = cfg.tie_embeddings
        self.lm_head = self.embed if tied else _param(cfg.vocab_size, cfg.hidden_size, dtype=dtype)
        ropes: dict[Rope, int] = {}
        for spec in cfg.layers:
            ropes.setdefault(spec.rope, len(ropes))
        self.rotaries = nn.ModuleList(RotaryEmbedding(cfg.head_dim, max_positions, rope) for rope in ropes)
        self.rotary_of = [ropes[spec.rope] for spec in cfg.layers]  # layer -> its table in `rotaries`

    def embed_tokens(self, input_ids: torch.Tensor) -> torch.Tensor:
        return F.embedding(input_ids, self.embed)

    def forward(self, input_ids: torch.Tensor, positions: torch.Tensor, batch: AttentionBatch,
                kv_caches: list[tuple[torch.Tensor, torch.Tensor]], lora: LoRAHook | None = None,
                ) -> torch.Tensor:
        """input_ids, positions: [T] -> final hidden states [T, hidden] (normed)."""
        x = self.embed_tokens(input_ids)
        for layer, kv, rotary in zip(self.layers, kv_caches, self.rotary_of, strict=True):
            x = layer(x, positions, batch, kv, self.rotaries[rotary], lora)
        hidden: torch.Tensor = self.norm(x)
        return hidden

    def logits(self, hidden: torch.Tensor) -> torch.Tensor:
        """hidden: [N, hidden] -> float32 logits [N, vocab]."""
        return F.linear(hidden, self.lm_head).float()
