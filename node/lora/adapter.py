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
    config_problems = _config_problems(config)
    problems = list(config_problems)
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
            modules[(layer, module)] = pair
    if not modules and not problems:
        problems.append("the adapter has no LoRA weights")
    if not config_problems:  # the rules below read the config's r, alpha and patterns
        problems += _declared_problems(config, modules)
    if problems:
        raise AdapterFormatError(f"adapter {folder.name} is not servable: " + "; ".join(problems),
                                 folder=str(folder), problems=problems)
    scaled = {(layer, module): (a.float().contiguous(), (b.float() * _scaling(config, layer, module, a.shape[0]))
                                .contiguous()) for (layer, module), (a, b) in modules.items()}
    return LoRAWeights(rank=max(a.shape[0] for a, _ in scaled.values()), modules=scaled)


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
    if not _is_rank(config.get("r")) or not _is_finite(config.get("lora_alpha")):
        problems.append("r must be a positive integer and lora_alpha a finite number")
    problems += _pattern_problems(config)
    return problems


def _pattern_problems(config: dict[str, Any]) -> list[str]:
    """rank_pattern, alpha_pattern and a string target_modules are regexes from the file: each must
    compile, and each pattern's value must be a rank or a finite number."""
    problems = []
    for name, valid in (("rank_pattern", _is_rank), ("alpha_pattern", _is_finite)):
        patterns = config.get(name) or {}
        if not isinstance(patterns, dict):
            problems.append(f"{name} must be an object")
            continue
        problems += [f"{name}[{key!r}] = {value!r} is invalid" for key, value in patterns.items()
                     if not (_compiles(key) and valid(value))]
    targets = config.get("target_modules")
    if not (isinstance(targets, str) and _compiles(targets)) and not (
            isinstance(targets, list) and all(isinstance(t, str) for t in targets)):
        problems.append(f"target_modules {targets!r} must be a regex or a list of module names")
    return problems


def _is_rank(value: object) -> bool:
    return isinstance(value, int) and not isinstance(value, bool) and value >= 1


def _is_finite(value: object) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)


def _compiles(pattern: str) -> bool:
    try:
        re.compile(rf"(.*\.)?({pattern})$")
    except re.error:
        return False
    return True


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
    rank = a.shape[0] if a.ndim == 2 else -1
    if rank < 1 or b.ndim != 2 or a.shape[1] != d_in or b.shape != (d_out, rank):
        problems.append(f"{name}: lora_A {tuple(a.shape)} / lora_B {tuple(b.shape)} do not fit "
                        f"in={d_in} out={d_out}")
        return None
    if rank > max_rank:
        problems.append(f"{name}: rank {rank} exceeds max_lora_rank {max_rank}")
        return None
    if not (a.is_floating_point() and b.is_floating_point()):
        problems.append(f"{name}: weights must be floating point")
        return None
    if not (torch.isfinite(a).all() and torch.isfinite(b).all()):
        problems.append(f"{name}: weights contain NaN or Inf")
        return None
    return a, b


def _declared_problems(config: dict[str, Any], modules: dict[tuple[int, str], tuple[torch.Tensor, torch.Tensor]]
                       ) -> list[str]:
    """The config must tell the truth about the weights: peft scales by the declared rank and only
    wraps the declared target modules, so a lying config would be served unlike peft serves it."""
    problems = []
    targets = config.get("target_modules")
    for (layer, module), (a, _) in modules.items():
        full_name = _full_name(layer, module)
        declared = _pattern_value(config.get("rank_pattern"), full_name, config["r"])
        if a.shape[0] != declared:
            problems.append(f"layers.{layer}.{module}: rank {a.shape[0]} but the config declares r={declared}")
        if not _is_target(targets, module, full_name):
            problems.append(f"layers.{layer}.{module}: has weights but is not in target_modules {targets!r}")
    if isinstance(targets, list):
        missing = sorted(t for t in targets if t in MODULES and t not in {m for _, m in modules})
        if missing:
            problems.append(f"target_modules {missing} declared but the file has no weights for them")
    return problems


def _is_target(targets: object, module: str, full_name: str) -> bool:
    """peft's rule: a string is a regex over the full name ("all-linear": every projection); a list
    names modules by their last dotted parts."""
    if targets == "all-linear":
        return True
    if isinstance(targets, str):
        return re.fullmatch(targets, full_name) is not None
    if isinstance(targets, list):
        return any(full_name == t or full_name.endswith(f".{t}") for t in targets if isinstance(t, str))
    return False


def _full_name(layer: int, module: str) -> str:
    parent = "self_attn" if module in MODULES[:4] else "mlp"
    return f"model.layers.{layer}.{parent}.{module}"


def _pattern_value(patterns: object, full_name: str, default: Any) -> Any:
    """peft's `rank_pattern` / `alpha_pattern`: the first key matching the end of the module's name."""
    for key, value in (patterns if isinstance(patterns, dict) else {}).items():
        if re.match(rf"(.*\.)?({key})$", full_name):
            return value
    return default


def _scaling(config: dict[str, Any], layer: int, module: str, rank: int) -> float:
    """alpha / r (alpha / sqrt(r) with rsLoRA), honouring PEFT's alpha_pattern."""
    alpha = float(_pattern_value(config.get("alpha_pattern"), _full_name(layer, module), config["lora_alpha"]))
    return alpha / (math.sqrt(rank) if config.get("use_rslora") else rank)
