"""`loranode dev`: a whole node on this machine; `--demo` runs the scripted loop and exits."""

from __future__ import annotations

import shutil
import tempfile
import threading
from pathlib import Path

import typer

from node.cli.console import console


def dev(demo: bool = typer.Option(False, "--demo", help="Run the scripted demo end to end, then exit."),
        data_dir: Path = typer.Option(None, "--data-dir", help="Where to keep state (default: a fresh temp folder).")
        ) -> None:
    """Start anvil, deploy, index, and serve a tiny model locally (Ctrl-C stops everything)."""
    from node.devkit.demo import run_demo

    folder = data_dir or Path(tempfile.mkdtemp(prefix="loranode-dev-"))
    try:
        if demo:
            if not run_demo(folder, lambda line: console.print(f"[bold green]>[/] {line}")):
                raise typer.Exit(1)
            return
        _serve_forever(folder)
    finally:
        if data_dir is None:
            shutil.rmtree(folder, ignore_errors=True)


def _serve_forever(folder: Path) -> None:
    from node.devkit import make_tiny_model
    from node.devkit.local_node import LocalNode

    node = LocalNode.start_chain(folder)
    try:
        model = make_tiny_model(folder / "base-model")
        url = node.serve(model)
        console.print(f"anvil {node.anvil.rpc_url}; API {url}; deployment {node.settings.deployment_file}")
        console.print("dev accounts: loranode ... --dev-account N (N = 3.. are free for you); Ctrl-C stops")
        threading.Event().wait()
    except KeyboardInterrupt:
        pass
    finally:
        node.stop()
