"""A whole node as separate processes on loopback, for end-to-end and fault tests.

anvil (mined once a second by a pausable thread here), the contracts, three contributors, four tiny
adapters with different lineages, three funded dApps; then `loranode api`, `loranode indexer`,
`loranode worker` and `loranode beat` as processes of their own on one database (PostgreSQL), a
private Redis as the Celery broker, and every process reaching the chain through a JSON-RPC proxy
the test can cut. Any process can be SIGKILLed and started again (`cluster.procs[name]`).
"""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import httpx
from eth_account import Account
from eth_hash.auto import keccak
from sqlalchemy import func, select
from sqlalchemy.exc import OperationalError
from sqlalchemy.orm import Session, sessionmaker
from web3 import Web3

from node.chain.anvil import Anvil, free_port
from node.chain.contracts import Contracts
from node.chain.deploy import Deployment, deploy_all, write_deployment
from node.client.payer import Payer
from node.config import Settings, load_settings
from node.db.models import EpochState, IndexerCursor, Receipt, SettlementEpoch
from node.db.session import make_engine, session_factory, upgrade
from node.devkit.local_node import settings_env
from node.lora.content_hash import adapter_weights_sha256, base_model_id
from node.settlement.split import Lineage, SplitParams
from tests.e2e.processes import NodeProcess, child_env, node_command
from tests.e2e.servers import PrivateRedis
from tests.fixtures.flaky_rpc import FlakyRpc

log = logging.getLogger(__name__)
TOKEN = 10**18
OPERATOR, GUARDIAN, TREASURY, RELAYER = 0, 1, 2, 11
CONTRIBUTORS = (3, 4, 5)
OWNERS = (6, 7)
PAYERS = (8, 9, 10)
PROTOCOL_BPS, NODE_BPS = 500, 1_500
# tiny adapter name, owner, dataset positions, weights (bps), owner share (bps)
ADAPTERS = (("sea-r8", 0, (0, 1), (6_000, 4_000), 2_000),
            ("count-r4", 1, (1, 2), (3_333, 6_667), 1_500),
            ("food-r16", 0, (2,), (10_000,), 0),
            ("stars-attn-r2", 1, (0, 1, 2), (2_000, 3_000, 5_000), 500))
PROCESSES = ("indexer", "api", "worker", "beat")


@dataclass(frozen=True)
class World:
    """What the test registered on chain, known independently of the node's mirror."""

    node: str
    params: SplitParams
    lineages: dict[int, Lineage]  # adapter id -> its payees
    payer_keys: tuple[str, ...]

    @property
    def models(self) -> list[str]:
        return [str(a) for a in sorted(self.lineages)]


class Miner:
    """An empty block a second (confirmations and finality advance); `paused()` holds the chain still."""

    def __init__(self, anvil: Anvil, interval_s: float = 1.0) -> None:
        self.anvil, self.interval_s = anvil, interval_s
        self._stop, self._running = threading.Event(), threading.Event()
        self._running.set()
        self._thread = threading.Thread(target=self._run, name="e2e-miner", daemon=True)
        self._thread.start()

    def _run(self) -> None:
        while not self._stop.wait(self.interval_s):
            if self._running.is_set():
                self.anvil.rpc("evm_mine")

    @contextmanager
    def paused(self) -> Iterator[None]:
        self._running.clear()
        try:
            yield
        finally:
            self._running.set()

    def stop(self) -> None:
        self._stop.set()
        self._thread.join(timeout=5)


