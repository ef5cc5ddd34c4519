"""A node's error answers as a client sees them: its status, code and message as it sent them."""

from __future__ import annotations

import json
from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any

import httpx

from node.errors import NodeRefusal, NodeUnreachable


def refusal(status: int, body: str, url: str) -> NodeRefusal:
    """The NodeRefusal for an error answer: the OpenAI-style `{"error": {...}}` body the node sends
    (its `details` become the facts), or the status and the start of any other body."""
    try:
        error = json.loads(body)["error"]
        code, message = str(error.get("code") or error.get("type") or "error"), str(error["message"])
    except (ValueError, KeyError, TypeError, AttributeError):
        return NodeRefusal(status, "http_error", f"HTTP {status}: {body[:300]}".rstrip(": "), url)
    details: dict[str, Any] = dict(error.get("details") or {})
    facts = {k: v for k, v in details.items() if k not in ("code", "message")}
    if error.get("param") and "param" not in facts:
        facts["param"] = error["param"]
    return NodeRefusal(status, code, message, url, **facts)


def check(resp: httpx.Response, url: str) -> httpx.Response:
    """`resp` if it is a success, else its NodeRefusal."""
    if resp.status_code >= 400:
        raise refusal(resp.status_code, resp.text, url)
    return resp


@contextmanager
def reaching(url: str) -> Iterator[None]:
    """Turns a transport failure (refused, reset, timed out, not HTTP) into NodeUnreachable(url)."""
    try:
        yield
    except httpx.TransportError as exc:
        raise NodeUnreachable(url, f"{type(exc).__name__}: {exc}") from exc
