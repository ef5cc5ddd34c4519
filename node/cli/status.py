"""`loranode status`: what a node serves, its adapter tiers, readiness and pending receipts."""

from __future__ import annotations

import httpx
import typer

from node.cli.console import console
from node.errors import Unavailable


def status(node_url: str = typer.Option("http://127.0.0.1:8000", "--node-url", help="The node's API.")) -> None:
    """Ask a running node's API what it serves and how it is doing."""
    try:
        info = httpx.get(f"{node_url}/v1/node", timeout=10).json()
        models = httpx.get(f"{node_url}/v1/models", timeout=10).json()["data"]
        ready = httpx.get(f"{node_url}/ready", timeout=10).json()
        metrics = httpx.get(f"{node_url}/metrics", timeout=10).text
    except httpx.HTTPError as exc:
        raise Unavailable(f"no node answers at {node_url}", reason=str(exc)) from exc
    console.print(f"node {info['node']} on chain {info['chainId']}, base model {info['baseModel']}")
    console.print(f"ready: {ready['ready']} (database {ready.get('database')}, mirror {ready.get('mirror')}, "
                  f"mirror block {ready.get('mirrorBlock')})")
    console.print(f"serving {len(models)} adapter(s): " + ", ".join(m["id"] for m in models))
    for line in metrics.splitlines():
        if line.startswith(("loranode_adapter_tier{", "loranode_receipts_total", "loranode_receipts_pending",
                            "loranode_in_flight")):
            console.print("  " + line)
