"""Tiny PEFT LoRA adapters trained for a few steps on a tiny base model.

For the tests, the demo and the benchmarks: a handful of short texts in one padded batch. Real
datasets are trained by `node/training/` (`loranode adapter train`), which streams and packs them.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import torch
from peft import LoraConfig, get_peft_model
from transformers import AutoModelForCausalLM, AutoTokenizer

ALL_TARGETS = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")


@dataclass(frozen=True)
class TrainedAdapter:
    path: Path
    losses: tuple[float, ...]  # the training loss at each step, first to last


def train_tiny_adapter(
    base_folder: str | Path,
    out_folder: str | Path,
    texts: Sequence[str],
    *,
    rank: int = 8,
    alpha: int = 16,
    target_modules: Sequence[str] = ALL_TARGETS,
    steps: int = 5,
    lr: float = 3e-2,
    use_rslora: bool = False,
    seed: int = 0,
) -> TrainedAdapter:
    """Fine-tune a LoRA on `texts` for `steps` AdamW steps and save it as a PEFT folder.

    lora_B starts random (`init_lora_weights=False`) as well as being trained, so every adapter
    changes the logits from the first token on, and adapters with different seeds differ.
    """
    torch.manual_seed(seed)
    tokenizer = AutoTokenizer.from_pretrained(base_folder)
    base = AutoModelForCausalLM.from_pretrained(base_folder, dtype=torch.float32)
    config = LoraConfig(
        r=rank, lora_alpha=alpha, target_modules=list(target_modules), lora_dropout=0.0,
        init_lora_weights=False, use_rslora=use_rslora, task_type="CAUSAL_LM",
    )
    model = get_peft_model(base, config)
    _shrink_b(model, scale=0.5 / max(rank, 1) ** 0.5)
    batch = tokenizer(list(texts), return_tensors="pt", padding=True)
    labels = batch["input_ids"].masked_fill(batch["attention_mask"] == 0, -100)
    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=lr)
    model.train()
    losses = []
    for _ in range(steps):
        loss = model(**batch, labels=labels).loss
        loss.backward()
        optimizer.step()
        optimizer.zero_grad()
        losses.append(float(loss.detach()))
    out = Path(out_folder)
    model.save_pretrained(str(out))
    return TrainedAdapter(path=out, losses=tuple(losses))


def _shrink_b(model: torch.nn.Module, scale: float) -> None:
    """Random lora_B at a size that moves the logits without swamping the base model."""
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "lora_B" in name:
                p.normal_(0.0, scale)
