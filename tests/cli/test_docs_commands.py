"""Every `loranode` command README.md and docs/ tell a user to run exists, with every option they give it:
a renamed command or option fails here, not in a newcomer's terminal."""

from __future__ import annotations

import re
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import typer

from node.cli import app

ROOT = Path(__file__).resolve().parents[2]
PAGES = [ROOT / "README.md", *sorted((ROOT / "docs").glob("*.md"))]
# a command as written: `loranode` and its words, up to the end of the span or a shell operator
COMMAND = re.compile(r"(?:^|[\s$(`])loranode((?:[ \t]+[^\s`|;&)<>]+(?:\|[a-z-]+)*)+)")
NOT_COMMANDS = ("-U loranode", "USER loranode", "loranode demo token")  # PostgreSQL's role, an EIP-712 name


def _spans(text: str) -> Iterator[str]:
    """The lines of code blocks and the inline code of the prose."""
    for block in re.findall(r"```[a-z]*\n(.*?)```", text, re.S):
        yield from block.splitlines()
    yield from re.findall(r"(?<!`)`([^`\n]+)`(?!`)", re.sub(r"```.*?```", "", text, flags=re.S))


def _resolve(root: Any, words: list[str]) -> tuple[Any, list[str], list[str]]:
    """The command the words name (`a|b` names either; each must exist), its path, and the words left."""
    command, path = root, ["loranode"]
    while words and hasattr(command, "commands") and not words[0].startswith("-"):
        names = words[0].split("|")
        if not all(name in command.commands for name in names):
            break
        command, path, words = command.commands[names[0]], [*path, words[0]], words[1:]
    return command, path, words


def _mistakes(root: Any, pages: list[Path]) -> list[str]:
    found = []
    global_options = {opt for param in root.params for opt in param.opts}
    for page in pages:
        for span in _spans(page.read_text()):
            if any(part in span for part in NOT_COMMANDS):
                continue
            for match in COMMAND.finditer(span):
                command, path, rest = _resolve(root, match.group(1).split())
                where = f"{page.name}: `{span.strip()}`"
                if hasattr(command, "commands") and rest and not rest[0].startswith("-"):
                    found.append(f"{where}: no command `{' '.join(path)} {rest[0]}`")
                    continue
                options = {o for p in command.params for o in (*p.opts, *p.secondary_opts)} | global_options
                found += [f"{where}: `{' '.join(path)}` has no option {word.split('=')[0]}" for word in rest
                          if word.startswith("--") and word.split("=")[0] not in options | {"--help"}]
    return found


def test_every_command_the_docs_name_exists_with_the_options_they_give_it() -> None:
    root = typer.main.get_command(app)
    assert len(list(_spans((ROOT / "README.md").read_text()))) > 50  # the spans are read at all
    mistakes = _mistakes(root, PAGES)
    assert not mistakes, "\n".join(mistakes)


def test_a_renamed_command_or_option_in_a_page_is_named(tmp_path: Path) -> None:
    page = tmp_path / "page.md"
    page.write_text("Run `loranode epoch show 1 --wait 120 --no-such-option` or\n```bash\n"
                    "loranode adapter pin|unpin 1\nloranode adapter retrain 1 --steps 4\n```\n")
    mistakes = _mistakes(typer.main.get_command(app), [page])
    assert len(mistakes) == 2, mistakes
    assert "`loranode epoch show` has no option --no-such-option" in mistakes[1]
    assert "no command `loranode adapter retrain`" in mistakes[0]
