"""`loranode dev` serves where `loranode request` looks: on the default URL when its port is free, and
in every case on the URL of the `export LORANODE_NODE_URL=...` line it prints; that line sets every
variable README's second shell uses, as `.loranode/dev.env` does."""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from node.cli.context import DEFAULT_NODE_URL

pytestmark = [pytest.mark.chain, pytest.mark.slow]
START_TIMEOUT_S = 240


def _port_is_free(port: int) -> bool:
    with socket.socket() as s:
        try:
            s.bind(("127.0.0.1", port))
        except OSError:
            return False
    return True


@pytest.fixture(scope="module")
def dev_exports(tmp_path_factory: pytest.TempPathFactory) -> Iterator[tuple[dict[str, str], bool]]:
    """The variables `loranode dev`'s export line sets, and whether the default port was free."""
    default_free = _port_is_free(int(DEFAULT_NODE_URL.rsplit(":", 1)[1]))
    folder = tmp_path_factory.mktemp("dev")
    proc = subprocess.Popen([sys.executable, "-m", "node", "dev", "--data-dir", str(folder)],
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    try:
        yield _read_exports(proc), default_free
    finally:
        proc.send_signal(signal.SIGTERM)
        try:
            proc.wait(timeout=60)
        except subprocess.TimeoutExpired:
            proc.kill()


def _read_exports(proc: subprocess.Popen[str]) -> dict[str, str]:
    assert proc.stdout is not None
    deadline, seen = time.monotonic() + START_TIMEOUT_S, []
    for line in proc.stdout:
        seen.append(line)
        if line.startswith("export "):
            return dict(pair.split("=", 1) for pair in line.split()[1:])
        assert time.monotonic() < deadline, "".join(seen)
    raise AssertionError("loranode dev ended before printing its URL:\n" + "".join(seen))


def test_dev_serves_on_the_url_request_uses_by_default(dev_exports: tuple[dict[str, str], bool]) -> None:
    exports, default_free = dev_exports
    if default_free:
        assert exports["LORANODE_NODE_URL"] == DEFAULT_NODE_URL
    assert exports["LORANODE_NODE_URL"].startswith("http://127.0.0.1:")


def test_the_export_line_sets_what_the_readme_lines_use(dev_exports: tuple[dict[str, str], bool]) -> None:
    exports = dev_exports[0]
    assert set(exports) == {"LORANODE_RPC_URL", "LORANODE_DEPLOYMENT_FILE", "LORANODE_NODE_URL", "NODE_URL", "NODE",
                            "BASE_MODEL"}
    assert exports["NODE_URL"] == exports["LORANODE_NODE_URL"]
    assert exports["NODE"].startswith("0x") and len(exports["NODE"]) == 42
    assert (Path(exports["BASE_MODEL"]) / "config.json").is_file()
    assert Path(exports["LORANODE_DEPLOYMENT_FILE"]).is_file()


def test_request_finds_dev_through_its_export_line(dev_exports: tuple[dict[str, str], bool], tmp_path: Path) -> None:
    """An unfunded dev account, pasting dev's export line: the node is found and says why it refuses."""
    env = {**os.environ, **dev_exports[0]}
    out = subprocess.run([sys.executable, "-m", "node", "request", "the sea", "--adapter", "1", "--dev-account", "9"],
                         env=env, capture_output=True, text=True, timeout=300, check=False, cwd=tmp_path)
    assert out.returncode == 2, out.stdout + out.stderr
    assert "the node refused the" in out.stderr and "Traceback" not in out.stderr
    assert "no node answers" not in out.stderr
