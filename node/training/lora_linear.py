"""PEFT's LoRA linear layer, trained as one autograd node: the same math in fewer and smaller passes.

PEFT computes `y = x W^T + (x A^T) B^T * s` as five autograd ops: the scaling multiplies and the sum adds
whole `[tokens, out]` tensors, in the forward and again in the backward (on bench/train.py's model,
elementwise multiplies and adds took a quarter of a step, most of them these). Here the scaling goes
on the rank-wide `x A^T` (`[tokens, rank]`) and the LoRA product is accumulated into the base
output by the matrix multiply itself (`addmm`, beta 1); the backward does the same for the input's
gradient. Gradients, for `x`, `A` and `B` (`W` and the bias are frozen):

    u = s * x A^T                        # [tokens, rank], kept for the backward
    y = x W^T + b + u B^T                # [tokens, out]
    dB = dy^T u,  v = s * dy B,  dA = v^T x,  dx = dy W + v A

which is PEFT's chain rule with the scalar moved (exact when `s` is a power of two, as alpha = 2 * rank
gives). A layer is routed through it only where that is all it computes: one active adapter, no
dropout, no DoRA or other variant, a frozen `nn.Linear` base; anything else (and a layer disabled
or merged later) takes PEFT's own forward. The parameters stay PEFT's, so `save_pretrained` is
unchanged.
"""

from __future__ import annotations

import types
from collections.abc import Callable
from typing import Any

import torch
from peft.tuners.lora import Linear as PeftLoRALinear
from torch import nn


class _LoRALinearFunction(torch.autograd.Function):
    @staticmethod
    def forward(ctx: Any, x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None, lora_a: torch.Tensor,
                lora_b: torch.Tensor, scaling: float) -> torch.Tensor:
        flat = x.reshape(-1, x.shape[-1])  # [tokens, in]
        u = torch.mm(flat, lora_a.t()).mul_(scaling)  # [tokens, rank]
        y = torch.mm(flat, weight.t()) if bias is None else torch.addmm(bias, flat, weight.t())  # [tokens, out]
        y.addmm_(u, lora_b.t())
        ctx.save_for_backward(flat, weight, lora_a, lora_b, u)
        ctx.scaling = scaling
        return y.view(*x.shape[:-1], weight.shape[0])  # [..., out]

    @staticmethod
    def backward(ctx: Any, grad: torch.Tensor) -> tuple[torch.Tensor | None, ...]:
        flat, weight, lora_a, lora_b, u = ctx.saved_tensors
        grad_flat = grad.reshape(-1, grad.shape[-1])  # [tokens, out]
        v = torch.mm(grad_flat, lora_b).mul_(ctx.scaling)  # [tokens, rank]
        grad_x = None
        if ctx.needs_input_grad[0]:
            grad_x = torch.mm(grad_flat, weight).addmm_(v, lora_a)  # [tokens, in]
            grad_x = grad_x.view(*grad.shape[:-1], weight.shape[1])
        grad_a = torch.mm(v.t(), flat) if ctx.needs_input_grad[3] else None  # [rank, in]
        grad_b = torch.mm(u.t(), grad_flat).t() if ctx.needs_input_grad[4] else None  # [out, rank]
        return grad_x, None, None, grad_a, grad_b, None


# torch leaves `Function.apply` unannotated: it takes `forward`'s arguments after `ctx`
_apply: Callable[[torch.Tensor, torch.Tensor, torch.Tensor | None, torch.Tensor, torch.Tensor, float], torch.Tensor] = \
    _LoRALinearFunction.apply


def lora_linear(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None, lora_a: torch.Tensor,
                lora_b: torch.Tensor, scaling: float) -> torch.Tensor:
    """`x W^T + b + scaling * (x A^T) B^T` over the last dimension of `x`; gradients for x, A and B only."""
    return _apply(x, weight, bias, lora_a, lora_b, scaling)


def route_lora_linears(model: nn.Module) -> int:
    """Route every plain LoRA linear layer of `model` (a PEFT model) through `lora_linear`; how many were."""
    routed = 0
    for module in model.modules():
        if isinstance(module, PeftLoRALinear) and _adapter(module) is not None:
            _route(module)
            routed += 1
    return routed


def _route(module: nn.Module) -> None:
    """`module.forward` becomes `_forward` (an nn.Module's forward is an attribute an instance may set)."""
    module.forward = types.MethodType(_forward, module)


def _adapter(layer: PeftLoRALinear) -> str | None:
    """The layer's one active adapter, when the layer computes nothing but `lora_linear` with it."""
    if len(layer.active_adapters) != 1 or layer.fan_in_fan_out:
        return None
    name = layer.active_adapters[0]
    base = layer.base_layer
    is_plain = (
        name in layer.lora_A and type(layer.base_layer) is nn.Linear and not base.weight.requires_grad
        and (base.bias is None or not base.bias.requires_grad) and layer.lora_B[name].bias is None
        and isinstance(layer.lora_dropout[name], nn.Identity) and name not in getattr(layer, "lora_variant", {})
        and not layer.use_dora.get(name, False)
    )
    return name if is_plain else None


def _forward(self: PeftLoRALinear, x: torch.Tensor, *args: Any, **kwargs: Any) -> torch.Tensor:
    name = None if args or kwargs or self.disable_adapters or self.merged else _adapter(self)
    if name is None or not x.dtype == self.base_layer.weight.dtype == self.lora_A[name].weight.dtype:
        return PeftLoRALinear.forward(self, x, *args, **kwargs)
    base, lora_a, lora_b = (_linear(m) for m in (self.base_layer, self.lora_A[name], self.lora_B[name]))
    return lora_linear(x, base.weight, base.bias, lora_a.weight, lora_b.weight, self.scaling[name])


def _linear(module: nn.Module) -> nn.Linear:
    """A plain layer's base and adapter matrices are `nn.Linear`s (`_adapter` checked them)."""
    assert isinstance(module, nn.Linear), type(module)
    return module
