"""`loranode status`: what a node serves, its adapter tiers, readiness and pending receipts."""

from __future__ import annotations

from typing import Any

import httpx

from node.cli.node_api import NodeUrlOption, get_json, plain, print_table

# what `status` prints from /metrics (docs/metrics.md); every name here is one the node emits
TIER_COLUMNS = ("hits", "misses", "loads", "evictions", "bytes")  # loranode_adapter_tier_<column>[_total]
LOAD_METRICS = {"loranode_receipts": "receipts", "loranode_in_flight_requests": "in flight",
                "loranode_engine_num_waiting": "waiting", "loranode_settlement_pending_receipts": "pending settlement",
                "loranode_settlement_epoch_lag": "epoch lag"}


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
    _print_metrics(metrics)


def _print_metrics(text: str) -> None:
    """The adapter tiers as a table (one row a tier), then the node's load on one line."""
    from prometheus_client.parser import text_string_to_metric_families

    tiers: dict[str, dict[str, int]] = {}
    load: dict[str, int] = {}
    for family in text_string_to_metric_families(text):
        column = family.name.removeprefix("loranode_adapter_tier_")
        for sample in family.samples:
            if column in TIER_COLUMNS and sample.name.removesuffix("_total").endswith(column):
                tiers.setdefault(sample.labels.get("tier", "?"), {})[column] = int(sample.value)
            elif family.name in LOAD_METRICS and not sample.name.endswith("_created"):
                load[LOAD_METRICS[family.name]] = int(sample.value)
    if tiers:
        print_table(("adapter tier", *TIER_COLUMNS), [(tier, *(row.get(c) for c in TIER_COLUMNS))
                                                       for tier, row in tiers.items()])
    if load:
        plain(", ".join(f"{name} {load[name]}" for name in LOAD_METRICS.values() if name in load))


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
