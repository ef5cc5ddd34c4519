"""The architecture facts our forward pass needs, read from a Hugging Face config.json.

One reader for every family: transformers names the same facts the same way across them, and where
a family differs (Gemma's query scalar and soft-caps, Gemma 3's rope per layer type, Qwen2's q/k/v
bias, Qwen3's and Gemma 3's q/k norms) the difference is one line here. Old spellings
(`rope_scaling`, `rope_local_base_freq`, `sliding_window_pattern`) are read as transformers reads them.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from node.errors import ModelFormatError, UnsupportedArchitecture

# config.json `model_type` -> family (the model class that serves it, see node/models/loader.py)
FAMILY_OF = {"llama": "llama", "mistral": "llama", "qwen2": "llama", "qwen3": "llama", "phi3": "llama",
             "gemma2": "gemma", "gemma3_text": "gemma"}
SUPPORTED_TYPES = tuple(FAMILY_OF)
ROPE_TYPES = ("default", "linear", "llama3", "yarn", "dynamic", "longrope")
ACTIVATIONS = ("silu", "gelu_pytorch_tanh")
_GEMMA_WINDOW_PATTERN = {"gemma2": 2, "gemma3_text": 6}  # every n-th layer is global, the others sliding


@dataclass(frozen=True)
class Rope:
    """Rotary embedding of one layer: `kind` is transformers' rope_type; `params` the sorted items of
    its rope parameters (factor, original_max_position_embeddings, short_factor as a tuple, ...)."""

    kind: str
    theta: float
    params: tuple[tuple[str, Any], ...] = ()
    max_position_embeddings: int = 4096  # the pivot of "dynamic" and the default factor of "longrope"

    def param(self, name: str, default: Any = None) -> Any:
        return dict(self.params).get(name, default)

    @property
    def max_positions(self) -> int:
        """The positions it rotates as transformers does (dynamic NTK stretches past the trained length)."""
        if self.kind == "dynamic":
            return int(self.max_position_embeddings * float(self.param("factor", 1.0)))
        return self.max_position_embeddings


@dataclass(frozen=True)
class LayerSpec:
    window: int | None  # sliding window (keys j with i - window < j <= i), None: global attention
    rope: Rope


@dataclass(frozen=True)
class ModelConfig:
    model_type: str
    vocab_size: int
    hidden_size: int
    intermediate_size: int
    num_layers: int
    num_heads: int
    num_kv_heads: int
    head_dim: int
    rms_norm_eps: float
    layers: tuple[LayerSpec, ...]
    max_position_embeddings: int
    tie_embeddings: bool
    qkv_bias: bool
    o_bias: bool
    qk_norm: bool  # RMSNorm over each head of q and k before the rotation (Qwen3, Gemma 3)
    attn_scale: float  # softmax scale: head_dim ** -0.5, Gemma's query_pre_attn_scalar ** -0.5
    attn_softcap: float | None  # scores -> cap * tanh(scores / cap) (Gemma 2)
    final_softcap: float | None  # logits -> cap * tanh(logits / cap) (Gemma 2)
    activation: str
    eos_token_ids: tuple[int, ...]
    bos_token_id: int | None

    @property
    def family(self) -> str:
        return FAMILY_OF[self.model_type]

    @property
    def q_size(self) -> int:
        return self.num_heads * self.head_dim

    @property
    def kv_size(self) -> int:
        return self.num_kv_heads * self.head_dim

    @property
    def max_positions(self) -> int:
        """The longest sequence the model's positions serve."""
        return min(layer.rope.max_positions for layer in self.layers)

    def module_shapes(self) -> dict[str, tuple[int, int]]:
        """(in_features, out_features) of each LoRA-targetable projection, fused ones included."""
        h, i = self.hidden_size, self.intermediate_size
        shapes = {"q_proj": (h, self.q_size), "k_proj": (h, self.kv_size), "v_proj": (h, self.kv_size),
                  "o_proj": (self.q_size, h), "gate_proj": (h, i), "up_proj": (h, i), "down_proj": (i, h)}
        if self.model_type == "phi3":
            shapes |= {"qkv_proj": (h, self.q_size + 2 * self.kv_size), "gate_up_proj": (h, 2 * i)}
        return shapes

    def fused_modules(self) -> dict[str, tuple[tuple[str, int, int], ...]]:
        """Checkpoint projections that hold several of ours (Phi-3): name -> (ours, first row, end row)."""
        if self.model_type != "phi3":
            return {}
        q, kv, i = self.q_size, self.kv_size, self.intermediate_size
        return {"qkv_proj": (("q_proj", 0, q), ("k_proj", q, q + kv), ("v_proj", q + kv, q + 2 * kv)),
                "gate_up_proj": (("gate_proj", 0, i), ("up_proj", i, 2 * i))}

    @classmethod
    def from_folder(cls, folder: str | Path) -> ModelConfig:
        path = Path(folder) / "config.json"
        if not path.is_file():
            raise ModelFormatError("no config.json in the model folder", folder=str(folder))
        return cls.from_dict(json.loads(path.read_text()))

    @classmethod
    def from_dict(cls, raw: dict[str, Any]) -> ModelConfig:
        model_type = raw.get("model_type")
        if model_type not in FAMILY_OF:
            raise UnsupportedArchitecture(
                f"architecture {model_type!r} ({', '.join(raw.get('architectures') or ['no architectures'])}) "
                f"is not supported; supported: {', '.join(SUPPORTED_TYPES)}", model_type=model_type)
        _refuse_unsupported(raw, model_type)
        is_gemma = FAMILY_OF[model_type] == "gemma"
        num_heads = raw["num_attention_heads"]
        head_dim = raw.get("head_dim") or raw["hidden_size"] // num_heads
        eos = raw.get("eos_token_id")
        bias = bool(raw.get("attention_bias", False))
        return cls(
            model_type=model_type, vocab_size=raw["vocab_size"], hidden_size=raw["hidden_size"],
            intermediate_size=raw["intermediate_size"], num_layers=raw["num_hidden_layers"],
            num_heads=num_heads, num_kv_heads=raw.get("num_key_value_heads") or num_heads, head_dim=head_dim,
            rms_norm_eps=float(raw.get("rms_norm_eps", 1e-6)), layers=_layers(raw, model_type),
            max_position_embeddings=raw.get("max_position_embeddings", 4096),
            tie_embeddings=bool(raw.get("tie_word_embeddings", is_gemma)),
            qkv_bias=model_type == "qwen2" or bias, o_bias=model_type != "qwen2" and bias,
            qk_norm=model_type in ("qwen3", "gemma3_text"),
            attn_scale=float(raw.get("query_pre_attn_scalar", 256) if is_gemma else head_dim) ** -0.5,
            attn_softcap=raw.get("attn_logit_softcapping") if is_gemma else None,
            final_softcap=raw.get("final_logit_softcapping") if is_gemma else None,
            activation=raw.get("hidden_activation") or raw.get("hidden_act") or "silu",
            eos_token_ids=tuple(eos) if isinstance(eos, list) else (() if eos is None else (eos,)),
            bos_token_id=raw.get("bos_token_id"),
        )


