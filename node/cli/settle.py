"""Settlement from the command line: the `worker` and `beat` processes, `claim`, and `epoch export`."""

from __future__ import annotations

from decimal import Decimal
from pathlib import Path

import typer

from node.cli.console import console
from node.cli.context import DeploymentOption, DevAccountOption, KeyFileOption, RpcOption, chain_context, signing_key
from node.config import load_settings
from node.errors import BadRequest

epoch_app = typer.Typer(help="Published settlement epochs.", no_args_is_help=True)


def worker() -> None:
    """Run the Celery settlement worker: close epochs, build trees, send and confirm `settle`."""
    from node.cli.processes import require_deployment
    from node.settlement.celery_app import run_worker

    settings, _ = require_deployment()
    run_worker(settings)


def beat() -> None:
    """Run the Celery beat that ticks the settlement worker every settlement_interval_s."""
    from node.cli.processes import require_deployment
    from node.settlement.celery_app import run_beat

    settings, _ = require_deployment()  # fail now, not on the worker's first tick
    run_beat(settings)


def claim(
    node: str = typer.Option(..., "--node", help="The node whose pot pays."),
    account: str = typer.Option(None, "--account", help="Who is paid (default: the signer). Anyone may claim."),
    proofs: str = typer.Option(..., "--proofs", help="The node's API URL, or an exported epoch JSON file."),
    all_payees: bool = typer.Option(False, "--all", help="Relayer mode: claim for every payee with something due."),
    rpc_url: str = RpcOption, deployment: Path = DeploymentOption, key_file: Path = KeyFileOption,
    dev_account: int = DevAccountOption,
) -> None:
    """Claim a payee's cumulative rewards with its Merkle proof (the signer pays the gas)."""
    from node.settlement.claims import claim as claim_one
    from node.settlement.claims import claim_all

    source: str | Path = proofs if proofs.startswith(("http://", "https://")) else Path(proofs)
    if isinstance(source, Path) and not source.is_file():
        raise BadRequest(f"no epoch file at {proofs} (pass the node's API URL or an exported JSON)")
    ctx = chain_context(rpc_url, deployment)
    contracts = ctx.contracts(signing_key(key_file, dev_account, ctx.deployment.chain_id))
    if all_payees:
        paid = claim_all(contracts, node, source)
        for who, amount in paid.items():
            console.print(f"{who}: {Decimal(amount) / 10**18} tokens")
        console.print(f"{len(paid)} payee(s) paid")
        return
    who = account or contracts.client.address
    amount = claim_one(contracts, node, who, source)
    console.print(f"{who} received {Decimal(amount) / 10**18} tokens" if amount else f"nothing due to {who}")


@epoch_app.command("export")
def export(node: str = typer.Option(..., "--node"), out: Path = typer.Option(..., "--out"),
           epoch_id: int = typer.Option(None, "--epoch", min=1, help="Default: the latest published.")) -> None:
    """Write a published epoch (rewards and receipts trees) as JSON, for claims without the API."""
    from node.db.session import make_engine, session_factory
    from node.settlement.publication import export_epoch

    factory = session_factory(make_engine(load_settings().resolved_database_url()))
    try:
        path = export_epoch(factory, node, out, epoch_id)
    except LookupError as exc:
        raise BadRequest(str(exc)) from exc
    console.print(f"wrote {path}")
