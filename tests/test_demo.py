"""`make demo`'s flow, as a test: the whole loop reconciles to the wei."""

from __future__ import annotations

from pathlib import Path

import pytest

from node.devkit.demo import run_demo

pytestmark = [pytest.mark.chain, pytest.mark.slow]


def test_the_demo_loop_reconciles_to_the_wei(tmp_path: Path) -> None:
    lines: list[str] = []
    assert run_demo(tmp_path, lines.append, num_per_lane=4)
    assert any("8 paid requests" in line for line in lines)
    assert any("epoch 1 settled on chain: 8 receipts" in line for line in lines)
    assert "reconciled to the wei" in lines
    assert any("7 payees claimed" in line for line in lines)
