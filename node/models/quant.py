"""Weight-only quantization of the decoder's projections at load, on torchao; LoRA stays unquantized.

Schemes (`quantize_weights(model, scheme)`, after the checkpoint is loaded):
- int8: torchao's `Int8WeightOnlyConfig` (symmetric, one scale per output channel, an `Int8Tensor`).
  On the CPU the matmul reads the int8 weights in torch's fused kernel (`_weight_int8pack_mm`, on the
  tensor's own qdata and scale, bf16 activations: torchao 0.18's eager weight-only path dequantizes the
  whole weight per call, 3x slower than fp32); elsewhere torchao's own dispatch (torch.compile fuses it).
- int4: weight-only, asymmetric, groups of 128 input columns (narrower layers: 64 or 32, the
  largest that divides them). On CUDA, torchao's `Int4WeightOnlyConfig` packed for the tinygemm kernel
  (bf16 models). On the CPU, torchao 0.18 has no int4 layout (`Int4WeightOnlyConfig` packs for CUDA's
  tinygemm or mslk kernels and XPU/NPU only; the old `Int4CPULayout` is gone), so `Int4CPUWeight` takes
  torchao's groupwise qparams (`groupwise_affine_quantize_tensor`, the same tinygemm scheme) and packs
  them for torch's own CPU kernel (`_weight_int4pack_mm_for_cpu`, bf16 activations).
- fp8: torchao's `Float8DynamicActivationFloat8WeightConfig` (per-row scales, fp8 matmuls), only on
  CUDA devices of compute capability 8.9 or newer (Ada, Hopper); refused with the reason elsewhere.
The embedding, the norms and the LM head keep the model dtype. LoRA deltas are computed from the
unquantized activations with unquantized adapter weights and added to the quantized base output, as
before: only the base matmul is quantized.
"""

from __future__ import annotations

import logging
from functools import cache

import torch
import torch.nn.functional as F
from torch import nn

from node.errors import ConfigError

log = logging.getLogger(__name__)
SCHEMES = ("none", "int8", "int4", "fp8")
QUANTIZED = ("qkv_weight", "o_weight", "gate_up_weight", "down_weight")  # what a layer has, by default
INT4_GROUP_SIZES = (128, 64, 32)  # the first that divides a layer's in_features
FP8_MIN_CAPABILITY = (8, 9)
_PLAIN = (torch.Tensor, nn.Parameter)
# torch's CPU int8 and int4 kernels are fast with bf16 activations (a [1, 512] x [512, 1536] matmul: 0.19
# and 0.23 ms, fp32's F.linear 0.46 ms) and slow with fp32 ones (2.1 and 28 ms): the CPU paths round
# the activations to bf16 and return the model dtype
CPU_ACT = torch.bfloat16


class Int4CPUWeight(nn.Module):
    """An int4 weight [out, in] packed for torch's CPU kernel, with bf16 scales and zeros per group."""

    def __init__(self, weight: torch.Tensor, group_size: int):
        super().__init__()
        from torchao.quantization.utils import groupwise_affine_quantize_tensor  # type: ignore[import-untyped]

        w = weight.detach().to(torch.bfloat16)
        q, scales_and_zeros = groupwise_affine_quantize_tensor(w, n_bit=4, groupsize=group_size, dtype=torch.bfloat16)
        self.group_size = group_size
        self.packed: torch.Tensor
        self.scales_and_zeros: torch.Tensor
        self.register_buffer("packed", torch._convert_weight_to_int4pack_for_cpu(q.to(torch.int32), 1))  # [out, in/2]
        self.register_buffer("scales_and_zeros", scales_and_zeros)  # [in / group, out, 2] bf16

    def forward(self, x: torch.Tensor, bias: torch.Tensor | None = None) -> torch.Tensor:
        """x: [..., in] -> [..., out] in x's dtype (computed with bf16 activations)."""
        flat = x.reshape(-1, x.shape[-1]).to(CPU_ACT).contiguous()  # [T, in]
        y = torch._weight_int4pack_mm_for_cpu(flat, self.packed, self.group_size, self.scales_and_zeros).to(x.dtype)
        if bias is not None:
            y = y + bias
        return y.reshape(*x.shape[:-1], -1)

    def dequantize(self) -> torch.Tensor:
        """The weight [out, in] the kernel multiplies by (bf16)."""
        in_features = self.packed.shape[1] * 2
        return self.forward(torch.eye(in_features, dtype=torch.bfloat16)).T


def linear(x: torch.Tensor, weight: torch.Tensor | nn.Module, bias: torch.Tensor | None = None) -> torch.Tensor:
    """F.linear for plain weights and quantized ones alike."""
    if isinstance(weight, nn.Module):
        return weight(x, bias)  # type: ignore[no-any-return]
    if type(weight) not in _PLAIN and x.device.type == "cpu" and _is_int8(weight) and has_int8_kernel("cpu", CPU_ACT):
        flat = x.reshape(-1, x.shape[-1]).to(CPU_ACT).contiguous()  # [T, in]
        qdata, scale = weight.qdata, weight.scale  # type: ignore[attr-defined]  # torchao's Int8Tensor
        y = torch._weight_int8pack_mm(flat, qdata, scale.view(-1).to(CPU_ACT)).to(x.dtype)
        if bias is not None:
            y = y + bias
        return y.reshape(*x.shape[:-1], -1)
    return F.linear(x, weight, bias)


