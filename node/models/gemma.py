"""Gemma 2 and Gemma 3 (text): the Llama layer's attention and MLP, Gemma's norms and scalings.

What differs from `llama.py`, all read from config.json by `config.py`:
  - RMSNorm scales by (1 + weight), in float32;
  - four norms per layer: the attention's and the MLP's outputs are normed too before the residual
    ("sandwich" norms: input, post-attention, pre-feedforward, post-feedforward);
  - the embedding is multiplied by sqrt(hidden) (in the model dtype, as transformers rounds it);
  - the softmax scale is query_pre_attn_scalar ** -0.5; Gemma 2 soft-caps the attention scores
    and the final logits (cap * tanh(x / cap)); GeGLU (tanh-approximated GELU) in the MLP;
  - sliding-window and global layers alternate (Gemma 2: every other; Gemma 3: 5 local, 1 global),
    Gemma 3's layer types rotate with bases of their own and norm q and k per head.
"""

from __future__ import annotations

import torch

from node.models.attention import AttentionBatch
from node.models.config import ModelConfig
from node.models.llama import DecoderLayer, LlamaForCausalLM, LoRAHook, RMSNorm
from node.models.rotary import RotaryEmbedding


class GemmaRMSNorm(RMSNorm):
    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x32 = x.float()
        x32 = x32 * torch.rsqrt(x32.pow(2).mean(-1, keepdim=True) + self.eps)
        return (x32 * (1.0 + self.weight.float())).to(x.dtype)


class GemmaDecoderLayer(DecoderLayer):
    norm_class = GemmaRMSNorm

    def __init__(self, cfg: ModelConfig, index: int, dtype: torch.dtype):
        super().__init__(cfg, index, dtype)
        self.pre_feedforward_norm = GemmaRMSNorm(cfg.hidden_size, cfg.rms_norm_eps, dtype)
        self.post_feedforward_norm = GemmaRMSNorm(cfg.hidden_size, cfg.rms_norm_eps, dtype)

    def forward(self, x: torch.Tensor, positions: torch.Tensor, batch: AttentionBatch,
                kv: tuple[torch.Tensor, torch.Tensor], rotary: RotaryEmbedding, lora: LoRAHook | None,
                ) -> torch.Tensor:
        attn = self.attention(self.input_norm(x), positions, batch, kv, rotary, lora)
        x = x + self.post_attention_norm(attn)
        out: torch.Tensor = x + self.post_feedforward_norm(self.mlp(self.pre_feedforward_norm(x), lora))
        return out


class GemmaForCausalLM(LlamaForCausalLM):
    layer_class = GemmaDecoderLayer

    def __init__(self, cfg: ModelConfig, dtype: torch.dtype, max_positions: int):
        super().__init__(cfg, dtype, max_positions)
        self.embed_scale = float(torch.tensor(cfg.hidden_size ** 0.5, dtype=dtype))  # rounded as transformers does

    def embed_tokens(self, input_ids: torch.Tensor) -> torch.Tensor:
        return super().embed_tokens(input_ids) * self.embed_scale

    def logits(self, hidden: torch.Tensor) -> torch.Tensor:
        logits = super().logits(hidden)
        cap = self.cfg.final_softcap
        return logits if cap is None else torch.tanh(logits / cap) * cap
