"""PEFT LoRA folders to host-memory tensors, validated against the base model, scaling folded in.

Only `adapter_config.json` and `adapter_model.safetensors` are ever read (pickled `.bin` files are
refused). Every problem found is reported at once in one `AdapterFormatError`.
"""

from __future__ import annotations

import json
import math
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from safetensors import safe_open

from node.errors import AdapterFormatError

CONFIG_FILE = "adapter_config.json"
WEIGHTS_FILE = "adapter_model.safetensors"
MODULES = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")
_KEY = re.compile(
    r"(?:base_model\.model\.)?model\.layers\.(\d+)\.(?:self_attn|mlp)\.(\w+)\.lora_([AB])\.weight")


@dataclass(frozen=True)
class LoRATargetSpec:
    """What a base model accepts: its layer count and each projection's (in_features, out_features)."""

    num_layers: int
    module_shapes: tuple[tuple[str, tuple[int, int]], ...]

    @classmethod
    def of(cls, num_layers: int, shapes: dict[str, tuple[int, int]]) -> LoRATargetSpec:
        return cls(num_layers=num_layers, module_shapes=tuple(sorted(shapes.items())))

    def shape(self, module: str) -> tuple[int, int]:
        return dict(self.module_shapes)[module]


@dataclass(frozen=True)
class LoRAWeights:
    """One adapter in host memory: (layer, module) -> (A [r, in], B [out, r] * scaling), float32."""

    rank: int  # the largest rank over its modules
    modules: dict[tuple[int, str], tuple[torch.Tensor, torch.Tensor]]

    @property
    def nbytes(self) -> int:
        return sum(t.numel() * t.element_size() for pair in self.modules.values() for t in pair)


def load_lora_adapter(folder: str | Path, target: LoRATargetSpec, max_rank: int) -> LoRAWeights:
    """Parse and validate a PEFT LoRA folder; raises AdapterFormatError naming every problem."""
    folder = Path(folder)
    config = _read_config(folder)
    weights_path = folder / WEIGHTS_FILE
    if not weights_path.is_file():
        pickles = sorted(p.name for p in folder.glob("*") if p.suffix in (".bin", ".pt", ".pth", ".pkl"))
        why = f"; pickled files are refused: {pickles}" if pickles else ""
        raise AdapterFormatError(f"{WEIGHTS_FILE} is missing{why}", folder=str(folder))
    problems = _config_problems(config)
    pairs: dict[tuple[int, str], dict[str, torch.Tensor]] = {}
    with safe_open(str(weights_path), framework="pt") as f:
        for key in f.keys():  # noqa: SIM118 - safe_open is not a mapping
            m = _KEY.fullmatch(key)
            if m is None or m.group(2) not in MODULES:
                problems.append(f"unsupported tensor {key}")
                continue
            pairs.setdefault((int(m.group(1)), m.group(2)), {})[m.group(3)] = f.get_tensor(key)
    modules: dict[tuple[int, str], tuple[torch.Tensor, torch.Tensor]] = {}
    for (layer, module), ab in sorted(pairs.items()):
        pair = _check_pair(layer, module, ab, target, max_rank, problems)
        if pair is not None:
            a, b = pair
            scale = _scaling(config, layer, module, a.shape[0])
            modules[(layer, module)] = (a.float().contiguous(), (b.float() * scale).contiguous())
    if not modules and not problems:
        problems.append("the adapter has no LoRA weights")
    if problems:
        raise AdapterFormatError(f"adapter {folder.name} is not servable: " + "; ".join(problems),
                                 folder=str(folder), problems=problems)
    return LoRAWeights(rank=max(a.shape[0] for a, _ in modules.values()), modules=modules)


def _read_config(folder: Path) -> dict[str, Any]:
    path = folder / CONFIG_FILE
    if not path.is_file():
        raise AdapterFormatError(f"{CONFIG_FILE} is missing", folder=str(folder))
    try:
        config = json.loads(path.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise AdapterFormatError(f"{CONFIG_FILE} is not valid JSON: {e}", folder=str(folder)) from e
    if not isinstance(config, dict):
        raise AdapterFormatError(f"{CONFIG_FILE} is not a JSON object", folder=str(folder))
    return config


def _config_problems(config: dict[str, Any]) -> list[str]:
    problems = []
    if config.get("peft_type", "LORA") != "LORA":
        problems.append(f"peft_type is {config.get('peft_type')!r}, only LORA is served")
    if config.get("use_dora"):
        problems.append("DoRA adapters are not supported")
    if config.get("modules_to_save"):
        problems.append(f"modules_to_save {config['modules_to_save']} is not supported")
    if config.get("bias", "none") != "none" or config.get("lora_bias"):
        problems.append("LoRA bias terms are not supported")
    if config.get("fan_in_fan_out"):
        problems.append("fan_in_fan_out adapters are not supported")
    if not isinstance(config.get("r"), int) or not isinstance(config.get("lora_alpha"), (int, float)):
        problems.append("r and lora_alpha must be numbers")
    return problems


def _check_pair(layer: int, module: str, ab: dict[str, torch.Tensor], target: LoRATargetSpec,
                max_rank: int, problems: list[str]) -> tuple[torch.Tensor, torch.Tensor] | None:
    name = f"layers.{layer}.{module}"
    if layer >= target.num_layers:
        problems.append(f"{name}: the base model has {target.num_layers} layers")
        return None
    if "A" not in ab or "B" not in ab:
        problems.append(f"{name}: lora_{'A' if 'A' not in ab else 'B'} is missing")
        return None
    a, b = ab["A"], ab["B"]
    d_in, d_out = target.shape(module)
    rank = a.shape[0]
    if a.ndim != 2 or b.ndim != 2 or a.shape[1] != d_in or b.shape != (d_out, rank):
        problems.append(f"{name}: lora_A {tuple(a.shape)} / lora_B {tuple(b.shape)} do not fit "
                        f"in={d_in} out={d_out}")
        return None
    if rank > max_rank:
        problems.append(f"{name}: rank {rank} exceeds max_lora_rank {max_rank}")
        return None
    if not (a.is_floating_point() and b.is_floating_point()):
        problems.append(f"{name}: weights must be floating point")
        return None
    return a, b


def _scaling(config: dict[str, Any], layer: int, module: str, rank: int) -> float:
    """alpha / r (alpha / sqrt(r) with rsLoRA), honouring PEFT's alpha_pattern."""
    alpha = float(config["lora_alpha"])
    parent = "self_attn" if module in MODULES[:4] else "mlp"
    full_name = f"model.layers.{layer}.{parent}.{module}"
    for key, value in (config.get("alpha_pattern") or {}).items():
        if re.match(rf"(.*\.)?({key})$", full_name):
            alpha = float(value)
            break
    return alpha / (math.sqrt(rank) if config.get("use_rslora") else rank)