@dataclass
class Cluster:
    anvil: Anvil
    deployment: Deployment
    settings: Settings
    world: World
    rpc_proxy: FlakyRpc
    redis: PrivateRedis
    miner: Miner
    log_dir: Path
    procs: dict[str, NodeProcess] = field(default_factory=dict)

    def __post_init__(self) -> None:
        self.w3 = Web3(Web3.HTTPProvider(self.anvil.rpc_url))
        self.factory: sessionmaker[Session] = session_factory(make_engine(self.settings.resolved_database_url()))
        self.node = self.world.node
        self.base_nonce = self.operator_nonce()  # before any settle: each epoch adds exactly one transaction

    # --- processes ------------------------------------------------------------------------------
    def env(self, **overrides: Any) -> dict[str, str]:
        return child_env(settings_env(self.settings.model_copy(update=overrides)))

    def start(self, name: str, argv: tuple[str, ...] | None = None, **overrides: Any) -> NodeProcess:
        """Start process `name` (`loranode <name>` unless `argv` says otherwise), with setting overrides."""
        proc = NodeProcess(name, argv or node_command(name), self.env(**overrides), self.log_dir / f"{name}.log",
                           num_starts=self.procs[name].num_starts if name in self.procs else 0)
        self.procs[name] = proc.start()
        return proc

    def restart_api(self, **overrides: Any) -> None:
        self.procs["api"].stop()
        self.start("api", **overrides)
        self.wait_ready()

    def check_alive(self, *names: str) -> None:
        dead = [p for n, p in self.procs.items() if (not names or n in names) and not p.is_alive]
        if dead:
            raise AssertionError("processes died: " + ", ".join(p.name for p in dead) + "\n" +
                                 "\n".join(p.log_tail() for p in dead))

    def logs(self) -> str:
        return "\n".join(p.log_tail(2_500) for p in self.procs.values())

    @property
    def base_url(self) -> str:
        return f"http://127.0.0.1:{self.settings.port}"

    def ready(self) -> httpx.Response:
        return httpx.get(f"{self.base_url}/ready", timeout=10)

    def wait_ready(self, timeout_s: float = 120.0) -> None:
        deadline = time.monotonic() + timeout_s
        while time.monotonic() < deadline:
            self.check_alive("api")
            try:
                if self.ready().status_code == 200:
                    return
            except httpx.TransportError:
                pass
            time.sleep(0.2)
        raise AssertionError(f"the API was not ready in {timeout_s}s\n{self.logs()}")

    # --- chain and database -----------------------------------------------------------------------
    def contracts(self, index: int) -> Contracts:
        return Contracts.connect(self.w3, self.deployment, self.anvil.keys[index])

    def payer(self, i: int) -> Payer:
        return Payer(self.world.payer_keys[i], self.base_url, timeout_s=30.0)

    def wait_mirror(self, block: int, timeout_s: float = 60.0, final: bool = False) -> None:
        def caught_up() -> bool:
            try:
                with self.factory() as session:
                    cursor = session.scalars(select(IndexerCursor)).first()
            except OperationalError:  # a pooled connection from before a database restart: dropped, retry
                return False
            return cursor is not None and (cursor.final_block if final else cursor.last_block) >= block
        self.wait_for(caught_up, f"the mirror at block {block}{' (final)' if final else ''}", timeout_s)

    def wait_for(self, check: Any, what: str, timeout_s: float = 90.0, interval_s: float = 0.2) -> None:
        deadline = time.monotonic() + timeout_s
        while time.monotonic() < deadline:
            if check():
                return
            time.sleep(interval_s)
        raise AssertionError(f"timed out after {timeout_s}s waiting for {what}\n{self.logs()}")

    def epochs(self) -> dict[int, EpochState]:
        with self.factory() as session:
            rows = session.execute(select(SettlementEpoch.epoch_id, SettlementEpoch.state)
                                   .where(SettlementEpoch.node == self.node.lower())).all()
        return dict(rows)  # type: ignore[arg-type]

    def num_unsettled(self) -> int:
        """Receipts not yet in a FINAL epoch."""
        with self.factory() as session:
            q = (select(func.count()).select_from(Receipt)
                 .outerjoin(SettlementEpoch, (SettlementEpoch.node == Receipt.node)
                            & (SettlementEpoch.epoch_id == Receipt.epoch_id))
                 .where(Receipt.node == self.node.lower())
                 .where((Receipt.epoch_id.is_(None)) | (SettlementEpoch.state != EpochState.FINAL)))
            return int(session.scalar(q) or 0)

    def wait_settled(self, timeout_s: float = 120.0) -> None:
        """Until every receipt is in a FINAL epoch (a FAILED epoch fails at once)."""
        def settled() -> bool:
            failed = [e for e, s in self.epochs().items() if s is EpochState.FAILED]
            assert not failed, f"epochs failed: {failed}\n{self.logs()}"
            return self.num_unsettled() == 0 and all(s is EpochState.FINAL for s in self.epochs().values())
        self.wait_for(settled, "every receipt in a final epoch", timeout_s, interval_s=0.5)

    def operator_nonce(self) -> int:
        return int(self.w3.eth.get_transaction_count(self.node))

    def stop(self) -> None:
        for proc in self.procs.values():  # SIGTERM to all first, so they wind down together
            if proc.is_alive and proc.proc is not None:
                proc.proc.terminate()
        for proc in self.procs.values():
            proc.stop(timeout_s=10)
        self.miner.stop()
        self.rpc_proxy.stop()
        self.redis.stop()
        self.anvil.stop()