def _refuse_unsupported(raw: dict[str, Any], model_type: str) -> None:
    """Options of a supported family that our forward would silently get wrong."""
    activation = raw.get("hidden_activation") or raw.get("hidden_act") or "silu"
    refusals = {
        "mlp_bias is not supported": bool(raw.get("mlp_bias")),
        f"activation {activation!r} is not one of {ACTIVATIONS}": activation not in ACTIVATIONS,
        "bidirectional attention is not supported": bool(raw.get("use_bidirectional_attention")),
        "partial rotary embeddings are not supported": _partial_rotary(raw) != 1.0,
    }
    for message, refused in refusals.items():
        if refused:
            raise ModelFormatError(message, model_type=model_type)


def _partial_rotary(raw: dict[str, Any]) -> float:
    rope = raw.get("rope_parameters") or raw.get("rope_scaling") or {}
    return float(rope.get("partial_rotary_factor") or raw.get("partial_rotary_factor") or 1.0)


def _layer_types(raw: dict[str, Any], model_type: str) -> list[str]:
    """"sliding_attention" or "full_attention" per layer, as transformers' config classes decide."""
    num_layers, window = raw["num_hidden_layers"], raw.get("sliding_window")
    if raw.get("layer_types"):
        return list(raw["layer_types"])
    if model_type in _GEMMA_WINDOW_PATTERN:
        every = raw.get("sliding_window_pattern") or _GEMMA_WINDOW_PATTERN[model_type]
        return ["full_attention" if (i + 1) % every == 0 else "sliding_attention" for i in range(num_layers)]
    if model_type in ("qwen2", "qwen3"):
        first = raw.get("max_window_layers", 28)
        return ["sliding_attention" if window and i >= first else "full_attention" for i in range(num_layers)]
    return ["sliding_attention" if window else "full_attention"] * num_layers


def _layers(raw: dict[str, Any], model_type: str) -> tuple[LayerSpec, ...]:
    window = None if raw.get("use_sliding_window") is False else raw.get("sliding_window")
    ropes = _ropes(raw, model_type)
    types = _layer_types(raw, model_type)
    if len(types) != raw["num_hidden_layers"]:
        raise ModelFormatError("layer_types does not name every layer", layer_types=types)
    return tuple(LayerSpec(window=window if kind == "sliding_attention" else None, rope=ropes.get(kind, ropes[""]))
                 for kind in types)


def _ropes(raw: dict[str, Any], model_type: str) -> dict[str, Rope]:
    """Layer type -> its Rope ("": every layer type without one of its own)."""
    params = raw.get("rope_parameters") or raw.get("rope_scaling") or {}
    if model_type == "gemma3_text" and not any(isinstance(v, dict) for v in params.values()):
        # older Gemma 3 configs: rope_theta and rope_scaling are the global layers', rope_local_base_freq the local
        params = {"full_attention": {"rope_theta": raw.get("rope_theta", 1e6), **params},
                  "sliding_attention": {"rope_theta": raw.get("rope_local_base_freq", 1e4)}}
    if any(isinstance(v, dict) for v in params.values()):
        ropes = {kind: _rope(dict(p), raw) for kind, p in params.items() if isinstance(p, dict)}
        return {"": next(iter(ropes.values())), **ropes}
    return {"": _rope(dict(params), raw)}


def _rope(params: dict[str, Any], raw: dict[str, Any]) -> Rope:
    kind = params.pop("rope_type", params.pop("type", "default"))
    if kind not in ROPE_TYPES:
        raise ModelFormatError(f"rope type {kind!r} is not one of {ROPE_TYPES}", rope_type=kind)
    theta = float(params.pop("rope_theta", raw.get("rope_theta", 10000.0)))
    params.pop("partial_rotary_factor", None)
    if kind in ("llama3", "yarn", "longrope"):  # transformers: Phi-3's top-level value wins
        original = raw.get("original_max_position_embeddings") or params.get("original_max_position_embeddings")
        params["original_max_position_embeddings"] = original or raw.get("max_position_embeddings", 4096)
    frozen = {k: tuple(v) if isinstance(v, list) else v for k, v in params.items()}
    return Rope(kind=kind, theta=theta, params=tuple(sorted(frozen.items())) if kind != "default" else (),
                max_position_embeddings=raw.get("max_position_embeddings", 4096))
