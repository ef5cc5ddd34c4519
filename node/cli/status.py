"""`loranode status`: what a node serves, its adapter tiers, readiness and pending receipts."""

from __future__ import annotations

from typing import Any

import httpx

from node.cli.node_api import NodeUrlOption, get_json, plain, print_table

# what `status` prints from /metrics (docs/metrics.md); every name here is one the node emits
STATUS_METRICS = ("loranode_adapter_tier_", "loranode_receipts_total", "loranode_settlement_pending_receipts",
                  "loranode_settlement_epoch_lag", "loranode_in_flight_requests", "loranode_engine_num_waiting")


def status(node_url: str = NodeUrlOption) -> None:
    """What a running node serves and how it is doing, from its API.

    Each registered adapter's real state (serving, not final yet, deprecated, or cannot load and why),
    the node's readiness and its backlog."""
    info = get_json(node_url, "/v1/node")
    ready = _ready(node_url)
    adapters = get_json(node_url, "/v1/adapters")["data"]
    metrics = _metrics(node_url)
    plain(f"node {info['node']} on chain {info['chainId']}, base model {info['baseModel']}")
    reason = f"; {ready['reason']}" if ready.get("reason") else ""
    plain(f"ready: {ready['ready']}{reason} (database {ready.get('database')}, mirror {ready.get('mirror')}, "
          f"mirror block {ready.get('mirrorBlock')})")
    serving = [a for a in adapters if a["state"] == "serving"]
    plain(f"serving {len(serving)} of {len(adapters)} registered adapter(s)")
    if adapters:
        print_table(("adapter", "state", "detail"), [(a["id"], a["state"], a["detail"]) for a in adapters])
    for line in metrics.splitlines():
        if line.startswith(STATUS_METRICS):
            plain("  " + line)


def _ready(node_url: str) -> dict[str, Any]:
    """/ready's checks: its 503 (not ready) carries the same body, saying which check failed."""
    try:
        resp = httpx.get(f"{node_url.rstrip('/')}/ready", timeout=10)
        body: dict[str, Any] = resp.json()
        return body
    except (httpx.HTTPError, ValueError):
        return {"ready": False, "reason": "/ready did not answer"}


def _metrics(node_url: str) -> str:
    try:
        return httpx.get(f"{node_url.rstrip('/')}/metrics", timeout=10).text
    except httpx.HTTPError:
        return ""  # the figures are extras: the node's state above is what status is for
