"""The adapters bench/adapters.py loads: rank 8 on q, k, v, o of the engine benchmark's model (Llama,
hidden 512, 8 layers, MHA), float32, about 1 MiB each, written straight into a store's disk cache (as if
fetched and vetted before) or into a registry folder the store fetches from; the store over them, and
peft's model over them (the baseline the store is measured against).
"""

from __future__ import annotations

import functools
import json
import sys
import time
import warnings
from collections.abc import Callable
from pathlib import Path

import torch
from safetensors.torch import save_file

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from node.lora.adapter import LoRATargetSpec, LoRAWeights, load_lora_adapter
from node.lora.content_hash import adapter_weights_sha256
from node.lora.disk_cache import disk_key
from node.lora.provider import AdapterSource
from node.lora.slots import LoRASlots
from node.lora.store import AdapterStore, StoreConfig
from node.protocol.hexstr import to_hex

HIDDEN, NUM_LAYERS, NUM_HEADS, INTERMEDIATE, VOCAB = 512, 8, 8, 1376, 4096
RANK, MODULES = 8, ("q_proj", "k_proj", "v_proj", "o_proj")
ADAPTER_BYTES = NUM_LAYERS * len(MODULES) * 2 * RANK * HIDDEN * 4  # A [r, 512] + B [512, r], f32



def write_adapter(folder: Path, seed: int) -> str:
    """A PEFT LoRA folder; returns its registered weights hash."""
    folder.mkdir(parents=True)
    gen = torch.Generator().manual_seed(seed)
    tensors = {}
    for layer in range(NUM_LAYERS):
        for module in MODULES:
            prefix = f"base_model.model.model.layers.{layer}.self_attn.{module}"
            tensors[f"{prefix}.lora_A.weight"] = torch.randn(RANK, HIDDEN, generator=gen) * 0.01
            tensors[f"{prefix}.lora_B.weight"] = torch.randn(HIDDEN, RANK, generator=gen) * 0.01
    save_file(tensors, str(folder / "adapter_model.safetensors"))
    config = {"peft_type": "LORA", "task_type": "CAUSAL_LM", "r": RANK, "lora_alpha": 2 * RANK,
              "lora_dropout": 0.0, "bias": "none", "target_modules": list(MODULES),
              "base_model_name_or_path": "bench-llama-512x8"}
    (folder / "adapter_config.json").write_text(json.dumps(config))
    return to_hex(adapter_weights_sha256(folder))


TARGET = LoRATargetSpec.of(NUM_LAYERS, {**{m: (HIDDEN, HIDDEN) for m in MODULES}, "gate_proj": (HIDDEN, INTERMEDIATE),
                                         "up_proj": (HIDDEN, INTERMEDIATE), "down_proj": (INTERMEDIATE, HIDDEN)})
parse_adapter = functools.partial(load_lora_adapter, target=TARGET, max_rank=RANK)  # the engine's own parse


def new_slots(device: torch.device, num_slots: int = 64) -> LoRASlots:
    """The engine's device slots for the bench model."""
    return LoRASlots(TARGET, num_slots, max_rank=RANK, dtype=torch.float32, device=device)


Listed = list[tuple[str, str]]  # (adapter id or URI, registered hash)


def cached_uri(work: Path, adapter_id: str) -> str:
    """The (absent) source of an adapter written straight into the disk cache."""
    return str(work / "nowhere" / adapter_id)


def cached_folder(work: Path, adapter_id: str, digest: str) -> Path:
    """Where an adapter written straight into the disk cache lies."""
    return work / "cache" / disk_key(bytes.fromhex(digest[2:]), cached_uri(work, adapter_id))


def populate(work: Path, num_adapters: int, num_registry: int) -> tuple[Listed, Listed]:
    """Adapters written into the disk cache and loaded once (as if fetched before), plus some only in a
    registry folder."""
    cache, registry = work / "cache", work / "registry"
    cache.mkdir(parents=True)
    cached = []
    for i in range(num_adapters):
        temp = work / "tmp"
        digest = write_adapter(temp, seed=i)
        temp.rename(cache / disk_key(bytes.fromhex(digest[2:]), cached_uri(work, f"a{i}")))
        cached.append((f"a{i}", digest))
    remote = [(str(registry / f"r{i}"), write_adapter(registry / f"r{i}", seed=10**6 + i))
              for i in range(num_registry)]
    with new_store(work, num_host=1, num_disk=num_adapters) as store:  # each entry's first load, as its
        for adapter_id, digest in cached:  # fetch runs it: it checks the weights and vets the entry
            store.register(adapter_id, AdapterSource(cached_uri(work, adapter_id), digest))
            store.get(adapter_id)
    return cached, remote


def new_store(work: Path, num_host: int, num_disk: int, cache: str = "cache",
              verify_every_load: bool = False) -> AdapterStore[LoRAWeights]:
    config = StoreConfig(cache_dir=work / cache, max_host_bytes=num_host * ADAPTER_BYTES,
                         max_disk_bytes=int(num_disk * ADAPTER_BYTES * 1.1), verify_every_load=verify_every_load)
    return AdapterStore(config, parse_adapter, lambda w: w.nbytes)


def peft_loader(work: Path, first: Path, device: torch.device) -> Callable[[Path, str], tuple[float, float]]:
    """A peft model over a random hidden-512 Llama on `device`; the function times one `load_adapter`
    (wall and CPU seconds; then deletes it)."""
    from peft import PeftModel
    from transformers import LlamaConfig, LlamaForCausalLM

    warnings.filterwarnings("ignore", category=FutureWarning)  # transformers' deprecation notices
    torch.manual_seed(0)
    config = LlamaConfig(hidden_size=HIDDEN, num_hidden_layers=NUM_LAYERS, num_attention_heads=NUM_HEADS,
                         num_key_value_heads=NUM_HEADS, intermediate_size=INTERMEDIATE, vocab_size=VOCAB)
    base = LlamaForCausalLM(config).eval().to(device)
    model = PeftModel.from_pretrained(base, str(first), adapter_name="warm")

    def load(folder: Path, name: str) -> tuple[float, float]:
        started, cpu = time.perf_counter(), time.thread_time()
        model.load_adapter(str(folder), adapter_name=name)
        if device.type == "cuda":
            torch.cuda.synchronize(device)
        seconds = time.perf_counter() - started, time.thread_time() - cpu
        model.delete_adapter(name)
        return seconds

    return load
