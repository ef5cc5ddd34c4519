"""What the watching commands (`epoch`, `earnings`, `status`) share: the node's HTTP API, read from
any machine, and a plain table for their output."""

from __future__ import annotations

from collections.abc import Sequence
from datetime import UTC, datetime
from typing import Any

import httpx
import typer

from node.cli.console import console
from node.cli.context import NodeUrlOption, address
from node.client.refusal import check, reaching

__all__ = ["JsonOption", "NodeAddressOption", "NodeUrlOption", "get_json", "node_address", "plain", "print_table",
           "utc_time"]
NodeAddressOption = typer.Option(None, "--node", callback=address,
                                 help="The node's operator address (default: the one at --node-url).")
JsonOption = typer.Option(False, "--json", help="Print the node's JSON answer instead of a table.")


def get_json(node_url: str, path: str, params: dict[str, Any] | None = None) -> Any:
    """GET `path` from the node's API; an error answer raises NodeRefusal with the node's words."""
    url = node_url.rstrip("/") + path
    with reaching(node_url):
        resp = check(httpx.get(url, params=params, timeout=30), node_url)
    return resp.json()


def node_address(node_url: str, node: str | None) -> str:
    """`node`, or the operator address of the node at `node_url`."""
    return node or str(get_json(node_url, "/v1/node")["node"])


def print_table(headers: Sequence[str], rows: Sequence[Sequence[object]]) -> None:
    """Columns padded to their widest cell, numbers right-aligned, as plain text (no markup)."""
    cells = [[("-" if c is None else str(c)) for c in row] for row in rows]
    widths = [max([len(h), *(len(r[i]) for r in cells)]) for i, h in enumerate(headers)]
    numeric = [all(r[i].isdigit() or r[i] == "-" for r in cells) and bool(cells) for i in range(len(headers))]

    def line(values: Sequence[str]) -> str:
        return "  ".join(v.rjust(w) if n else v.ljust(w) for v, w, n in zip(values, widths, numeric, strict=True))

    plain(line(headers).rstrip())
    for row in cells:
        plain(line(row).rstrip())


def plain(text: str) -> None:
    console.print(text, markup=False, highlight=False)


def utc_time(when: str | int | None) -> str:
    """A time as the CLI shows every time: ISO 8601 in UTC to the second, `2026-12-06T09:50:01Z`; `-` for
    none. `when` is an API time (ISO 8601; without an offset it is UTC, as the node stores `*_at`) or
    the chain's unix seconds (0: none)."""
    if not when:
        return "-"
    at = datetime.fromtimestamp(when, UTC) if isinstance(when, int) else datetime.fromisoformat(when)
    return (at if at.tzinfo else at.replace(tzinfo=UTC)).astimezone(UTC).strftime("%Y-%m-%dT%H:%M:%SZ")
