"""The image, checked without a container engine: the Dockerfile passes hadolint, its build context is
only what it copies, and the commands the image and docker-compose.yml run (`loranode` and its
services' commands and liveness checks) run here as they would in it. The image itself is built with
buildah and the compose stack's commands run in it by scripts/image_check.sh (this machine reaches no
container registry nor PyTorch's index, so there it builds on a Debian bookworm stand-in for
python:3.11-slim); a full build takes ~15 minutes on 2 cores, too long for the test suite."""

from __future__ import annotations

import os
import subprocess
import sys
import time
import tomllib
from pathlib import Path

import pytest
import yaml
from packaging.requirements import Requirement
from packaging.utils import canonicalize_name

from tests.fixtures.settlement import SettlementWorld

ROOT = Path(__file__).resolve().parent.parent
HADOLINT = Path(sys.executable).parent / "hadolint"


def _loranode(*args: str, env: dict[str, str], timeout: float = 60) -> subprocess.CompletedProcess[str]:
    """`loranode ARGS` (the image's ENTRYPOINT) with only the environment given, as in a container."""
    base = {"PATH": os.environ["PATH"], "PYTHONPATH": str(ROOT), "HOME": os.environ.get("HOME", "/tmp")}
    return subprocess.run([sys.executable, "-m", "node", *args], env={**base, **env}, capture_output=True,
                          text=True, timeout=timeout, cwd=ROOT)


def test_the_dockerfile_passes_hadolint() -> None:
    result = subprocess.run([str(HADOLINT), "Dockerfile"], cwd=ROOT, capture_output=True, text=True, timeout=60)
    assert result.returncode == 0, result.stdout + result.stderr
    bad = ROOT / "build" / "Dockerfile.bad"
    bad.parent.mkdir(exist_ok=True)
    bad.write_text("FROM python\nRUN cd /app && pip install torch\n")
    try:
        caught = subprocess.run([str(HADOLINT), str(bad)], capture_output=True, text=True, timeout=60)
    finally:
        bad.unlink()
    assert caught.returncode != 0 and "DL3006" in caught.stdout  # an untagged base image is caught


def test_the_build_context_is_only_what_the_dockerfile_copies() -> None:
    """An operator's checkout holds ./secrets, ./models, .env and .venv beside the Dockerfile: none of
    them may reach the builder (a build would send keys and a 16 GB model as its context)."""
    rules = [line for line in (ROOT / ".dockerignore").read_text().splitlines() if line and not line.startswith("#")]
    assert rules[0] == "*"  # everything is left out, then what the image needs is let in
    let_in = {rule.removeprefix("!") for rule in rules if rule.startswith("!")}
    copies = [line.split()[1:-1] for line in (ROOT / "Dockerfile").read_text().splitlines() if line.startswith("COPY ")]
    assert let_in == {source.removeprefix("./") for sources in copies for source in sources}


def test_the_image_installs_the_libraries_at_the_versions_the_tests_ran() -> None:
    """constraints.txt pins every library `pip install .` brings in (torch aside: TORCH_SPEC), within
    pyproject's bounds, as installed in this venv (`make setup` installs with it too); the image installs with it."""
    assert "pip install --no-cache-dir -c constraints.txt -e ." in (ROOT / "Dockerfile").read_text()
    pins = dict(line.split("==") for line in (ROOT / "constraints.txt").read_text().splitlines() if "==" in line)
    project = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]
    bounds = [Requirement(text) for text in project["dependencies"] if not text.startswith("torch>")]
    outside = [str(req) for req in bounds
               if canonicalize_name(req.name) not in pins or pins[canonicalize_name(req.name)] not in req.specifier]
    assert not outside, f"constraints.txt has no version these allow: {outside}"
    check = subprocess.run([sys.executable, "scripts/constraints.py", "--check"], cwd=ROOT, capture_output=True,
                           text=True, timeout=60)
    assert check.returncode == 0, check.stderr


def test_the_contracts_are_compiled_into_the_image_before_it_drops_root() -> None:
    """Every process runs as uid 10001, which cannot write /app: `chain deploy` (and anything that reads
    the contracts' ABIs) must find their compiled build in the image (a run of the built image as that
    user failed with `permission denied: /app/build` without it)."""
    lines = [line for line in (ROOT / "Dockerfile").read_text().splitlines() if not line.startswith("#")]
    at = {what: next(i for i, line in enumerate(lines) if line.startswith(what))
          for what in ("COPY contracts", "COPY scripts", "RUN python -c 'from node.chain.artifacts import", "USER ")}
    assert at["COPY contracts"] < at["RUN python -c 'from node.chain.artifacts import"] < at["USER "]
    assert at["COPY scripts"] < at["RUN python -c 'from node.chain.artifacts import"]  # scripts/solc.js compiles


