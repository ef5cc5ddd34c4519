"""The CLI's console: its own output (stdout), and its one printer for errors (stderr).

Every error a command ends with is printed here, as one line and sometimes a hint:

    error (adapter_not_found, 404 from the node): adapter 42 is not registered [model=42]
    hint: GET http://127.0.0.1:8000/v1/models lists the adapters it serves

Codes and messages are shown as they were raised or as the node sent them, never read as Rich
markup (`[key=value]` would be taken for a style tag and dropped). Exit codes: 2 when the command
cannot be done as given (a wrong argument, file, key, address or URL, or a refusal the user acts
on), 1 when it failed (the node or the chain is busy or broke, or a bug: `--debug` shows its
traceback).
"""

from __future__ import annotations

import traceback
from dataclasses import dataclass, field
from typing import Any

from rich.console import Console
from rich.text import Text

from node.errors import NodeError, NodeRefusal, NodeUnreachable, RpcTransient

console = Console(soft_wrap=True)
err_console = Console(stderr=True, soft_wrap=True)

USAGE, FAILURE = 2, 1
TRANSIENT = frozenset({408, 425, 429, 502, 503, 504})
NODE_URL_HINT = ("check --node-url (or LORANODE_NODE_URL): `loranode dev` prints its API's URL and the line "
                 "that exports it")
RPC_HINT = "check --rpc-url (or LORANODE_RPC_URL): `loranode dev` prints its anvil's URL"
# What to do next, by the node's error code (then by status): {url} is the node's.
REFUSAL_HINTS = {
    "adapter_not_found": "GET {url}/v1/models lists the adapters it serves",
    "insufficient_escrow": "deposit for this node: `loranode escrow deposit AMOUNT --node NODE_ADDRESS` "
                           "(GET {url}/v1/node names its address)",
    "deposit_not_final": "wait for the block it names (the deposit's finality), then send it again",
    "voucher_conflict": "use another --lane, or wait for the request in flight on this one",
    "voucher_expires_too_soon": "check this machine's clock: the voucher's deadline is set from it",
    "prompt_too_long": "shorten the prompt (GET {url}/v1/node gives maxModelLen)",
    "mirror_unavailable": "the node's chain mirror is not usable yet; GET {url}/ready says why",
}
STATUS_HINTS = {
    400: "the request was malformed; the message names the field",
    422: "the node could not use what the request names (the message says what)",
}
CATEGORIES = {400: "the request", 401: "the payment", 402: "the payment", 403: "the read", 404: "the request",
              409: "the payment", 413: "the request", 422: "the request"}


@dataclass(frozen=True)
class Failure:
    """What the printer shows for an error, and the exit code it ends with."""

    code: str
    message: str
    facts: dict[str, Any] = field(default_factory=dict)
    hint: str | None = None
    exit_code: int = USAGE
    source: str = ""  # e.g. "the node refused the request: 404"


def print_failure(failure: Failure) -> None:
    label = failure.code + (f"; {failure.source}" if failure.source else "")
    line = Text("error", style="bold red")
    line.append(f" ({label}): {failure.message}")
    if failure.facts:
        line.append(" [" + ", ".join(f"{k}={v}" for k, v in failure.facts.items()) + "]")
    err_console.print(line, highlight=False)
    if failure.hint:
        hint = Text("hint", style="bold")
        hint.append(f": {failure.hint}")
        err_console.print(hint, highlight=False)


def print_traceback(exc: BaseException) -> None:
    err_console.print(Text("".join(traceback.format_exception(exc)).rstrip()), highlight=False)


def describe(exc: BaseException) -> Failure:
    """The Failure to print for `exc`: a refusal from a node by its status, a typed error with its
    facts, a missing file or an unreachable service with what to check; anything else is a bug."""
    if isinstance(exc, NodeRefusal):
        return _refusal(exc)
    if isinstance(exc, NodeUnreachable):
        return Failure(exc.code, exc.message, exc.facts, NODE_URL_HINT)
    if isinstance(exc, RpcTransient):
        return Failure(exc.code, exc.message, exc.facts, "the chain's RPC did not answer in time: try again",
                       FAILURE)
    if isinstance(exc, NodeError):
        return Failure(exc.code, exc.message, dict(exc.facts))
    return _other(exc)


def _refusal(exc: NodeRefusal) -> Failure:
    status, hint = exc.http_status, None
    what: str
    if status in TRANSIENT:
        what, hint, code = "the node is busy or unavailable", "retry in a few seconds", FAILURE
    elif status >= 500:
        what, hint, code = "the node failed", "the node's operator can see why in its log", FAILURE
    else:
        what, code = f"the node refused {CATEGORIES.get(status, 'the request')}", USAGE
        hint = STATUS_HINTS.get(status)
    hint = REFUSAL_HINTS.get(exc.node_code, hint)
    return Failure(exc.node_code, exc.message, dict(exc.facts), hint and hint.format(url=exc.url), code,
                   f"{what}: {status}")


def _other(exc: BaseException) -> Failure:
    """Errors that are not ours: a file the user named, a database or chain URL, or a bug."""
    import httpx
    from requests.exceptions import ConnectionError as RequestsConnectionError
    from sqlalchemy.exc import OperationalError

    if isinstance(exc, OSError) and exc.filename is not None:
        what = {FileNotFoundError: "no such file or folder", IsADirectoryError: "a folder, not a file",
                NotADirectoryError: "not a folder", PermissionError: "permission denied",
                FileExistsError: "already exists (a file where a folder is needed?)"}.get(type(exc), exc.strerror)
        return Failure("file_error", f"{what}: {exc.filename}")
    if isinstance(exc, OperationalError):  # database down or URL wrong (the URL is never printed: passwords)
        reason = str(exc.orig).splitlines()[0] if exc.orig else type(exc).__name__
        return Failure("database_unavailable", f"cannot use the database: {reason}",
                       hint="check LORANODE_DATABASE_URL, or LORANODE_DATA_DIR for the embedded SQLite")
    if isinstance(exc, httpx.TransportError):
        where = exc.request.url if exc._request is not None else "the URL given"
        return Failure("unreachable", f"no answer from {where}: {type(exc).__name__}: {exc}",
                       hint="check the URL (`loranode dev` prints its API's and its anvil's)")
    if isinstance(exc, RequestsConnectionError):
        return Failure("rpc_unreachable", f"the chain's JSON-RPC does not answer: {str(exc)[:200]}", hint=RPC_HINT)
    return Failure("internal_error", f"{type(exc).__name__}: {exc}",
                   hint="this is a bug in loranode; run again with --debug for the traceback", exit_code=FAILURE)
