"""`loranode cost`: GPUs, memory, tokens/s and $ per million tokens for N adapters under a traffic
mix, one loranode against N dedicated copies of the base model (node/cost.py), with every input."""

from __future__ import annotations

import json
from dataclasses import asdict, replace
from pathlib import Path

import typer

from node.cli.node_api import plain, print_table
from node.cost import GPUS, Measured, ModelBytes, Workload, dedicated, inputs, llama_3_8b, loranode, mix
from node.errors import ConfigError

MEASURED = Path(__file__).resolve().parents[2] / "bench" / "results" / "cost.json"


def cost(
    adapters: int = typer.Option(100, "--adapters", min=1, help="Adapters served (customers)."),
    concurrency: float = typer.Option(64, help="Sequences decoding at once, all adapters together."),
    traffic: str = typer.Option("zipf:1.1", "--mix", help="uniform, or zipf:S (a few hot adapters)."),
    context: int = typer.Option(2048, help="Tokens of KV cache each sequence reads per step."),
    gpu: str = typer.Option("h100", help=f"One of {', '.join(GPUS)}."),
    price_per_hour: float = typer.Option(None, help="Your USD per GPU-hour (default: the table's)."),
    model: Path = typer.Option(None, help="A base model folder (default: Llama 3 8B in bfloat16)."),
    rank: int = typer.Option(16, min=1, help="The adapters' LoRA rank."),
    measured: Path = typer.Option(MEASURED, help="bench/cost.py's results: the multi-adapter overhead."),
    as_json: bool = typer.Option(False, "--json", help="Print the model's inputs and answer as JSON."),
) -> None:
    """What one loranode and N dedicated base-model copies cost for the same traffic."""
    if gpu not in GPUS:
        raise ConfigError(f"unknown GPU {gpu!r}: one of {', '.join(GPUS)}", gpu=gpu)
    chosen = GPUS[gpu] if price_per_hour is None else replace(GPUS[gpu], price_per_hour=price_per_hour)
    sizes = llama_3_8b(rank) if model is None else _model_bytes(model, rank)
    figures = _measured(measured)
    work = Workload(adapters, concurrency, mix(adapters, traffic), context)
    one, many = loranode(chosen, work, sizes, figures), dedicated(chosen, work, sizes, figures)
    if as_json:
        plain(json.dumps({"inputs": inputs(chosen, work, sizes, figures), "loranode": asdict(one),
                          "dedicated": asdict(many)}, indent=2))
        return
    plain(f"{adapters} adapters, {concurrency:g} sequences at once ({traffic}), {context} tokens of context, "
          f"on {chosen.name} ({chosen.bandwidth_bytes_s / 1e12:.2f} TB/s, ${chosen.price_per_hour:.2f}/h)")
    plain(f"model: weights {sizes.weights / 1e9:.2f} GB, adapter (rank {rank}) {sizes.adapter / 1e6:.1f} MB, "
          f"KV {sizes.kv_per_token} B/token; loranode holds a device slot per adapter a batch can use (at most "
          f"one per sequence), the others in host memory (their copies to the device are not in the model)")
    plain(f"measured: {figures.bandwidth_efficiency:.0%} of datasheet bandwidth per step, multi-adapter "
          f"overhead x{figures.adapter_overhead:.3f} per byte ({figures.source})")
    rows = [(name, d.num_gpus, f"{d.memory_bytes / 1e9:.1f}", f"{d.tokens_per_s:,.0f}", f"{d.ms_per_token:.1f}",
             f"{d.usd_per_million_tokens:.3f}") for name, d in (("loranode", one), ("dedicated copies", many))]
    print_table(("deployment", "GPUs", "memory GB", "tokens/s", "ms/token", "$ per M tokens"), rows)
    plain(f"loranode: {many.usd_per_million_tokens / one.usd_per_million_tokens:.1f}x cheaper per token, "
          f"{many.num_gpus / one.num_gpus:.1f}x fewer GPUs")


def _model_bytes(folder: Path, rank: int) -> ModelBytes:
    import torch

    from node.lora.adapter import LoRATargetSpec
    from node.lora.slots import LoRASlots
    from node.models.config import ModelConfig

    config = ModelConfig.from_folder(folder)
    weights = sum(p.stat().st_size for p in folder.glob("*.safetensors"))
    target = LoRATargetSpec.of(config.num_layers, config.module_shapes())
    adapter = LoRASlots.slot_nbytes(target, rank, torch.bfloat16)
    return ModelBytes(weights, adapter, 2 * config.num_layers * config.kv_size * 2)


def _measured(path: Path) -> Measured:
    if not path.is_file():
        return Measured(1.0, 1.0, "not measured: run bench/cost.py; the datasheet bandwidth, no overhead")
    data = json.loads(path.read_text())
    return Measured(float(data["bandwidth_efficiency"]), float(data["adapter_overhead"]), str(data["source"]))