def _address(key: str) -> str:
    return str(Account.from_key(key).address)


def register_world(anvil: Anvil, deployment: Deployment, tiny_model: Path, adapters: dict[str, Path]) -> World:
    """Datasets, adapters and funded escrow on chain, as their owners would do it."""
    w3 = Web3(Web3.HTTPProvider(anvil.rpc_url))
    connect = lambda i: Contracts.connect(w3, deployment, anvil.keys[i])  # noqa: E731
    payouts, dataset_ids = [], []
    for i, who in enumerate(CONTRIBUTORS):
        c = connect(who)
        dataset_ids.append(c.datasets.register(keccak(f"e2e dataset {i}".encode()), f"file:///d{i}", c.client.address))
        payouts.append(c.client.address)
    base = base_model_id(tiny_model)
    lineages = {}
    for name, owner, positions, weights, share in ADAPTERS:
        c = connect(OWNERS[owner])
        adapter_id = c.adapters.register(base, adapter_weights_sha256(adapters[name]), adapters[name].as_uri(),
                                         [dataset_ids[p] for p in positions], list(weights), share)
        lineages[adapter_id] = Lineage(c.client.address, share,
                                       tuple((payouts[p], w) for p, w in zip(positions, weights, strict=True)))
    node = _address(anvil.keys[OPERATOR])
    for who in PAYERS:
        c = connect(who)
        c.token.mint(c.client.address, 1_000 * TOKEN)
        c.escrow.deposit(node, 1_000 * TOKEN, c.token)
    params = SplitParams(deployment.treasury, node, PROTOCOL_BPS, NODE_BPS)
    return World(node, params, lineages, tuple(anvil.keys[i] for i in PAYERS))


@contextmanager
def running_cluster(root: Path, tiny_model: Path, adapters: dict[str, Path], database_url: str,
                    **overrides: Any) -> Iterator[Cluster]:
    """Start everything (about half a minute on two shared cores); stop everything after."""
    started = time.monotonic()
    anvil = Anvil().start()
    parts: list[Any] = [anvil]
    try:
        keys = anvil.keys
        dep = deploy_all(anvil.rpc_url, keys[OPERATOR], guardian=_address(keys[GUARDIAN]),
                         treasury=_address(keys[TREASURY]), protocol_bps=PROTOCOL_BPS, node_bps=NODE_BPS,
                         thaw_period_s=3_600, challenge_period_s=0)
        world = register_world(anvil, dep, tiny_model, adapters)
        upgrade(database_url)
        proxy = FlakyRpc(anvil.rpc_url).start()
        parts.append(proxy)
        redis = PrivateRedis(root / "redis").start()
        parts.append(redis)
        values: dict[str, Any] = dict(
            data_dir=root / "data", database_url=database_url, broker_url=redis.url, rpc_url=proxy.url,
            operator_key=keys[OPERATOR], deployment_file=write_deployment(dep, root / "deployments"),
            confirmations=0, finality_depth=2, model_path=tiny_model, port=free_port(),
            prompt_token_price=10**9, completion_token_price=2 * 10**9, default_max_tokens=16,
            epoch_max_age_s=1.0, settlement_interval_s=0.5, log_level="INFO")
        settings = load_settings(**{**values, **overrides})
        cluster = Cluster(anvil, dep, settings, world, proxy, redis, Miner(anvil), root / "logs")
        parts = [cluster]
        log.info("cluster: chain, contracts and registrations in %.1fs", time.monotonic() - started)
        for name in PROCESSES:
            cluster.start(name)
        # final too: the node serves an adapter once its registration is final
        cluster.wait_mirror(int(anvil.rpc("eth_blockNumber"), 16), final=True)  # type: ignore[arg-type]
        log.info("cluster: mirror caught up after %.1fs", time.monotonic() - started)
        cluster.wait_ready()
        log.info("cluster: API ready after %.1fs", time.monotonic() - started)
        yield cluster
    finally:
        for part in reversed(parts):
            part.stop()
