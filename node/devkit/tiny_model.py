"""Tiny random checkpoints of every family we serve, with a real tokenizer, saved like a Hugging Face folder."""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path
from typing import Any, Literal

import torch
from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
from transformers import (
    Gemma2Config,
    Gemma2ForCausalLM,
    Gemma3ForCausalLM,
    Gemma3TextConfig,
    LlamaConfig,
    LlamaForCausalLM,
    MistralConfig,
    MistralForCausalLM,
    Phi3Config,
    Phi3ForCausalLM,
    PretrainedConfig,
    PreTrainedModel,
    PreTrainedTokenizerFast,
    Qwen2Config,
    Qwen2ForCausalLM,
    Qwen3Config,
    Qwen3ForCausalLM,
)
from transformers.utils import logging as hf_logging

from node.devkit.corpus import STYLES, TEXT

Arch = Literal["llama", "mistral", "qwen2", "qwen3", "gemma2", "gemma3_text", "phi3"]
# each family's config class takes its own keyword fields (the base class declares none of them)
_CLASSES: dict[str, tuple[Callable[..., PretrainedConfig], type[PreTrainedModel]]] = {
    "llama": (LlamaConfig, LlamaForCausalLM),
    "mistral": (MistralConfig, MistralForCausalLM),
    "qwen2": (Qwen2Config, Qwen2ForCausalLM),
    "qwen3": (Qwen3Config, Qwen3ForCausalLM),
    "gemma2": (Gemma2Config, Gemma2ForCausalLM),
    "gemma3_text": (Gemma3TextConfig, Gemma3ForCausalLM),
    "phi3": (Phi3Config, Phi3ForCausalLM),
}
SPECIAL_TOKENS = ("<unk>", "<s>", "</s>")
# The tiny models' chat format: each message as `<|role|>\ncontent\n`, then `<|assistant|>\n` to answer.
TINY_CHAT_TEMPLATE = ("{% for m in messages %}<|{{ m['role'] }}|>\n{{ m['content'] }}\n{% endfor %}"
                      "{% if add_generation_prompt %}<|assistant|>\n{% endif %}")


def train_tokenizer(vocab_size: int) -> PreTrainedTokenizerFast:
    """A byte-level BPE tokenizer trained on the built-in corpus (ids 0..2 are <unk>, <s>, </s>)."""
    tok = Tokenizer(models.BPE(unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size, special_tokens=list(SPECIAL_TOKENS),
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(), show_progress=False,
    )
    tok.train_from_iterator([TEXT, *STYLES.values()], trainer=trainer)
    return PreTrainedTokenizerFast(
        tokenizer_object=tok, unk_token="<unk>", bos_token="<s>", eos_token="</s>", pad_token="</s>",
    )


def make_tiny_model(
    folder: str | Path,
    *,
    arch: Arch = "llama",
    hidden_size: int = 64,
    num_layers: int = 2,
    num_heads: int = 4,
    num_kv_heads: int = 2,
    vocab_size: int = 512,
    intermediate_size: int | None = None,
    tie_embeddings: bool = False,
    rope_scaling: dict[str, Any] | None = None,
    max_position_embeddings: int = 2048,
    initializer_range: float = 0.1,
    shards: int = 1,
    seed: int = 0,
    chat_template: str | None = TINY_CHAT_TEMPLATE,
    random_norms: bool = False,
    **config_fields: Any,
) -> Path:
    """Write a random `arch` checkpoint (config.json, safetensors, tokenizer) into `folder`.

    The weights come from transformers' own model class, so the folder loads with
    `AutoModelForCausalLM.from_pretrained` and is the reference our forward pass is tested against.
    A larger than usual `initializer_range` makes greedy choices clear-cut instead of near ties.
    The tokenizer gets `chat_template` (None: a model that cannot chat). `config_fields` go to the
    config class as they are (a sliding window, soft-caps, layer types); `random_norms` adds noise to
    every norm weight, which transformers initialises to a constant that would hide a misplaced norm.
    """
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    tokenizer = train_tokenizer(vocab_size)
    config_cls, model_cls = _CLASSES[arch]
    extra: dict[str, Any] = dict(config_fields)
    if arch.startswith("gemma"):
        extra.setdefault("head_dim", hidden_size // num_heads)  # Gemma's default is 256, not hidden / heads
    if rope_scaling is not None:
        extra["rope_scaling"] = {"rope_theta": 10000.0, **rope_scaling}
    config = config_cls(
        vocab_size=vocab_size, hidden_size=hidden_size,
        intermediate_size=intermediate_size or _intermediate(hidden_size),
        num_hidden_layers=num_layers, num_attention_heads=num_heads, num_key_value_heads=num_kv_heads,
        max_position_embeddings=max_position_embeddings, tie_word_embeddings=tie_embeddings,
        initializer_range=initializer_range, rms_norm_eps=1e-6,
        bos_token_id=tokenizer.bos_token_id, eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id, **extra,
    )
    hf_logging.disable_progress_bar()
    torch.manual_seed(seed)
    model = model_cls(config).eval()
    if random_norms:
        _add_norm_noise(model)
    _save_sharded(model, folder, shards)
    if chat_template is not None:
        tokenizer.chat_template = chat_template
    tokenizer.save_pretrained(folder)
    return folder


def _add_norm_noise(model: torch.nn.Module) -> None:
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "norm" in name:
                p.add_(torch.randn_like(p) * 0.2)


def _save_sharded(model: Any, folder: Path, shards: int) -> None:
    """save_pretrained in `shards` safetensors files (one when 1)."""
    nbytes = sum(p.numel() * p.element_size() for p in model.state_dict().values())
    shard_bytes = max(1, nbytes // shards + 1) if shards > 1 else nbytes * 2 + (1 << 20)
    model.save_pretrained(folder, max_shard_size=shard_bytes)


def _intermediate(hidden_size: int) -> int:
    """The Llama rule: 8/3 of hidden, rounded up to a multiple of 32."""
    return (hidden_size * 8 // 3 + 31) // 32 * 32
