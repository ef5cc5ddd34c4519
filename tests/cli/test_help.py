"""Every option and argument of every command says what it is for in `--help`."""

from __future__ import annotations

from typing import Any

import typer

from node.cli import app


def _commands(command: Any, path: str = "loranode") -> list[tuple[str, Any]]:
    """Every command under `command` (a group's `commands`), with its path."""
    found = [(path, command)]
    for name, sub in getattr(command, "commands", {}).items():
        found += _commands(sub, f"{path} {name}")
    return found


def test_every_option_of_every_command_has_help() -> None:
    root = typer.main.get_command(app)
    assert len(_commands(root)) > 30  # the walk reaches every group's commands
    missing = [f"{path} {param.opts[0]}" for path, command in _commands(root) for param in command.params
               if not getattr(param, "hidden", False) and param.opts[0] != "--help"
               and not (getattr(param, "help", None) or "").strip()]
    assert not missing, "options without help: " + ", ".join(missing)


def test_every_command_has_help() -> None:
    root = typer.main.get_command(app)
    assert not [path for path, command in _commands(root) if not (command.help or command.short_help or "").strip()]


def test_every_command_says_what_it_does_in_one_line() -> None:
    # the first paragraph is what `loranode --help` and each group's --help list: one line of at most 80
    # characters (status, earnings, chain deploy, the settle commands and others used to wrap over two or three)
    root = typer.main.get_command(app)
    long = [f"{path}: {summary!r}" for path, command in _commands(root)
            for summary in [(command.help or "").strip().split("\n\n")[0]]
            if "\n" in summary or len(summary) > 80]
    assert not long, "summaries over one line: " + "; ".join(long)
