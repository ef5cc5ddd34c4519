"""Settlement from the command line: the `worker` and `beat` processes, `claim`, `settle losses`, and the
guardian's `settle veto|amend` with the operator's `settle adopt` (`epoch` and `earnings`, which read the
API, are in epoch.py and earnings.py)."""

from __future__ import annotations

from decimal import Decimal
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
from node.config import load_settings
from node.errors import BadRequest, ChainError

settle_app = typer.Typer(help="What settlement collected and could not; the guardian's veto and amend.",
                         no_args_is_help=True)


def worker() -> None:
    """Run the settlement worker: close epochs, build trees, send and confirm `settle`."""
    from node.cli.processes import require_deployment
    from node.settlement.celery_app import run_worker

    settings, _ = require_deployment()
    run_worker(settings)


def beat() -> None:
    """Tick the settlement worker every settlement_interval_s (Celery beat)."""
    from node.cli.processes import require_deployment
    from node.settlement.celery_app import run_beat

    settings, _ = require_deployment()  # fail now, not on the worker's first tick
    run_beat(settings)


def claim(
    node: str = typer.Option(..., "--node", callback=address, help="The node whose pot pays."),
    account: str = typer.Option(None, "--account", callback=address,
                                 help="Who is paid (default: the signer). Anyone may claim."),
    proofs: str = typer.Option(..., "--proofs", help="The node's API URL, or an exported epoch JSON file."),
    all_payees: bool = typer.Option(False, "--all", help="Relayer mode: claim for every payee with something due."),
    rpc_url: str = RpcOption, deployment: Path = DeploymentOption, key_file: Path = KeyFileOption,
    dev_account: int = DevAccountOption,
) -> None:
    """Claim a payee's cumulative rewards with its Merkle proof (the signer pays gas)."""
    from node.settlement.claims import claim as claim_one
    from node.settlement.claims import claim_all

    source: str | Path = proofs if proofs.startswith(("http://", "https://")) else Path(proofs)
    if isinstance(source, Path) and not source.is_file():
        raise BadRequest(f"no epoch file at {proofs} (pass the node's API URL or an exported JSON)")
    ctx = chain_context(rpc_url, deployment)
    contracts = ctx.contracts(signing_key(key_file, dev_account, ctx.deployment.chain_id))
    if all_payees:
        outcome = claim_all(contracts, node, source)
        for who, amount in outcome.paid.items():
            console.print(f"{who}: {_amount(amount)}")
        console.print(f"{len(outcome.paid)} payee(s) paid")
        if outcome.refused:
            raise ChainError(f"{len(outcome.refused)} payee(s) could not be paid (the others were)",
                             refused=outcome.refused)
        return
    who = account or contracts.client.address
    amount = claim_one(contracts, node, who, source)
    console.print(f"{who} received {_amount(amount)}" if amount else f"nothing due to {who}")


def _amount(amount: int) -> str:
    """In base units first, as `earnings` and `epoch` print them, then in tokens."""
    return f"{amount} ({Decimal(amount) / 10**18} tokens)"


@settle_app.command("losses")
def losses(node: str = typer.Option(None, "--node", callback=address, help="Default: the operator key's node."),
           payer: str = typer.Option(None, "--payer", callback=address, help="Only this payer's losses.")) -> None:
    """What the node served but could not collect, per payer, with the reason.

    Every loss still lost, with its lane, epoch, reason and amount; then what later epochs recovered
    with the lane's next valid voucher."""
    from node.db.loss import losses as all_losses
    from node.db.session import make_engine, session_factory
    from node.settlement.runtime import operator_address

    settings = load_settings()
    node = node or operator_address(settings)
    with session_factory(make_engine(settings.resolved_database_url()))() as session:
        records = all_losses(session, node, payer, include_recovered=True)
    lost = [r for r in records if r.recovered_epoch_id is None]
    recovered = [r for r in records if r.recovered_epoch_id is not None]
    if not lost:
        console.print(f"no losses for node {node}")
    for who in sorted({r.payer for r in lost}):
        mine = [r for r in lost if r.payer == who]
        console.print(f"payer {who}: {sum(r.amount for r in mine)} lost in {len(mine)} record(s)")
        for r in mine:
            epoch = "-" if r.epoch_id is None else str(r.epoch_id)
            console.print(f"  lane {r.lane}  epoch {epoch}  {r.reason.value}  {r.amount}  {r.detail or ''}".rstrip())
    if lost:
        console.print(f"total {sum(r.amount for r in lost)} lost by node {node}")
    if recovered:
        epochs = ", ".join(str(e) for e in sorted({r.recovered_epoch_id for r in recovered if r.recovered_epoch_id}))
        console.print(f"recovered {sum(r.amount for r in recovered)} in {len(recovered)} record(s) "
                      f"(collected in epoch {epochs})")


