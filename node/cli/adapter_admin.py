"""`loranode adapter pin|unpin|preload|evict MODEL`: an adapter's residency on a running node, through
its admin port (node/api/admin.py), with the admin token from a file."""

from __future__ import annotations

from pathlib import Path

import httpx
import typer

from node.cli.node_api import plain
from node.client.refusal import check, reaching
from node.config import read_secret
from node.errors import NodeRefusal

AdminUrlOption = typer.Option("http://127.0.0.1:8001", "--admin-url", envvar="LORANODE_ADMIN_URL",
                              help="The node's admin port (loopback by default).")
TokenFileOption = typer.Option(..., "--token-file", envvar="LORANODE_ADMIN_TOKEN_FILE",
                               help="The file holding the node's admin token.")
ModelArgument = typer.Argument(..., help="The adapter as clients call it (its registry id).")


def _act(action: str, model: str, admin_url: str, token_file: Path) -> None:
    token = read_secret(token_file, "token_file")
    url = f"{admin_url.rstrip('/')}/admin/adapters/{model}/{action}"
    with reaching(admin_url):
        try:
            check(httpx.post(url, headers={"Authorization": f"Bearer {token}"}, timeout=150), admin_url)
        except NodeRefusal as exc:
            # the admin port serves no /v1/models: the adapter hint names the public API's route instead
            exc.url = "<the node's API>" if exc.node_code == "adapter_not_found" else exc.url
            raise
    plain(f"adapter {model}: {action} done")


def pin(model: str = ModelArgument, admin_url: str = AdminUrlOption, token_file: Path = TokenFileOption) -> None:
    """Keep an adapter loaded (device slot, host memory, disk) whatever the traffic."""
    _act("pin", model, admin_url, token_file)


def unpin(model: str = ModelArgument, admin_url: str = AdminUrlOption, token_file: Path = TokenFileOption) -> None:
    """Let a pinned adapter be evicted again when others need the room."""
    _act("unpin", model, admin_url, token_file)


def preload(model: str = ModelArgument, admin_url: str = AdminUrlOption, token_file: Path = TokenFileOption) -> None:
    """Load an adapter onto the device now, so its next request does not wait."""
    _act("preload", model, admin_url, token_file)


def evict(model: str = ModelArgument, admin_url: str = AdminUrlOption, token_file: Path = TokenFileOption) -> None:
    """Take an idle adapter out of its device slot (and unpin it)."""
    _act("evict", model, admin_url, token_file)
