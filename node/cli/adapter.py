"""`loranode adapter train|register|show`: adapter owners train on registered data and register lineage."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import typer

from node.cli.console import console
from node.cli.context import DeploymentOption, DevAccountOption, KeyFileOption, RpcOption, chain_context, signing_key
from node.errors import BadRequest

app = typer.Typer(help="Train adapters on registered datasets and register them with their lineage.",
                  no_args_is_help=True)
LINEAGE_FILE = "lineage.json"
BPS = 10_000


def weights_from_sizes(sizes: list[int]) -> list[int]:
    """Basis points proportional to `sizes` that sum to exactly 10,000 (largest remainders)."""
    total = sum(sizes)
    if total <= 0:
        raise BadRequest("datasets are empty")
    raw = [s * BPS for s in sizes]
    bps = [r // total for r in raw]
    for i in sorted(range(len(sizes)), key=lambda i: raw[i] % total, reverse=True)[: BPS - sum(bps)]:
        bps[i] += 1
    if any(b == 0 for b in bps):
        raise BadRequest("a dataset is too small to get a weight; pass --weights", sizes=sizes)
    return bps


@app.command()
def train(
    base: Path = typer.Option(..., "--base", help="The base model folder."),
    dataset: list[int] = typer.Option(..., "--dataset", help="Registered dataset id (repeat for each)."),
    out: Path = typer.Option(..., "--out", help="Where to write the PEFT adapter folder."),
    weights: str = typer.Option(None, help="Comma-separated bps per dataset (default: by text size)."),
    rank: int = typer.Option(8, min=1, max=256), steps: int = typer.Option(20, min=1),
    lr: float = typer.Option(5e-3), rpc_url: str = RpcOption, deployment: Path = DeploymentOption,
) -> None:
    """Fetch the datasets, check their registered hashes, fine-tune a LoRA with peft, write its lineage."""
    from node.attribution.dataset_files import fetch_dataset, read_texts
    from node.devkit import train_tiny_adapter
    from node.lora.content_hash import base_model_id
    from node.protocol.hexstr import to_hex

    contracts = chain_context(rpc_url, deployment).contracts()
    texts: list[list[str]] = []
    for ds in dataset:
        info = contracts.datasets.get(ds)  # an unregistered id reverts: ChainError "UnknownDataset"
        texts.append(read_texts(fetch_dataset(info.uri, info.content_hash, out.parent / ".datasets")))
        console.print(f"dataset {ds}: {len(texts[-1])} text(s), hash verified")
    bps = [int(w) for w in weights.split(",")] if weights else weights_from_sizes([sum(map(len, t)) for t in texts])
    if len(bps) != len(dataset) or sum(bps) != BPS:
        raise BadRequest("--weights needs one value per dataset summing to 10000", weights=bps)
    with console.status(f"training rank-{rank} LoRA for {steps} steps..."):
        trained = train_tiny_adapter(base, out, [t for group in texts for t in group], rank=rank, alpha=2 * rank,
                                     steps=steps, lr=lr)
    lineage = {"baseModel": to_hex(base_model_id(base)), "datasets": dataset, "weightsBps": bps}
    (out / LINEAGE_FILE).write_text(json.dumps(lineage, indent=2) + "\n")
    console.print(f"loss {trained.losses[0]:.3f} -> {trained.losses[-1]:.3f}; wrote {out} and {out / LINEAGE_FILE}")


@app.command()
def register(
    folder: Path = typer.Argument(..., help="The PEFT adapter folder (with lineage.json from `train`)."),
    uri: str = typer.Option(None, help="Where nodes fetch it (default: its file:// URI)."),
    owner_share_bps: int = typer.Option(2_000, "--owner-share", min=0, max=BPS, help="Your share after the node's."),
    rpc_url: str = RpcOption, deployment: Path = DeploymentOption, key_file: Path = KeyFileOption,
    dev_account: int = DevAccountOption,
) -> None:
    """Register the adapter: base model, weights sha256 (adapter hash rule), URI, lineage, owner share."""
    from node.lora.content_hash import adapter_weights_sha256, sha256_from_hex
    from node.protocol.hexstr import to_hex

    lineage_path = folder / LINEAGE_FILE
    if not lineage_path.is_file():
        raise BadRequest(f"{lineage_path} not found: train with `loranode adapter train` or write it",
                         path=str(lineage_path))
    lineage = _read_lineage(lineage_path)
    digest = adapter_weights_sha256(folder)
    ctx = chain_context(rpc_url, deployment)
    key = signing_key(key_file, dev_account, ctx.deployment.chain_id)
    adapter_id = ctx.contracts(key).adapters.register(sha256_from_hex(lineage["baseModel"]), digest,
                                                      uri or folder.resolve().as_uri(), lineage["datasets"],
                                                      lineage["weightsBps"], owner_share_bps)
    pairs = dict(zip(lineage["datasets"], lineage["weightsBps"], strict=True))
    console.print(f"adapter {adapter_id} registered: weights {to_hex(digest)}, lineage {pairs}, "
                  f"owner share {owner_share_bps}")


def _read_lineage(path: Path) -> dict[str, Any]:
    try:
        lineage = json.loads(path.read_text(encoding="utf-8"))
    except (ValueError, UnicodeDecodeError) as exc:
        raise BadRequest(f"{path} is not valid JSON: {exc}", path=str(path)) from exc
    missing = [k for k in ("baseModel", "datasets", "weightsBps") if not isinstance(lineage, dict) or k not in lineage]
    if missing:
        raise BadRequest(f"{path} lacks {', '.join(missing)} (write it with `loranode adapter train`)", path=str(path))
    return dict(lineage)


@app.command()
def show(adapter_id: int = typer.Argument(..., min=1, help="The adapter id (from `adapter register`)."),
         rpc_url: str = RpcOption,
         deployment: Path = DeploymentOption) -> None:
    """Print a registered adapter as the chain has it."""
    info = chain_context(rpc_url, deployment).contracts().adapters.get(adapter_id)
    for name, value in info.__dict__.items():
        console.print(f"{name}: {'0x' + value.hex() if isinstance(value, bytes) else value}")