@settle_app.command("veto")
def veto(node: str = typer.Option(..., "--node", callback=address, help="The node whose epoch is vetoed."),
         epoch_id: int = typer.Option(..., "--epoch", min=1, help="A still-locked epoch of that node."),
         rpc_url: str = RpcOption, deployment: Path = DeploymentOption, key_file: Path = KeyFileOption,
         dev_account: int = DevAccountOption) -> None:
    """Guardian: veto a node's still-locked epoch, and with it every later one.

    They can no longer be claimed against, and the node cannot settle, until the guardian amends
    (`settle amend`)."""
    ctx = chain_context(rpc_url, deployment)
    settlement = ctx.contracts(signing_key(key_file, dev_account, ctx.deployment.chain_id)).settlement
    settlement.veto(node, epoch_id)
    console.print(f"epoch {epoch_id} of node {node} vetoed; amend it with `loranode settle amend`")


@settle_app.command("amend")
def amend(node: str = typer.Option(..., "--node", callback=address, help="The vetoed node."),
          tree: Path = typer.Option(..., "--tree", exists=True, dir_okay=False,
                                    help="The corrected rewards tree: JSON {\"rewards\": standard-v1 dump}, e.g. an "
                                         "exported epoch with its leaves corrected (cumulative, the whole pot)."),
          out: Path = typer.Option(None, "--out", help="Where to write the amended epoch, the file payees claim "
                                   "with (`claim --proofs`) and the operator adopts (default: beside --tree)."),
          rpc_url: str = RpcOption, deployment: Path = DeploymentOption, key_file: Path = KeyFileOption,
          dev_account: int = DevAccountOption) -> None:
    """Guardian: replace a node's first vetoed epoch with a corrected tree.

    The tree covers the node's whole pot and is checked before any gas is spent. Writes the amended
    epoch as a file: payees claim with it whether or not the node's operator adopts it (`settle adopt`),
    and the operator adopts the same file."""
    import json

    from node.settlement.amendment import amend as amend_epoch
    from node.settlement.amendment import amended_epoch_document

    ctx = chain_context(rpc_url, deployment)
    settlement = ctx.contracts(signing_key(key_file, dev_account, ctx.deployment.chain_id)).settlement
    doc = json.loads(tree.read_text())
    epoch_id, root = amend_epoch(settlement, node, doc)
    out = out or tree.with_name(f"{tree.stem}.epoch-{epoch_id}.json")
    out.write_text(json.dumps(amended_epoch_document(node, epoch_id, doc)))
    console.print(f"epoch {epoch_id} of node {node} amended to root 0x{root.hex()}; claimable after the "
                  f"challenge period with `loranode claim --proofs {out}`. Give that file to the node's operator "
                  "for `loranode settle adopt --tree`")


@settle_app.command("adopt")
def adopt(tree: Path = typer.Option(..., "--tree", exists=True, dir_okay=False,
                                     help="The guardian's corrected tree, the file `settle amend` sent."),
          node: str = typer.Option(None, "--node", callback=address, help="Default: the operator key's node.")) -> None:
    """Operator: follow the guardian's amend and publish its corrected tree.

    Claims and `epoch export` use the corrected tree, forgotten epochs fold into it, and the next epoch
    builds on its leaves."""
    import json

    from node.cli.processes import require_deployment
    from node.db.session import make_engine, session_factory
    from node.settlement.amendment import adopt_amendment
    from node.settlement.runtime import operator_address

    settings, _ = require_deployment()
    node = node or operator_address(settings)
    contracts = chain_context(None, None).contracts()
    factory = session_factory(make_engine(settings.resolved_database_url()))
    epoch_id = adopt_amendment(factory, contracts.settlement, node, json.loads(tree.read_text()))
    console.print(f"node {node} follows the amend of epoch {epoch_id}: the next epoch builds on its leaves")
