"""`loranode dev`: a whole node on this machine; `--demo` runs the scripted loop and exits."""

from __future__ import annotations

import shlex
import shutil
import signal
import socket
import tempfile
import threading
from pathlib import Path
from typing import TYPE_CHECKING

import typer
from rich.markup import escape

from node.cli.console import console
from node.cli.context import DEFAULT_NODE_URL, NODE_URL_ENV

DEFAULT_PORT = int(DEFAULT_NODE_URL.rsplit(":", 1)[1])

if TYPE_CHECKING:
    from node.devkit.local_node import LocalNode

ENV_FILE = Path(".loranode") / "dev.env"
DEV_BEAT_S = 1.0  # the settlement beat on the dev node: epochs settle seconds after they close
AGENT_ACCOUNT = 8  # the dev account `loranode dev` funds for an x402 agent (docs/x402.md, "By hand")
AGENT_TOKENS = 100


def dev(demo: bool = typer.Option(False, "--demo", help="Run the scripted demo end to end, then exit."),
        data_dir: Path = typer.Option(None, "--data-dir", help="Where to keep state (default: a fresh temp folder)."),
        port: int = typer.Option(DEFAULT_PORT, "--port", min=0, max=65_535,
                                 help=f"The API's port on 127.0.0.1, the one `loranode request` asks by default "
                                      f"(taken: a free one; the URL is printed with an `export {NODE_URL_ENV}=` "
                                      "line)."),
        epoch_max_age_s: float = typer.Option(60.0, "--epoch-max-age", min=0,
                                              help="Close an epoch once its oldest receipt is this many seconds old.")
        ) -> None:
    """Start anvil, deploy, index and serve a tiny model locally (Ctrl-C stops it all)."""
    from node.devkit.demo import run_demo

    folder = data_dir or Path(tempfile.mkdtemp(prefix="loranode-dev-"))
    try:
        if demo:
            if not run_demo(folder, lambda line: console.print(f"[bold green]>[/] {line}")):
                raise typer.Exit(1)
            return
        _serve_forever(folder, port, epoch_max_age_s)
    finally:
        if data_dir is None:
            shutil.rmtree(folder, ignore_errors=True)


def _port_or_free(port: int) -> int:
    """`port` if nothing listens on it yet, else a free one."""
    with socket.socket() as s:
        try:
            s.bind(("127.0.0.1", port))
        except OSError:
            return 0
    return port


def _serve_forever(folder: Path, port: int, epoch_max_age_s: float) -> None:
    from node.devkit import make_tiny_model
    from node.devkit.local_node import OPERATOR, LocalNode

    def stop(*_: object) -> None:
        raise KeyboardInterrupt  # SIGTERM stops everything as Ctrl-C does

    signal.signal(signal.SIGTERM, stop)
    node = LocalNode.start_chain(folder, x402=True)  # the channel contracts and the node's router, as `make demo`
    try:
        operator = node.contracts(OPERATOR)  # its nonces, before the worker signs with the same key
        agent = node.contracts(AGENT_ACCOUNT).client.address
        operator.token.mint(agent, AGENT_TOKENS * 10 ** int(operator.token._call("decimals")))
        model = make_tiny_model(folder / "base-model")
        url = node.serve(model, **({"port": chosen} if (chosen := _port_or_free(port)) else {}))
        fault = node.services.catalog.binding_fault if node.services else None
        if fault:  # an old --data-dir: its mirror is of the anvil that ran last time
            console.print(f"[bold red]paid work is refused[/]: {escape(fault)}")
        node.start_settlement(folder / "logs", epoch_max_age_s=epoch_max_age_s, settlement_interval_s=DEV_BEAT_S)
        address = operator.client.address
        values = dev_env(node, url, model, address)
        env = write_env_file(values)
        console.print(f"anvil {node.anvil.rpc_url}; API {url}; node {address}; "
                      f"settlement worker and beat logs in {folder / 'logs'}")
        console.print(f"in another shell: `. {env}`, or paste the line below (it sets "
                      f"{', '.join(values)})", markup=False)
        # the same variables as the file: README's lines use $NODE and $BASE_MODEL too
        console.print("export " + " ".join(f"{k}={shlex.quote(v)}" for k, v in values.items()), markup=False,
                      soft_wrap=True)
        dep = node.deployment
        console.print(f"x402: batch-settlement on eip155:{dep.chain_id}, token {dep.token}, channels "
                      f"{dep.x402_channels}, router {dep.x402_router} (an unpaid request's 402 lists the terms); "
                      f"an agent may pay as dev account {AGENT_ACCOUNT} ({agent}, {AGENT_TOKENS} tokens, key "
                      f"{node.anvil.keys[AGENT_ACCOUNT]}) or fund its own address with `loranode chain fund "
                      "ADDRESS` (docs/x402.md, \"By hand\")", markup=False, soft_wrap=True)
        console.print(f"base model {model}: register datasets and adapters with --dev-account N (N >= 3), "
                      "deposit with `loranode escrow deposit ... --mint`, then `loranode request`. Ctrl-C stops.",
                      markup=False)
        threading.Event().wait()
    except KeyboardInterrupt:
        pass
    finally:
        node.stop()
        ENV_FILE.unlink(missing_ok=True)


def dev_env(node: LocalNode, url: str, model: Path, address: str) -> dict[str, str]:
    """The shell variables another shell needs to use this dev node."""
    return {"LORANODE_RPC_URL": node.anvil.rpc_url, "LORANODE_DEPLOYMENT_FILE": str(node.settings.deployment_file),
            NODE_URL_ENV: url, "NODE_URL": url, "NODE": address, "BASE_MODEL": str(model)}


def write_env_file(values: dict[str, str]) -> Path:
    """`values` as shell exports, in .loranode/dev.env."""
    ENV_FILE.parent.mkdir(parents=True, exist_ok=True)
    ENV_FILE.write_text("# written by `loranode dev`; removed when it stops\n"
                        + "".join(f"export {k}={shlex.quote(v)}\n" for k, v in values.items()))
    return ENV_FILE
