"""`make demo`, as a test: `loranode dev --demo` runs the whole loop and reconciles to the wei."""

from __future__ import annotations

from pathlib import Path

import pytest
from typer.testing import CliRunner

from node.cli import app
from node.devkit.demo import NEXT
from tests.test_readme_path import readme_blocks

pytestmark = [pytest.mark.chain, pytest.mark.slow]


def test_the_demo_loop_reconciles_to_the_wei(tmp_path: Path) -> None:
    result = CliRunner().invoke(app, ["dev", "--demo", "--data-dir", str(tmp_path)])
    out = result.output
    assert result.exit_code == 0, out
    assert "24 paid requests through the OpenAI client on 2 lanes" in out
    assert "the agent paid 6 requests with the stock x402 SDK (2 streamed)" in out
    assert "deposited through the node; every receipt verified" in out
    assert "epoch 1 settled on chain: 30 receipts" in out  # both payers' receipts in one epoch
    assert "7 payees claimed" in out
    assert "reconciled to the wei" in out and "MISMATCH" not in out
    assert '"receiptsRoot"' in out  # one receipt with its proof


def test_dev_refuses_unknown_options() -> None:
    result = CliRunner().invoke(app, ["dev", "--demo", "--fast"])
    assert result.exit_code == 2 and "No such option" in result.output


def test_the_demo_ends_with_the_readme_lines_that_keep_a_node_running() -> None:
    """A newcomer after `make demo` has no `loranode` on the PATH: the next step it prints is README's
    shell 1, activation included, as written."""
    for line in readme_blocks()["shell 1"]:
        assert f"`{line}`" in NEXT, line
