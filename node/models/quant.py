"""Weight-only int8 quantization of the decoder's projections: symmetric, one scale per output channel.

    weight[o, i] ~= q[o, i] * scale[o],   q = round(weight / scale) in [-127, 127],  scale = max|weight[o]| / 127
    y = linear(x, weight) ~= (x @ q.T) * scale

The matmul reads the int8 weights and dequantizes inside the kernel (`torch._weight_int8pack_mm`)
on the CPU; on CUDA (where torch's kernel for it is far slower, see `has_int8_kernel`) it converts
the weight to the activation dtype first: same result, but more memory traffic than bf16, so int8 is
a memory saving there, not yet a speed-up. Half the bytes of bf16 per decode step:
decoding is bound by memory bandwidth, so this is where int8 pays. The embedding, the norms and the
LM head stay in the model dtype; LoRA deltas are added to the output as before.
"""

from __future__ import annotations

import logging
from functools import cache

import torch
import torch.nn.functional as F
from torch import nn

log = logging.getLogger(__name__)
QUANTIZED = ("qkv_weight", "o_weight", "gate_up_weight", "down_weight")


class Int8Weight(nn.Module):
    """An int8 weight [out, in] and its per-output-channel scale [out] (in the activation dtype)."""

    def __init__(self, weight: torch.Tensor):
        super().__init__()
        w = weight.detach().float()
        scale = w.abs().amax(dim=1).clamp(min=1e-12) / 127.0  # [out]
        self.register_buffer("qweight", torch.round(w / scale[:, None]).clamp(-127, 127).to(torch.int8))
        self.register_buffer("scale", scale.to(weight.dtype))

    def dequantize(self) -> torch.Tensor:
        return self.qweight.to(self.scale.dtype) * self.scale[:, None]

    def forward(self, x: torch.Tensor, bias: torch.Tensor | None = None) -> torch.Tensor:
        """x: [..., in] -> [..., out] in x's dtype."""
        flat = x.reshape(-1, x.shape[-1])  # [T, in]
        if has_int8_kernel(x.device.type, x.dtype):
            y = torch._weight_int8pack_mm(flat.contiguous(), self.qweight, self.scale.to(x.dtype))
        else:
            y = F.linear(flat, self.qweight.to(x.dtype)) * self.scale.to(x.dtype)
        if bias is not None:
            y = y + bias
        return y.reshape(*x.shape[:-1], -1)


def linear(x: torch.Tensor, weight: torch.Tensor | Int8Weight, bias: torch.Tensor | None = None) -> torch.Tensor:
    """F.linear for plain weights and int8 ones alike."""
    if isinstance(weight, Int8Weight):
        return weight(x, bias)
    return F.linear(x, weight, bias)


@cache
def has_int8_kernel(device_type: str, dtype: torch.dtype) -> bool:
    """Whether to use torch's fused int8-weight matmul for this device and activation dtype (probed once).

    Not on CUDA: torch 2.11's CUDA kernel for it took 1,006 ms per decode step of a Llama-3-8B-shaped
    model at batch 64 on an H200, against 9.6 ms for bf16 (bench/gpu.py), so the weight is dequantized
    per call there until we have a Triton int8 GEMM.
    """
    if device_type == "cuda":
        return False
    x = torch.zeros(1, 32, dtype=dtype, device=device_type)
    w = torch.zeros(8, 32, dtype=torch.int8, device=device_type)
    try:
        torch._weight_int8pack_mm(x, w, torch.ones(8, dtype=dtype, device=device_type))
    except (NotImplementedError, RuntimeError) as e:  # no kernel for this backend / dtype
        log.info("no fused int8 matmul on %s for %s (%s): dequantizing per call", device_type, dtype,
                 str(e).splitlines()[0])
        return False
    return True


def quantize_int8(model: nn.Module) -> int:
    """Replace every decoder layer's projection weights by Int8Weight in place; returns bytes saved."""
    saved = 0
    for layer in model.layers:  # type: ignore[union-attr]
        for name in QUANTIZED:
            weight = getattr(layer, name)
            delattr(layer, name)
            setattr(layer, name, Int8Weight(weight))
            saved += weight.numel() * (weight.element_size() - 1)
    log.info("int8 weights: %d MB saved", saved >> 20)
    return saved
