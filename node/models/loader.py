"""Load a Hugging Face folder (config.json + safetensors, single or sharded) into the model of its family.

Checkpoint names map onto our parameters in one table for every family: q/k/v and gate/up land in
row ranges of the fused matrices, and Phi-3's checkpoint, fused already (qkv_proj, gate_up_proj),
in the same layout whole.
"""

from __future__ import annotations

import json
import logging
import re
from collections.abc import Iterator
from pathlib import Path

import torch
from safetensors import safe_open

from node.errors import ModelFormatError
from node.models.config import FAMILY_OF, ModelConfig
from node.models.gemma import GemmaForCausalLM
from node.models.llama import LlamaForCausalLM

log = logging.getLogger(__name__)
_LAYER = re.compile(r"model\.layers\.(\d+)\.(.+)")
_QKV = {"q_proj": 0, "k_proj": 1, "v_proj": 2}
FAMILIES: dict[str, type[LlamaForCausalLM]] = {"llama": LlamaForCausalLM, "gemma": GemmaForCausalLM}
assert set(FAMILY_OF.values()) == set(FAMILIES), "every supported model_type has a model class"
# checkpoint module -> our parameter prefix, for the tensors that land whole
_WHOLE = {"o_proj": "o_", "down_proj": "down_", "qkv_proj": "qkv_", "gate_up_proj": "gate_up_",
          "input_layernorm": "input_norm.", "post_attention_layernorm": "post_attention_norm.",
          "pre_feedforward_layernorm": "pre_feedforward_norm.", "post_feedforward_layernorm": "post_feedforward_norm.",
          "q_norm": "q_norm.", "k_norm": "k_norm."}


def weight_files(folder: Path) -> list[Path]:
    """The safetensors files of a checkpoint; refuses pickled (.bin/.pt) checkpoints."""
    index = folder / "model.safetensors.index.json"
    if index.is_file():
        names = sorted(set(json.loads(index.read_text())["weight_map"].values()))
        return [folder / n for n in names]
    files = sorted(folder.glob("*.safetensors"))
    if not files:
        raise ModelFormatError("no safetensors weights in the model folder (pickled checkpoints are refused)",
                               folder=str(folder))
    return files


def _tensors(files: list[Path]) -> Iterator[tuple[str, torch.Tensor]]:
    for path in files:
        with safe_open(str(path), framework="pt") as f:
            for name in f.keys():  # noqa: SIM118 - safe_open is not a mapping
                yield name, f.get_tensor(name)


def load_model(folder: str | Path, dtype: torch.dtype, device: torch.device, max_positions: int,
               ) -> LlamaForCausalLM:
    folder = Path(folder)
    cfg = ModelConfig.from_folder(folder)
    with torch.device(device):
        model = FAMILIES[cfg.family](cfg, dtype, max_positions)  # uninitialised until copied below
    params = dict(model.named_parameters())
    loaded = dict.fromkeys(params, 0)
    for name, tensor in _tensors(weight_files(folder)):
        target, rows = _place(cfg, name)
        if target is None:
            continue
        if target not in params:
            raise ModelFormatError(f"unexpected weight {name}", weight=name)
        dest = params[target].data if rows is None else params[target].data[rows[0]:rows[1]]
        if dest.shape != tensor.shape:
            raise ModelFormatError(f"{name} has shape {tuple(tensor.shape)}, expected {tuple(dest.shape)}",
                                   weight=name)
        dest.copy_(tensor.to(dtype))
        loaded[target] += tensor.numel()
    missing = [n for n, count in loaded.items() if count != params[n].numel()]
    if missing:
        raise ModelFormatError(f"checkpoint lacks weights for {missing}", folder=str(folder), missing=missing)
    log.info("loaded %s (%d layers) from %s", cfg.model_type, cfg.num_layers, folder)
    return model.eval()


def _place(cfg: ModelConfig, name: str) -> tuple[str | None, tuple[int, int] | None]:
    """Our parameter name (and row range in a fused matrix) for a checkpoint tensor name."""
    if name == "model.embed_tokens.weight":
        return "embed", None
    if name == "model.norm.weight":
        return "norm.weight", None
    if name == "lm_head.weight":
        return (None, None) if cfg.tie_embeddings else ("lm_head", None)
    m = _LAYER.fullmatch(name)
    if m is None:
        return None, None  # e.g. rotary_emb.inv_freq buffers
    layer, rest = f"layers.{m.group(1)}.", m.group(2)
    module, _, kind = rest.rpartition(".")
    short = module.rsplit(".", 1)[-1]
    if short in _QKV:
        start = (0, cfg.q_size, cfg.q_size + cfg.kv_size)[_QKV[short]]
        size = cfg.q_size if short == "q_proj" else cfg.kv_size
        return layer + ("qkv_weight" if kind == "weight" else "qkv_bias"), (start, start + size)
    if short in _WHOLE:
        return layer + _WHOLE[short] + kind, None
    if short in ("gate_proj", "up_proj"):
        start = 0 if short == "gate_proj" else cfg.intermediate_size
        return layer + "gate_up_weight", (start, start + cfg.intermediate_size)
    return layer + rest, None