def test_the_images_default_command_runs() -> None:
    dockerfile = (ROOT / "Dockerfile").read_text()
    assert 'ENTRYPOINT ["loranode"]' in dockerfile and 'CMD ["--help"]' in dockerfile
    result = _loranode("--help", env={})
    assert result.returncode == 0 and "health" in result.stdout


def test_migrate_upgrades_a_database_whose_password_comes_from_a_file(tmp_path: Path, postgres_url: str) -> None:
    services = yaml.safe_load((ROOT / "docker-compose.yml").read_text())["services"]
    secret = tmp_path / "postgres_password"
    secret.write_text("not-needed-on-a-trust-login\n")
    env = {"LORANODE_DATABASE_URL": postgres_url, "LORANODE_DATABASE_PASSWORD_FILE": str(secret),
           "LORANODE_DATA_DIR": str(tmp_path)}
    result = _loranode(*services["migrate"]["command"], env=env)
    assert result.returncode == 0 and "latest schema" in result.stdout, result.stderr
    gone = _loranode(*services["migrate"]["command"], env={**env, "LORANODE_DATABASE_PASSWORD_FILE": "/nope"})
    assert gone.returncode != 0 and "database_password_file" in gone.stderr


@pytest.mark.chain
def test_the_indexer_liveness_check_follows_the_indexer(sqlite_world: SettlementWorld, tmp_path: Path) -> None:
    env = {"LORANODE_DATABASE_URL": sqlite_world.db_url, "LORANODE_DATA_DIR": str(tmp_path)}
    sqlite_world.sync()
    fresh = _loranode("health", "indexer", env=env)
    assert fresh.returncode == 0 and "indexer ok" in fresh.stdout, fresh.stderr
    time.sleep(1.1)
    stale = _loranode("health", "indexer", "--max-age-s", "1", env=env)
    assert stale.returncode != 0 and "last reached the chain" in stale.stderr


@pytest.mark.chain
@pytest.mark.slow
def test_the_beat_liveness_check_follows_the_beat(sqlite_world: SettlementWorld, tmp_path: Path) -> None:
    from node.chain.deploy import write_deployment

    path = write_deployment(sqlite_world.deployment, tmp_path / "deployments")
    env = {"LORANODE_DATA_DIR": str(tmp_path), "LORANODE_DATABASE_URL": sqlite_world.db_url,
           "LORANODE_DEPLOYMENT_FILE": str(path), "LORANODE_RPC_URL": sqlite_world.anvil.rpc_url}
    missing = _loranode("health", "beat", env=env)
    assert missing.returncode != 0 and "no beat schedule file" in missing.stderr
    beat = subprocess.Popen([sys.executable, "-m", "node", "beat"], cwd=ROOT, stdout=subprocess.DEVNULL,
                            stderr=subprocess.DEVNULL, env={**os.environ, "PYTHONPATH": str(ROOT), **env})
    try:
        deadline = time.monotonic() + 60
        while not list(tmp_path.glob("celerybeat-schedule*")):
            assert time.monotonic() < deadline and beat.poll() is None, "the beat did not start"
            time.sleep(0.2)
        alive = _loranode("health", "beat", env=env)
        assert alive.returncode == 0 and "beat ok" in alive.stdout, alive.stderr
    finally:
        beat.terminate()
        beat.wait(timeout=30)
    stopped = _loranode("health", "beat", env=env)  # its schedule file is seconds old: the beat is gone
    assert stopped.returncode != 0 and f"(pid {beat.pid}) is not running" in stopped.stderr


WORKER = ("from node.config import load_settings; from node.settlement.celery_app import make_celery; "
          "make_celery(load_settings()).worker_main(['worker', '--pool=solo', '--without-gossip', "
          "'--without-mingle', '--without-heartbeat', '--hostname=settlement@%h'])")


@pytest.mark.slow
def test_the_worker_liveness_check_pings_the_worker_on_its_host(redis_url: str, tmp_path: Path) -> None:
    """The settlement worker's own Celery app and name (`loranode worker` starts it so, after its
    reconcile with the chain); the check pings it over the broker."""
    env = {"LORANODE_BROKER_URL": redis_url, "LORANODE_DATA_DIR": str(tmp_path)}
    assert _loranode("health", "worker", "--timeout-s", "1", env=env).returncode != 0  # nobody answers
    worker = subprocess.Popen([sys.executable, "-c", WORKER], cwd=ROOT, stdout=subprocess.DEVNULL,
                              stderr=subprocess.DEVNULL, env={**os.environ, "PYTHONPATH": str(ROOT), **env})
    try:
        deadline = time.monotonic() + 60
        while (result := _loranode("health", "worker", "--timeout-s", "1", env=env)).returncode != 0:
            assert time.monotonic() < deadline and worker.poll() is None, result.stderr
        assert "worker ok: settlement@" in result.stdout
    finally:
        worker.terminate()
        worker.wait(timeout=30)
