"""`loranode earnings ADDRESS`: what a contributor, an adapter owner (or the node, or the treasury)
earned from a node, per source and per epoch, claimed and not; read from the node's API, one page of
epochs at a time (`--before` the epoch the previous page names)."""

from __future__ import annotations

import json
import re
from typing import Any

import typer

from node.cli.context import address as checked_address
from node.cli.node_api import JsonOption, NodeAddressOption, NodeUrlOption, get_json, node_address, plain, print_table

ADDRESS = re.compile(r"^0x[0-9a-fA-F]{40}$")


def earnings(address: str = typer.Argument(..., callback=checked_address,
                                          help="The payee: a dataset's payout address, an adapter owner..."),
             node_url: str = NodeUrlOption, node: str = NodeAddressOption, as_json: bool = JsonOption,
             before: int | None = typer.Option(None, "--before", min=0,
                                               help="Show the epochs before this one (the next page).")) -> None:
    """What ADDRESS earned from the node's settled epochs, and what it can claim now.

    In total, then per source (dataset, adapter owner share) and per epoch among the node's 50 newest
    settled epochs (or those before --before), and how much is claimed, claimable now, or still locked."""
    node = node_address(node_url, node)
    doc = get_json(node_url, f"/v1/earnings/{node}/{address}" + ("" if before is None else f"?before={before}"))
    if as_json:
        plain(json.dumps(doc, indent=2))
        return
    _print(doc)


def _print(doc: dict[str, Any]) -> None:
    plain(f"{doc['account']} from node {doc['node']} (amounts in token base units)")
    plain(f"earned {doc['earned']}; claimed {doc['claimed']}; not claimed {doc['unclaimed']} "
          f"(claimable now {doc['claimableNow']})")
    if doc.get("forgottenEpochs"):
        plain(f"epochs {', '.join(map(str, doc['forgottenEpochs']))} were forgotten by a guardian's amend: "
              "the operator must adopt the corrected tree (`loranode settle adopt`) before they show again")
    if not doc["epochs"]:
        plain("nothing earned in a settled epoch yet" if doc.get("next") is None else "nothing earned in these epochs")
        _print_next(doc)
        return
    plain("by source:" if doc.get("next") is None else "by source, in these epochs:")
    print_table(("source", "earned"), [(s["source"], s["amount"]) for s in doc["bySource"]])
    plain("by epoch:")
    rows = []
    for e in doc["epochs"]:
        sources = "; ".join(f"{s['source']} {s['amount']}" for s in e["sources"] or [])
        rows.append((e["epochId"], e["state"], e["earned"], e["claimed"], e["status"], sources or "-"))
    print_table(("epoch", "state", "earned", "claimed", "status", "sources"), rows)
    _print_next(doc)


def _print_next(doc: dict[str, Any]) -> None:
    if doc.get("next") is not None:
        plain(f"earlier epochs: loranode earnings {doc['account']} --before {doc['next']}")
