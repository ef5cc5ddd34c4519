"""A frozen RMSNorm trained as one autograd node: Llama's formula in half the passes over the activations.

transformers' Llama RMSNorm (Mistral's, Qwen2's, Qwen3's and Phi3's are the same code) runs
`w * (x * rsqrt(mean(x^2) + eps))` as six autograd ops, each a pass over `[tokens, hidden]` forward and
again backward; with the weight frozen (LoRA training) its gradient for `x` is

    r = rsqrt(mean(x^2) + eps)                                  # [tokens, 1]
    dx = r * (w * dy) - x * r^3 * mean(x * w * dy)              # [tokens, hidden]

computed here in four passes, keeping `x` and `r` (not the normalized copy autograd keeps). A norm is
routed only where its forward is, bytecode for bytecode, Llama's and its weight is frozen; the rest
(Gemma's `1 + w`, a trained norm) keep their own forward, as does any call on another dtype than float32.
"""

from __future__ import annotations

import types
from collections.abc import Callable
from typing import Any, Protocol

import torch
from torch import nn
from transformers.models.llama.modeling_llama import LlamaRMSNorm


class _FrozenRMSNormFunction(torch.autograd.Function):
    @staticmethod
    def forward(ctx: Any, x: torch.Tensor, weight: torch.Tensor, eps: float) -> torch.Tensor:
        rstd = torch.linalg.vecdot(x, x, dim=-1).unsqueeze(-1).div_(x.shape[-1]).add_(eps).rsqrt_()  # [..., 1]
        ctx.save_for_backward(x, weight, rstd)
        return torch.mul(x, rstd).mul_(weight)

    @staticmethod
    def backward(ctx: Any, grad: torch.Tensor) -> tuple[torch.Tensor | None, None, None]:
        x, weight, rstd = ctx.saved_tensors
        weighted = grad * weight  # [..., hidden]
        coef = torch.linalg.vecdot(weighted, x, dim=-1).unsqueeze(-1).mul_(rstd.pow(3) / x.shape[-1])  # [..., 1]
        return weighted.mul_(rstd).addcmul_(x, coef, value=-1.0), None, None


# torch leaves `Function.apply` unannotated: it takes `forward`'s arguments after `ctx`
_apply: Callable[[torch.Tensor, torch.Tensor, float], torch.Tensor] = _FrozenRMSNormFunction.apply


class _RMSNorm(Protocol):
    """What the Llama formula's RMSNorm holds (Llama's, and every family's copy of it)."""

    weight: nn.Parameter
    variance_epsilon: float

    def forward(self, x: torch.Tensor) -> torch.Tensor: ...


def frozen_rms_norm(x: torch.Tensor, weight: torch.Tensor, eps: float) -> torch.Tensor:
    """`weight * x / sqrt(mean(x^2) + eps)` over the last dimension; a gradient for `x` only."""
    return _apply(x, weight, eps)


def route_rms_norms(model: nn.Module) -> int:
    """Route every frozen Llama-formula RMSNorm of `model` through `frozen_rms_norm`; how many were."""
    routed = 0
    for module in model.modules():
        if _is_llama_rms_norm(module) and not module.weight.requires_grad:
            module.forward = types.MethodType(_forward, module)
            routed += 1
    return routed


def _is_llama_rms_norm(module: nn.Module) -> bool:
    code = getattr(type(module).forward, "__code__", None)
    return code is not None and _compiled(code) == _compiled(LlamaRMSNorm.forward.__code__)


def _compiled(code: types.CodeType) -> tuple[object, ...]:
    return code.co_code, code.co_names, code.co_consts


def _forward(self: _RMSNorm, x: torch.Tensor) -> torch.Tensor:
    if not x.dtype == self.weight.dtype == torch.float32 or self.weight.requires_grad:
        return type(self).forward(self, x)
    return frozen_rms_norm(x, self.weight, self.variance_epsilon)
