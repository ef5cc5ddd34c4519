"""The world of bench/replicas.py: anvil with the contracts, a tiny model, `n` adapters (rank 8 on q and v,
each its own weights) registered on chain with one dataset, a funded dApp, and a migrated database; the
indexer in a process of its own, as a deployment runs it."""

from __future__ import annotations

from pathlib import Path

import torch
from safetensors.torch import load_file, save_file

from node.devkit import make_tiny_model, train_tiny_adapter
from node.devkit.corpus import STYLES
from node.devkit.local_node import FIRST_USER, LocalNode
from node.lora.adapter import LoRATargetSpec, load_lora_adapter
from node.lora.adapter_files import AdapterFiles
from node.lora.content_hash import adapter_weights_sha256, base_model_id, dataset_content_hash
from node.models.config import ModelConfig


def make_adapters(work: Path, model: Path, n: int) -> list[Path]:
    """One trained adapter, then `n` of its shape with weights of their own (seeded noise)."""
    first = train_tiny_adapter(model, work / "adapter-0", [STYLES["sea"]], rank=8, steps=1,
                               target_modules=("q_proj", "v_proj")).path
    tensors = load_file(str(first / "adapter_model.safetensors"))
    out = [first]
    for i in range(1, n):
        folder = work / f"adapter-{i}"
        folder.mkdir()
        gen = torch.Generator().manual_seed(i)
        save_file({k: v + 0.01 * torch.randn(v.shape, generator=gen) for k, v in tensors.items()},
                  str(folder / "adapter_model.safetensors"))
        (folder / "adapter_config.json").write_bytes((first / "adapter_config.json").read_bytes())
        out.append(folder)
    return out


def setup(work: Path, db_url: str, n: int) -> tuple[LocalNode, list[int], Path, int]:
    node = LocalNode.start_chain(work / "node", database_url=db_url, indexer_process=True,
                                 prompt_token_price=10**9, completion_token_price=10**9, max_num_seqs=64,
                                 max_in_flight=1024)
    model = make_tiny_model(work / "model", hidden_size=256, num_layers=4, num_heads=8, num_kv_heads=4,
                            vocab_size=2000)
    text = work / "data.txt"
    text.write_text(STYLES["sea"])
    c = node.contracts(FIRST_USER)
    ds = c.datasets.register(dataset_content_hash(text), text.as_uri(), c.client.address)
    owner, base = node.contracts(FIRST_USER + 1), base_model_id(model)
    folders = make_adapters(work / "adapters", model, n)
    ids = [owner.adapters.register(base, adapter_weights_sha256(f), f.as_uri(), [ds], [10_000], 1_000)
           for f in folders]
    payer = node.contracts(FIRST_USER + 2)
    payer.token.mint(payer.client.address, 10**24)
    payer.escrow.deposit(node.contracts(0).client.address, 10**24, payer.token)
    node.wait_for_mirror(timeout_s=300)  # a thousand registrations to index, on a shared box
    return node, ids, model, host_nbytes(model, folders[0], node.settings.max_lora_rank)


def host_nbytes(model: Path, folder: Path, max_rank: int) -> int:
    """What one adapter takes in a replica's host cache (parsed as the API parses it)."""
    config = ModelConfig.from_folder(model)
    target = LoRATargetSpec.of(config.num_layers, config.module_shapes())
    return load_lora_adapter(AdapterFiles.read(folder), target=target, max_rank=max_rank).nbytes