def quantize_weights(model: nn.Module, scheme: str, device: torch.device | None = None) -> int:
    """Quantize every decoder layer's projection weights in place (`layer.quantized_weights` names
    them, else QUANTIZED); returns the bytes saved. ConfigError if the scheme cannot run here."""
    if scheme == "none":
        return 0
    device = device or next(model.parameters()).device
    check_scheme(scheme, device)
    before = weight_nbytes(model)
    for layer in model.layers:  # type: ignore[union-attr]
        for name in getattr(layer, "quantized_weights", QUANTIZED):
            weight = getattr(layer, name, None)
            if not isinstance(weight, torch.Tensor) or weight.dim() != 2:
                continue  # a family without this projection (or with it fused elsewhere)
            quantized = quantize_tensor(weight.detach(), scheme)
            delattr(layer, name)
            if isinstance(quantized, nn.Module):
                setattr(layer, name, quantized)
            else:
                setattr(layer, name, nn.Parameter(quantized, requires_grad=False))
    saved = before - weight_nbytes(model)
    log.info("%s weights: %d MB saved", scheme, saved >> 20)
    return saved


def quantize_tensor(weight: torch.Tensor, scheme: str) -> torch.Tensor | nn.Module:
    """One weight [out, in] under a scheme (see the module doc)."""
    from torchao.quantization import (  # type: ignore[import-untyped]
        Float8DynamicActivationFloat8WeightConfig,
        Int4WeightOnlyConfig,
        Int8WeightOnlyConfig,
        PerRow,
    )

    if scheme == "int8":
        return _torchao(weight, Int8WeightOnlyConfig())
    if scheme == "int4":
        group = int4_group_size(weight.shape[1])
        if weight.device.type == "cpu":
            return Int4CPUWeight(weight, group)
        return _torchao(weight, Int4WeightOnlyConfig(group_size=group, int4_packing_format="tile_packed_to_4d"))
    if scheme == "fp8":
        return _torchao(weight, Float8DynamicActivationFloat8WeightConfig(granularity=PerRow()))
    raise ConfigError(f"weight_quantization must be one of {SCHEMES}", weight_quantization=scheme)


def check_scheme(scheme: str, device: torch.device, dtype: torch.dtype | None = None) -> None:
    """ConfigError, with the reason, if `scheme` cannot run on this device (and model dtype)."""
    if scheme not in SCHEMES:
        raise ConfigError(f"weight_quantization must be one of {SCHEMES}", weight_quantization=scheme)
    needs_bf16 = device.type == "cuda" and scheme in ("int4", "fp8")
    if needs_bf16 and dtype is not None and dtype != torch.bfloat16:
        raise ConfigError(f"{scheme} weights on CUDA need a bfloat16 model (dtype=bfloat16), not {dtype}",
                          weight_quantization=scheme, dtype=str(dtype))
    if scheme != "fp8":
        return
    capability = torch.cuda.get_device_capability(device) if device.type == "cuda" else None
    if capability is None or capability < FP8_MIN_CAPABILITY:
        where = f"compute capability {capability[0]}.{capability[1]}" if capability else device.type
        raise ConfigError(f"fp8 weights need a CUDA GPU of compute capability 8.9 or newer (Ada, Hopper); "
                          f"this device is {where}: use int8 or int4", weight_quantization=scheme,
                          device=str(device))


def int4_group_size(in_features: int) -> int:
    for group in INT4_GROUP_SIZES:
        if in_features % group == 0:
            return group
    raise ConfigError(f"int4 weights need in_features divisible by 32, not {in_features}",
                      weight_quantization="int4", in_features=in_features)


def weight_nbytes(model: nn.Module) -> int:
    """Bytes of the model's parameters and buffers as stored (a quantized tensor: its parts)."""
    tensors = {id(t): t for t in (*model.parameters(), *model.buffers())}
    return sum(tensor_nbytes(t) for t in tensors.values())


def tensor_nbytes(t: torch.Tensor) -> int:
    if hasattr(t, "__tensor_flatten__"):  # a torchao tensor subclass: its inner tensors
        names, _ = t.__tensor_flatten__()
        return sum(tensor_nbytes(getattr(t, name)) for name in names)
    return t.numel() * t.element_size()


@cache
def has_int8_kernel(device_type: str, dtype: torch.dtype) -> bool:
    """Whether torch's fused int8-weight matmul runs for this device and activation dtype (probed once).

    Not on CUDA: torch 2.11's CUDA kernel for it took 1,006 ms per decode step of a Llama-3-8B-shaped
    model at batch 64 on an H200, against 9.6 ms for bf16 (bench/gpu.py): torchao's dispatch is used there.
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


def _torchao(weight: torch.Tensor, config: object) -> torch.Tensor:
    """`weight` quantized by torchao's `quantize_` under `config` (a tensor subclass)."""
    from torchao.quantization import quantize_

    holder = nn.Linear(weight.shape[1], weight.shape[0], bias=False, device="meta")
    holder.weight = nn.Parameter(weight, requires_grad=False)
    quantize_(holder, config)
    return holder.weight


def _is_int8(weight: torch.Tensor) -> bool:
    """A torchao int8 weight-only tensor with one scale per output channel."""
    return (type(weight).__name__ == "Int8Tensor" and weight.act_quant_kwargs is None  # type: ignore[attr-defined]
            and weight.scale.numel() == weight.shape[0])  # type: ignore[attr-defined]
