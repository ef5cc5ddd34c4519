"""What an adapter's `adapter_config.json` says, and whether it tells the truth about the weights.

peft scales each module's delta by alpha / r (alpha / sqrt(r) with rsLoRA), with per-module
`rank_pattern` / `alpha_pattern` overrides, and wraps only the `target_modules`. A config that lies
about any of these would be served unlike peft serves it, so it is refused. Every value here comes
from a file: patterns must compile and numbers must be finite before anything reads them.
"""

from __future__ import annotations

import math
import re
from typing import Any

from node.lora.weights import MODULES


def config_problems(config: dict[str, Any]) -> list[str]:
    """What makes a config unservable on its own (before the weights are looked at)."""
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
    return problems + _pattern_problems(config)


def declared_problems(config: dict[str, Any], ranks: dict[tuple[int, str], int]) -> list[str]:
    """Where a valid config disagrees with the weights: `ranks` is (layer, module) -> lora_A's rank."""
    problems = []
    targets = config.get("target_modules")
    for (layer, module), rank in sorted(ranks.items()):
        name = full_name(layer, module)
        declared = _pattern_value(config.get("rank_pattern"), name, config["r"])
        if rank != declared:
            problems.append(f"layers.{layer}.{module}: rank {rank} but the config declares r={declared}")
        if not _is_target(targets, name):
            problems.append(f"layers.{layer}.{module}: has weights but is not in target_modules {targets!r}")
    if isinstance(targets, list):
        missing = sorted(t for t in targets if t in MODULES and t not in {m for _, m in ranks})
        if missing:
            problems.append(f"target_modules {missing} declared but the file has no weights for them")
    return problems


def scaling(config: dict[str, Any], layer: int, module: str, rank: int) -> float:
    """alpha / r (alpha / sqrt(r) with rsLoRA), honouring peft's alpha_pattern (a valid config only)."""
    alpha = float(_pattern_value(config.get("alpha_pattern"), full_name(layer, module), config["lora_alpha"]))
    return alpha / (math.sqrt(rank) if config.get("use_rslora") else rank)


def full_name(layer: int, module: str) -> str:
    parent = "self_attn" if module in (*MODULES[:4], "qkv_proj") else "mlp"
    return f"model.layers.{layer}.{parent}.{module}"


def _pattern_problems(config: dict[str, Any]) -> list[str]:
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


def _is_target(targets: object, name: str) -> bool:
    """peft's rule: a string is a regex over the full name ("all-linear": every projection); a list
    names modules by their last dotted parts."""
    if targets == "all-linear":
        return True
    if isinstance(targets, str):
        return re.fullmatch(targets, name) is not None
    return isinstance(targets, list) and any(name == t or name.endswith(f".{t}") for t in targets)


def _pattern_value(patterns: object, name: str, default: Any) -> Any:
    """peft's `rank_pattern` / `alpha_pattern`: the first key matching the end of the module's name."""
    for key, value in (patterns if isinstance(patterns, dict) else {}).items():
        if re.match(rf"(.*\.)?({key})$", name):
            return value
    return default


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
