from __future__ import annotations

import pytest
from typer.testing import CliRunner

from node.cli import app

runner = CliRunner()


def test_help_lists_the_commands() -> None:
    result = runner.invoke(app, ["--help"])
    assert result.exit_code == 0
    assert "config" in result.output and "version" in result.output


def test_config_show_hides_keys(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("LORANODE_OPERATOR_KEY", "0x" + "22" * 32)
    result = runner.invoke(app, ["config", "show"])
    assert result.exit_code == 0, result.output
    assert "22" * 32 not in result.output
    assert "operator_key = ********" in result.output


def test_bad_configuration_is_one_clear_error(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("LORANODE_MAX_NUM_SEQS", "zero")
    result = runner.invoke(app, ["config", "show"])
    assert result.exit_code == 2
    assert "invalid configuration: max_num_seqs" in result.output
