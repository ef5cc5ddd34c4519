"""The Solidity suite (unit, fuzz and invariant tests in contracts/test) run by forge, as part of pytest."""

from __future__ import annotations

import re
import subprocess

import pytest

from node.toolchain import REPO_ROOT, forge_binary

pytestmark = [pytest.mark.chain, pytest.mark.slow]


def test_forge_suite_passes() -> None:
    done = subprocess.run([str(forge_binary()), "test", "--no-match-contract", "GasTest"], cwd=REPO_ROOT,
                          capture_output=True, text=True, timeout=600, check=False)
    out = done.stdout + done.stderr
    summary = [line for line in out.splitlines()
               if re.search(r"(Suite result|FAIL|Ran \d+ test suites|Error)", line)]
    print("\n".join(summary))
    assert done.returncode == 0, "\n".join(summary) or out[-4000:]
    assert re.search(r"Ran \d+ test suites .*: \d+ tests passed, 0 failed", out), out[-4000:]


def test_forge_gas_suite_passes_in_isolation() -> None:
    """Gas is measured with every call its own transaction, as on chain (see docs/contracts.md)."""
    done = subprocess.run([str(forge_binary()), "test", "--match-contract", "GasTest", "--isolate", "-vv"],
                          cwd=REPO_ROOT, capture_output=True, text=True, timeout=600, check=False)
    out = done.stdout + done.stderr
    print("\n".join(line for line in out.splitlines() if "gas " in line or "Suite result" in line))
    assert done.returncode == 0, out[-4000:]
