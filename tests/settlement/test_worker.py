"""The real thing: a `celery worker` and `celery beat` in their own processes on a real Redis, driving
an epoch of a fresh anvil chain to FINAL; and the same with Redis restarted mid-epoch."""

from __future__ import annotations

import os
import subprocess
import sys
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import pytest
from web3 import Web3

from node.chain.anvil import free_port
from node.chain.deploy import write_deployment
from node.db.models import EpochState
from node.settlement.publication import published_epoch
from tests.fixtures.settlement import OPERATOR, SettlementWorld

pytestmark = [pytest.mark.chain, pytest.mark.redis, pytest.mark.slow]
ENTRY = ("from node.config import load_settings; from node.settlement.celery_app import run_{0}; "
         "run_{0}(load_settings())")


def _env(world: SettlementWorld, tmp_path: Path, broker_url: str) -> dict[str, str]:
    deployment = write_deployment(world.deployment, tmp_path / "deployments")
    return {**os.environ, "LORANODE_DATA_DIR": str(tmp_path / "data"), "LORANODE_DATABASE_URL": world.db_url,
            "LORANODE_BROKER_URL": broker_url, "LORANODE_RPC_URL": world.anvil.rpc_url,
            "LORANODE_DEPLOYMENT_FILE": str(deployment), "LORANODE_OPERATOR_KEY": world.key(OPERATOR),
            "LORANODE_CONFIRMATIONS": "0", "LORANODE_FINALITY_DEPTH": "2", "LORANODE_EPOCH_MAX_AGE_S": "0",
            "LORANODE_SETTLEMENT_INTERVAL_S": "0.3", "LORANODE_LOG_LEVEL": "INFO"}


def start(kind: str, env: dict[str, str], log_dir: Path) -> subprocess.Popen[bytes]:
    log = open(log_dir / f"{kind}.log", "ab")  # noqa: SIM115 - the child keeps it
    return subprocess.Popen([sys.executable, "-c", ENTRY.format(kind)], env=env, stdout=log, stderr=subprocess.STDOUT)


@contextmanager
def processes(env: dict[str, str], log_dir: Path) -> Iterator[list[subprocess.Popen[bytes]]]:
    procs = [start("worker", env, log_dir), start("beat", env, log_dir)]
    try:
        yield procs
    finally:
        for p in procs:
            p.terminate()
        for p in procs:
            try:
                p.wait(timeout=10)
            except subprocess.TimeoutExpired:
                p.kill()
                p.wait()


def wait_for(world: SettlementWorld, epoch_id: int, states: tuple[EpochState, ...], *, mine: bool = True,
             timeout_s: float = 60.0, logs: Path | None = None) -> None:
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        if mine:
            world.mine()
            world.sync()
        if world.service().state(epoch_id) in states:
            return
        time.sleep(0.2)
    tail = "".join(p.read_text()[-3000:] for p in sorted(logs.glob("*.log"))) if logs else ""
    raise AssertionError(f"epoch {epoch_id} not in {states}: {world.service().state(epoch_id)}\n{tail}")


def check_settled(world: SettlementWorld) -> None:
    settlement = world.contracts(OPERATOR).settlement
    assert settlement.rewards_total(world.node) == sum(f for f, _ in world.fees)
    with world.factory() as session:
        row = published_epoch(session, world.node)
        leaves = {Web3.to_checksum_address(v["value"][0]): int(v["value"][1]) for v in row.trees["rewards"]["values"]}
    assert leaves == dict(world.expected_split())


def test_worker_and_beat_settle_an_epoch_over_redis(sqlite_world: SettlementWorld, redis_url: str,
                                                    tmp_path: Path) -> None:
    world = sqlite_world
    a, b = world.adapter_ids
    world.pay(0, 0, a, 1_000_001)
    world.pay(1, 3, b, 2_000_003)
    with processes(_env(world, tmp_path, redis_url), tmp_path):
        wait_for(world, 1, (EpochState.FINAL,), logs=tmp_path)
        world.pay(2, 0, a, 3_000_007)
        wait_for(world, 2, (EpochState.FINAL,), logs=tmp_path)
    check_settled(world)


@contextmanager
def own_redis(port: int, workdir: Path) -> Iterator[subprocess.Popen[bytes]]:
    proc = subprocess.Popen(["redis-server", "--port", str(port), "--bind", "127.0.0.1", "--save", "",
                             "--appendonly", "no", "--dir", str(workdir)], stdout=subprocess.DEVNULL)
    import redis

    deadline = time.monotonic() + 10
    while time.monotonic() < deadline:
        try:
            redis.Redis(port=port).ping()
            break
        except redis.ConnectionError:
            time.sleep(0.05)
    try:
        yield proc
    finally:
        proc.terminate()
        proc.wait(timeout=10)


def test_redis_restarted_mid_epoch_changes_nothing(sqlite_world: SettlementWorld, tmp_path: Path) -> None:
    world = sqlite_world
    a, b = world.adapter_ids
    port = free_port()
    env = _env(world, tmp_path, f"redis://127.0.0.1:{port}/0")
    world.pay(0, 0, a, 5_000_011)
    world.pay(1, 1, b, 7_000_013)
    redis_server = own_redis(port, tmp_path)
    redis_server.__enter__()
    with processes(env, tmp_path):
        # no blocks mined: the epoch stops at CONFIRMED (mined, not final) while Redis goes away
        wait_for(world, 1, (EpochState.CONFIRMED,), mine=False, logs=tmp_path)
        redis_server.__exit__(None, None, None)
        world.pay(2, 0, b, 11_000_017)  # the API keeps charging while the broker is down
        time.sleep(1.5)
        with own_redis(port, tmp_path):
            wait_for(world, 1, (EpochState.FINAL,), logs=tmp_path)
            wait_for(world, 2, (EpochState.FINAL,), logs=tmp_path)
    check_settled(world)


def test_a_worker_killed_mid_epoch_on_the_embedded_broker(sqlite_world: SettlementWorld, tmp_path: Path) -> None:
    """`loranode dev`'s broker (sqla+sqlite in the data folder); the worker gets SIGKILL mid-epoch."""
    world = sqlite_world
    a, b = world.adapter_ids
    env = _env(world, tmp_path, f"sqla+sqlite:///{tmp_path / 'broker.db'}")
    world.pay(0, 0, a, 6_000_001)
    world.pay(2, 9, b, 8_000_009)
    with processes(env, tmp_path) as procs:
        wait_for(world, 1, (EpochState.SUBMITTED, EpochState.CONFIRMED), mine=False, logs=tmp_path)
        procs[0].kill()  # SIGKILL: no cleanup, a task may be half done
        procs[0].wait()
        world.pay(1, 0, b, 9_000_019)
        procs[0] = start("worker", env, tmp_path)
        wait_for(world, 1, (EpochState.FINAL,), logs=tmp_path)
        wait_for(world, 2, (EpochState.FINAL,), logs=tmp_path)
    check_settled(world)
    assert world.contracts(OPERATOR).settlement.last_epoch(world.node) == 2
