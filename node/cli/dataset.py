"""`loranode dataset register|show`: contributors put their data on the registry."""

from __future__ import annotations

from pathlib import Path

import typer

from node.cli.console import console
from node.cli.context import (
    DeploymentOption,
    DevAccountOption,
    KeyFileOption,
    RpcOption,
    address,
    chain_context,
    signing_key,
)
from node.errors import BadRequest

app = typer.Typer(help="Register datasets and look them up.", no_args_is_help=True)


@app.command()
def register(
    path: Path = typer.Argument(..., help="The dataset: a file, or a folder of files."),
    uri: str = typer.Option(None, help="Where nodes fetch it (default: its file:// URI)."),
    payout: str = typer.Option(None, callback=address, help="Address that earns its share (default: the signer)."),
    rpc_url: str = RpcOption, deployment: Path = DeploymentOption, key_file: Path = KeyFileOption,
    dev_account: int = DevAccountOption,
) -> None:
    """Hash a dataset file or folder and register it with its URI and payout address."""
    from eth_account import Account

    from node.lora.content_hash import dataset_content_hash
    from node.protocol.hexstr import to_hex

    if not path.exists():
        raise BadRequest(f"no such file or folder: {path}", path=str(path))
    ctx = chain_context(rpc_url, deployment)
    key = signing_key(key_file, dev_account, ctx.deployment.chain_id)
    with console.status(f"hashing {path}..."):
        digest = dataset_content_hash(path)
    payout = payout or Account.from_key(key).address
    dataset_id = ctx.contracts(key).datasets.register(digest, uri or path.resolve().as_uri(), payout)
    console.print(f"dataset {dataset_id} registered: content hash {to_hex(digest)}, payout {payout}")


@app.command()
def show(dataset_id: int = typer.Argument(..., min=1, help="The dataset id (from `dataset register`)."),
         rpc_url: str = RpcOption,
         deployment: Path = DeploymentOption) -> None:
    """Print a registered dataset as the chain has it."""
    info = chain_context(rpc_url, deployment).contracts().datasets.get(dataset_id)
    for name, value in info.__dict__.items():
        console.print(f"{name}: {'0x' + value.hex() if isinstance(value, bytes) else value}")
