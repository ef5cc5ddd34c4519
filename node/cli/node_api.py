"""What the watching commands (`epoch`, `earnings`, `status`) share: the node's HTTP API, read from
any machine, and a plain table for their output."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import httpx
import typer

from node.cli.console import console
from node.errors import NodeError, Unavailable

DEFAULT_NODE_URL = "http://127.0.0.1:8000"
NodeUrlOption = typer.Option(DEFAULT_NODE_URL, "--node-url", help="The node's API (`loranode dev` prints it).")
NodeAddressOption = typer.Option(None, "--node", help="The node's operator address (default: the one at --node-url).")
JsonOption = typer.Option(False, "--json", help="Print the node's JSON answer instead of a table.")


class NodeAnswered(NodeError):
    """The node answered with an error: its message verbatim, its code and HTTP status as facts."""

    code = "node_refused"


def get_json(node_url: str, path: str, params: dict[str, Any] | None = None) -> Any:
    """GET `path` from the node's API; an error answer raises NodeAnswered with the node's words."""
    url = node_url.rstrip("/") + path
    try:
        resp = httpx.get(url, params=params, timeout=30)
    except httpx.HTTPError as exc:
        raise Unavailable(f"no node answers at {node_url}", reason=str(exc) or type(exc).__name__) from exc
    try:
        body = resp.json()
    except ValueError:
        body = None
    if resp.status_code != 200:
        error = body.get("error", {}) if isinstance(body, dict) else {}
        raise NodeAnswered(str(error.get("message", resp.text[:200])), node_code=error.get("code"),
                           status=resp.status_code, url=url)
    return body


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
