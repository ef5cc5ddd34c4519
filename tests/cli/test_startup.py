"""`loranode` starts without the libraries only some commands use: `--help` and each group's help load
no torch, transformers, peft, web3 or eth_account (they took 2.5 of its 3 s of imports on a quiet
machine, 4.7 s on a busy one); a command imports them when it runs."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
HEAVY = ("torch", "transformers", "peft", "web3", "eth_account", "eth_abi", "coincurve", "sqlalchemy")
PROBE = """
import json, sys
from node.cli import app
try:
    app(sys.argv[1:], prog_name="loranode")
except SystemExit:
    pass
print(json.dumps([m for m in {heavy!r} if m in sys.modules]), file=sys.stderr)
"""


def _loaded_by(*args: str) -> list[str]:
    """The heavy modules a fresh `loranode ARGS` process has imported by the time it ends."""
    done = subprocess.run([sys.executable, "-c", PROBE.format(heavy=HEAVY), *args], cwd=ROOT, capture_output=True,
                          text=True, timeout=120)
    assert "Usage: loranode" in done.stdout, done.stdout + done.stderr
    loaded: list[str] = json.loads(done.stderr.strip().splitlines()[-1])
    return loaded


@pytest.mark.parametrize("args", [("--help",), ("adapter", "--help"), ("adapter", "train", "--help"),
                                  ("chain", "--help"), ("escrow", "--help"), ("attribution", "--help")])
def test_help_imports_none_of_the_heavy_libraries(args: tuple[str, ...]) -> None:
    assert _loaded_by(*args) == []
