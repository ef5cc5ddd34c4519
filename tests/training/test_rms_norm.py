"""The trainer's frozen RMSNorm computes transformers' output and input gradient, and is used only where it may be."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from transformers import AutoModelForCausalLM
from transformers.models.llama.modeling_llama import LlamaRMSNorm

from node.devkit import make_tiny_model
from node.training.rms_norm import route_rms_norms

FP32 = {"rtol": 1e-5, "atol": 1e-6}


def _output_and_grad(norm: torch.nn.Module, x: torch.Tensor, grad: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    x = x.clone().requires_grad_()
    y = norm(x)
    y.backward(grad)
    return y.detach(), x.grad


@pytest.mark.parametrize("scale", [1e-3, 1.0, 50.0])
def test_a_routed_norm_gives_transformers_output_and_gradient(scale: float) -> None:
    torch.manual_seed(0)
    norm = LlamaRMSNorm(96, eps=1e-5)
    norm.weight.data.normal_()
    norm.weight.requires_grad_(False)
    x, grad = torch.randn(3, 40, 96) * scale, torch.randn(3, 40, 96)  # [batch, tokens, hidden]
    expected = _output_and_grad(norm, x, grad)
    assert route_rms_norms(norm) == 1
    for got, want in zip(_output_and_grad(norm, x, grad), expected, strict=True):
        torch.testing.assert_close(got, want, **FP32)


@pytest.mark.parametrize(("arch", "num_norms"), [("llama", 2 * 2 + 1), ("qwen3", 4 * 2 + 1), ("gemma2", 0)])
def test_only_frozen_norms_with_llama_s_formula_are_routed(arch: str, num_norms: int, tmp_path: Path) -> None:
    """Qwen3 adds a norm on queries and keys per layer; Gemma's norms scale by `1 + w`: not routed."""
    model = AutoModelForCausalLM.from_pretrained(make_tiny_model(tmp_path / arch, arch=arch), dtype=torch.float32)
    assert route_rms_norms(model) == 0  # trainable (not a LoRA's frozen base): kept as they are
    model.requires_grad_(False)
    input_ids = torch.randint(3, 500, (1, 24))
    with torch.no_grad():
        expected = model(input_ids=input_ids).logits
        assert route_rms_norms(model) == num_norms
        torch.testing.assert_close(model(input_ids=input_ids).logits, expected, **FP32)


def test_lora_gradients_through_routed_norms_are_transformers(tmp_path: Path) -> None:
    """Every LoRA gradient below the last norm flows back through routed norms (qwen3: six per layer)."""
    from peft import LoraConfig, get_peft_model

    torch.manual_seed(0)
    base = AutoModelForCausalLM.from_pretrained(make_tiny_model(tmp_path / "qwen3", arch="qwen3"), dtype=torch.float32)
    model = get_peft_model(base, LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj", "down_proj"],
                                            init_lora_weights=False))
    input_ids = torch.randint(3, 500, (2, 32))

    def loss_and_grads() -> list[torch.Tensor]:
        model.zero_grad(set_to_none=True)
        loss = model(input_ids=input_ids, labels=input_ids).loss
        loss.backward()
        return [loss.detach()] + [p.grad for p in model.parameters() if p.requires_grad]

    expected = loss_and_grads()
    assert route_rms_norms(model) == 4 * 2 + 1
    for got, want in zip(loss_and_grads(), expected, strict=True):
        torch.testing.assert_close(got, want, **FP32)
