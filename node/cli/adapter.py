"""`loranode adapter train|register|show`: adapter owners train on registered data and register lineage."""

from __future__ import annotations

import json
import threading
from pathlib import Path
from typing import TYPE_CHECKING, Any

import typer

from node.cli.console import console
from node.cli.context import DeploymentOption, DevAccountOption, KeyFileOption, RpcOption, chain_context, signing_key
from node.cli.training_progress import TrainingProgress, stop_on_ctrl_c
from node.errors import BadRequest
from node.training import CHECKPOINT_DIR, MAX_DEFAULT_SEQ_LEN

if TYPE_CHECKING:
    from node.training.token_file import TokenFile

app = typer.Typer(help="Train adapters on registered datasets and register them with their lineage.",
                  no_args_is_help=True)
LINEAGE_FILE = "lineage.json"
INTERRUPTED = 130  # Ctrl-C: the shell's 128 + SIGINT, apart from 2 (a user's mistake) and 1 (a failure)
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
    out: Path = typer.Option(..., "--out", help="Where to write the PEFT adapter folder (and its checkpoints)."),
    weights: str = typer.Option(None, help="Comma-separated bps per dataset (default: by text size)."),
    rank: int = typer.Option(8, min=1, max=256, help="The LoRA rank (alpha is twice it)."),
    lr: float = typer.Option(5e-3, help="AdamW learning rate."),
    max_steps: int = typer.Option(None, "--max-steps", "--steps", min=1,
                                  help="Stop after this many optimizer steps (default: --epochs passes)."),
    epochs: int = typer.Option(1, min=1, help="Passes over the data when --max-steps is not given."),
    seq_len: int = typer.Option(None, "--seq-len", min=2, help="Tokens per packed sequence "
                                f"(default: the model's length, at most {MAX_DEFAULT_SEQ_LEN})."),
    batch_size: int = typer.Option(4, "--batch-size", min=1, help="Sequences per micro-batch."),
    grad_accum: int = typer.Option(1, "--grad-accum", min=1, help="Micro-batches per optimizer step."),
    checkpoint_every: int = typer.Option(100, "--checkpoint-every", min=0,
                                         help="Steps between checkpoints in OUT/checkpoint (0: only on Ctrl-C)."),
    resume: bool = typer.Option(False, "--resume", help="Go on from OUT/checkpoint (same datasets and options)."),
    seed: int = typer.Option(0, help="Seeds the LoRA init and the data order."),
    rpc_url: str = RpcOption, deployment: Path = DeploymentOption,
) -> None:
    """Fine-tune a LoRA on registered datasets, checked against their hashes.

    Writes a PEFT folder (OUT) and its lineage.json for `adapter register`.

    Tokenized once to a file beside OUT, packed, trained in mini-batches: memory stays flat in data size.
    Ctrl-C ends the step in progress and checkpoints it (exit code 130); the same command with --resume goes on.
    """
    from node.lora.content_hash import base_model_id
    from node.protocol.hexstr import to_hex
    from node.training.lora_trainer import LoRATrainer, TrainingConfig

    base_id = base_model_id(base)  # a folder that is not a model fails here, before any download
    tokens = _tokenized_datasets(base, dataset, out, rpc_url, deployment)
    sizes = [d.num_chars for d in tokens.datasets]
    bps = [int(w) for w in weights.split(",")] if weights else weights_from_sizes(sizes)
    if len(bps) != len(dataset) or sum(bps) != BPS:
        raise BadRequest("--weights needs one value per dataset summing to 10000", weights=bps)
    config = TrainingConfig(rank=rank, alpha=2 * rank, lr=lr, seq_len=seq_len, batch_size=batch_size,
                            grad_accum=grad_accum, max_steps=max_steps, epochs=epochs,
                            checkpoint_every=checkpoint_every, seed=seed)
    if resume and not (out / CHECKPOINT_DIR).is_dir():
        console.print(f"no checkpoint in {out / CHECKPOINT_DIR}: training from the start", markup=False)
    stop = threading.Event()
    try:
        with TrainingProgress(console) as progress, stop_on_ctrl_c(stop, console):
            result = LoRATrainer(base, config).train(tokens, out, resume=resume, observer=progress, stop=stop)
    except KeyboardInterrupt as exc:
        console.print(_interrupted(exc, out), markup=False)
        raise typer.Exit(INTERRUPTED) from None
    lineage = {"baseModel": to_hex(base_id), "datasets": dataset, "weightsBps": bps}
    (out / LINEAGE_FILE).write_text(json.dumps(lineage, indent=2) + "\n")
    rate = result.num_tokens / result.elapsed_s if result.elapsed_s else 0.0
    console.print(f"{len(result.losses)} steps, {result.num_tokens:,} tokens at {rate:,.0f} tok/s; "
                  f"loss {result.losses[0]:.3f} -> {result.losses[-1]:.3f}; wrote {out} and {out / LINEAGE_FILE}",
                  markup=False)


def _interrupted(exc: KeyboardInterrupt, out: Path) -> str:
    """What a Ctrl-C left behind, and how to go on."""
    from node.training.lora_trainer import TrainingInterrupted

    resume = "run the same command with --resume to go on from it"
    if isinstance(exc, TrainingInterrupted):
        return f"interrupted after step {exc.step}: checkpoint written to {exc.checkpoint}; {resume}"
    if (out / CHECKPOINT_DIR).is_dir():
        return f"interrupted: the last checkpoint is in {out / CHECKPOINT_DIR}; {resume}"
    return "interrupted before the first checkpoint: nothing to resume, run the command again"


def _tokenized_datasets(base: Path, dataset: list[int], out: Path, rpc_url: str, deployment: Path) -> TokenFile:
    """The registered datasets fetched, checked against their registered hashes and tokenized (once)."""
    from transformers import AutoTokenizer

    from node.attribution.dataset_files import fetch_dataset
    from node.training.token_file import tokenize_datasets

    contracts = chain_context(rpc_url, deployment).contracts()
    cache = out.parent / ".datasets"
    sources = []
    for ds in dataset:
        info = contracts.datasets.get(ds)  # an unregistered id reverts: ChainError "UnknownDataset"
        sources.append((fetch_dataset(info.uri, info.content_hash, cache), info.content_hash))
    tokens = tokenize_datasets(AutoTokenizer.from_pretrained(base), sources, cache / "tokens")
    for ds, stats in zip(dataset, tokens.datasets, strict=True):
        console.print(f"dataset {ds}: {stats.num_documents} text(s), {stats.num_tokens:,} tokens, hash verified")
    return tokens


@app.command()
def register(
    folder: Path = typer.Argument(..., help="The PEFT adapter folder (with lineage.json from `train`)."),
    uri: str = typer.Option(None, help="Where nodes fetch it (default: its file:// URI)."),
    owner_share_bps: int = typer.Option(2_000, "--owner-share", min=0, max=BPS, help="Your share after the node's."),
    rpc_url: str = RpcOption, deployment: Path = DeploymentOption, key_file: Path = KeyFileOption,
    dev_account: int = DevAccountOption,
) -> None:
    """Register an adapter folder: base model, weights hash, URI, lineage, owner share."""
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
