"""The trainer's LoRA layer computes PEFT's loss and gradients, and a run with it follows a plain PEFT loop."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from peft import LoraConfig, PeftModel, get_peft_model
from safetensors.torch import load_file
from transformers import AutoModelForCausalLM, AutoTokenizer

from node.devkit import make_tiny_model
from node.lora.content_hash import dataset_content_hash
from node.training.lora_linear import route_lora_linears
from node.training.lora_trainer import ALL_TARGETS, LoRATrainer, TrainingConfig
from node.training.packing import PackedSequences
from node.training.token_file import tokenize_datasets
from tests.training.conftest import write_dataset

FP32 = {"rtol": 1e-5, "atol": 1e-6}


def _peft_model(folder: Path, **lora: object) -> PeftModel:
    torch.manual_seed(0)
    base = AutoModelForCausalLM.from_pretrained(folder, dtype=torch.float32)
    config = LoraConfig(**{"r": 4, "lora_alpha": 6, "target_modules": list(ALL_TARGETS), "lora_dropout": 0.0,
                           "init_lora_weights": False, **lora})  # type: ignore[arg-type]
    return get_peft_model(base, config)


def _loss_and_grads(model: PeftModel, input_ids: torch.Tensor) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    model.zero_grad(set_to_none=True)
    loss = model(input_ids=input_ids, labels=input_ids).loss
    loss.backward()
    return loss.detach(), {n: p.grad.clone() for n, p in model.named_parameters() if p.requires_grad}


@pytest.mark.parametrize("arch", ["llama", "qwen2"])  # qwen2: q, k and v have a (frozen) bias
def test_a_routed_model_has_the_loss_and_gradients_peft_computes(arch: str, tmp_path: Path) -> None:
    folder = make_tiny_model(tmp_path / arch, arch=arch)
    model = _peft_model(folder)  # scaling 6 / 4 = 1.5: not a power of two, so the moved scalar rounds
    input_ids = torch.randint(3, 500, (2, 48))
    expected_loss, expected = _loss_and_grads(model, input_ids)
    assert route_lora_linears(model) == 2 * len(ALL_TARGETS)  # every targeted layer of both layers
    loss, grads = _loss_and_grads(model, input_ids)
    torch.testing.assert_close(loss, expected_loss, **FP32)
    assert grads.keys() == expected.keys() and len(grads) == 4 * len(ALL_TARGETS)
    for name, grad in grads.items():
        torch.testing.assert_close(grad, expected[name], **FP32, msg=name)


def test_layers_it_cannot_compute_keep_peft_s_forward(tiny_model: Path) -> None:
    assert route_lora_linears(_peft_model(tiny_model, lora_dropout=0.1)) == 0
    assert route_lora_linears(_peft_model(tiny_model, use_dora=True)) == 0
    model = _peft_model(tiny_model)
    route_lora_linears(model)
    input_ids = torch.randint(3, 500, (1, 16))
    with torch.no_grad(), model.disable_adapter():
        without = model(input_ids=input_ids).logits
    base = AutoModelForCausalLM.from_pretrained(tiny_model, dtype=torch.float32)
    with torch.no_grad():
        torch.testing.assert_close(without, base(input_ids=input_ids).logits)


def test_training_follows_a_plain_peft_loop_on_the_same_batches(tiny_model: Path, tmp_path: Path) -> None:
    """The trainer (routed layers, fused AdamW) against PEFT's own forward with torch's default AdamW,
    fed the same micro-batches and weighting them the same way: the same losses and adapter."""
    data = write_dataset(tmp_path / "d.txt", 20_000)
    tokens = tokenize_datasets(AutoTokenizer.from_pretrained(tiny_model), [(data, dataset_content_hash(data))],
                               tmp_path / "tok")
    config = TrainingConfig(rank=4, alpha=8, lr=1e-2, seq_len=64, batch_size=2, grad_accum=2, max_steps=8,
                            checkpoint_every=0, seed=3)
    result = LoRATrainer(tiny_model, config, device="cpu").train(tokens, tmp_path / "ours")

    torch.manual_seed(config.seed)
    base = AutoModelForCausalLM.from_pretrained(tiny_model, dtype=torch.float32)
    model = get_peft_model(base, LoraConfig(r=4, lora_alpha=8, target_modules=list(ALL_TARGETS), lora_dropout=0.0))
    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=config.lr)
    packed = PackedSequences(tokens.tokens(), 64)
    order = packed.order(config.seed, epoch=0)
    assert len(order) >= 8 * 4  # one epoch holds the 8 steps
    losses = []
    for step in range(8):
        batches = [packed.batch(order[step * 4 + i:step * 4 + i + 2]) for i in (0, 2)]
        total = sum(b.num_targets for b in batches)
        loss = sum(_weighted_loss(model, b.input_ids, b.labels, b.num_targets / total) for b in batches)
        optimizer.step()
        optimizer.zero_grad()
        losses.append(float(loss))

    assert result.losses == pytest.approx(losses, rel=1e-4) and losses[-1] < losses[0]
    ours, plain = load_file(tmp_path / "ours" / "adapter_model.safetensors"), _adapter_weights(model)
    assert ours.keys() == plain.keys()
    for name, weight in ours.items():
        torch.testing.assert_close(weight, plain[name], rtol=1e-4, atol=1e-5, msg=name)


def _weighted_loss(model: PeftModel, input_ids: torch.Tensor, labels: torch.Tensor, weight: float) -> float:
    loss = model(input_ids=input_ids, labels=labels).loss * weight
    loss.backward()
    return float(loss.detach())


def _adapter_weights(model: PeftModel) -> dict[str, torch.Tensor]:
    from peft import get_peft_model_state_dict

    return {k: v.detach() for k, v in get_peft_model_state_dict(model).items()}
