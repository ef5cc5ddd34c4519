"""`loranode epoch list|show|export`: a node's settlement epochs, read from its API on any machine."""

from __future__ import annotations

import json
import time
from pathlib import Path
from typing import Any

import typer

from node.cli.node_api import (
    JsonOption,
    NodeAddressOption,
    NodeUrlOption,
    get_json,
    node_address,
    plain,
    print_table,
    utc_time,
)
from node.config import load_settings
from node.errors import BadRequest, ChainError, ConfigError, NodeRefusal

app = typer.Typer(help="Watch a node's settlement epochs (from its API, on any machine).", no_args_is_help=True)
DONE = ("final", "failed")


@app.command("list")
def list_epochs(node_url: str = NodeUrlOption, node: str = NodeAddressOption, as_json: bool = JsonOption,
                limit: int = typer.Option(20, "--limit", min=1, max=500, help="How many, newest first.")) -> None:
    """The node's newest epochs: state, receipts, collected, rewards and settle tx."""
    node = node_address(node_url, node)
    doc = get_json(node_url, f"/v1/epochs/{node}", {"limit": limit})
    if as_json:
        plain(json.dumps(doc, indent=2))
        return
    if not doc["epochs"]:
        plain(f"no epochs yet for node {doc['node']}: receipts wait until the worker closes one")
        return
    plain(f"epochs of node {doc['node']} (amounts in token base units)")
    print_table(("epoch", "state", "receipts", "collected", "rewards total", "settle tx", "opened"),
                [(e["epochId"], e["state"], e["receiptCount"], e["collected"], e["rewardsTotal"], e["txHash"],
                  utc_time(e["openedAt"])) for e in doc["epochs"]])


@app.command()
def show(epoch_id: str = typer.Argument("latest", help="An epoch id, or `latest`."), node_url: str = NodeUrlOption,
         node: str = NodeAddressOption, as_json: bool = JsonOption,
         wait: float = typer.Option(0, "--wait", min=0, help="Wait up to this many seconds for the epoch to "
                                    "exist and be final (or failed).")) -> None:
    """One epoch: state, totals, roots, settle tx and what could not be collected."""
    if epoch_id != "latest" and not epoch_id.isdigit():
        raise BadRequest(f"not an epoch id: {epoch_id!r} (a number, or `latest`)")
    node = node_address(node_url, node)
    doc = _fetch(node_url, node, epoch_id, wait)
    if as_json:
        plain(json.dumps(doc, indent=2))
        return
    _print_epoch(doc)


def _fetch(node_url: str, node: str, epoch_id: str, wait_s: float) -> dict[str, Any]:
    deadline = time.monotonic() + wait_s
    while True:
        try:
            doc: dict[str, Any] = get_json(node_url, f"/v1/epochs/{node}/{epoch_id}/summary")
            if doc["state"] in DONE or time.monotonic() >= deadline:
                return doc
        except NodeRefusal as exc:
            if exc.http_status != 404 or time.monotonic() >= deadline:
                raise
        time.sleep(1.0)


def _print_epoch(doc: dict[str, Any]) -> None:
    chain = doc.get("onChain") or {}
    unlock = "-" if not chain else ("vetoed" if chain["vetoed"] else f"claimable from {utc_time(chain['unlockAt'])}")
    for name, value in (("node", doc["node"]), ("epoch", doc["epochId"]), ("state", doc["state"]),
                        ("receipts", doc["receiptCount"]), ("collected", doc["collected"]),
                        ("rewards total", doc["rewardsTotal"]), ("rewards root", doc["rewardsRoot"]),
                        ("receipts root", doc["receiptsRoot"]), ("settle tx", doc["txHash"]),
                        ("claims", unlock), ("opened", utc_time(doc["openedAt"])),
                        ("final", utc_time(doc["finalizedAt"]))):
        plain(f"{name + ':':15}{'-' if value is None else value}")
    losses = doc["losses"]
    if not losses["byReason"]:
        plain(f"{'losses:':15}none")
    else:
        plain("losses (served, not collected; amounts in token base units):")
        print_table(("reason", "receipts", "amount", "recovered later"),
                    [(x["reason"], x["count"], x["amount"], x["recoveredLater"]) for x in losses["byReason"]])
    if losses["recoveredHere"]["count"]:
        plain(f"recovered here: {losses['recoveredHere']['count']} earlier lost receipt(s), "
              f"{losses['recoveredHere']['amount']}")


@app.command("export")
def export(out: Path = typer.Option(..., "--out", help="The JSON file to write (what `claim --proofs` takes)."),
           node_url: str = typer.Option(None, "--node-url", help="Read it from this node's API (from any machine); "
                                        "default: this machine's node database."),
           node: str = NodeAddressOption,
           epoch_id: int = typer.Option(None, "--epoch", min=1, help="Default: the latest published.")) -> None:
    """Write a published epoch's trees as JSON, for claims without the API."""
    if node_url is not None:
        node = node_address(node_url, node)
        doc = get_json(node_url, f"/v1/epochs/{node}/{epoch_id or 'latest'}")
        if str(doc.get("node", "")).lower() != node.lower():
            raise ChainError("the node answered for another node", asked=node, answered=doc.get("node"))
    else:
        doc = _from_database(node, epoch_id)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(doc))
    plain(f"wrote epoch {doc['epochId']} of node {doc['node']} to {out}")


def _from_database(node: str | None, epoch_id: int | None) -> dict[str, Any]:
    from node.db.session import make_engine, session_factory
    from node.settlement.publication import epoch_document, published_epoch
    from node.settlement.runtime import operator_address

    settings = load_settings()
    sqlite = settings.database_url is None
    if sqlite and not (settings.data_dir / "loranode.db").is_file():
        raise ConfigError(f"no node database in {settings.data_dir.resolve()}: pass --node-url URL to read the "
                          "epoch from the node's API, or set LORANODE_DATA_DIR (or LORANODE_DATABASE_URL) to the "
                          "node's", data_dir=str(settings.data_dir))
    if node is None:
        node = operator_address(settings)
    with session_factory(make_engine(settings.resolved_database_url()))() as session:
        row = published_epoch(session, node, epoch_id)
        if row is None:
            raise BadRequest(f"no published epoch {epoch_id or 'yet'} for node {node}", node=node)
        return epoch_document(row)
