"""A whole node on this machine: anvil, the contracts, a SQLite or PostgreSQL mirror kept by the
indexer, and the API on a loopback port. `loranode dev`, the demo and the end-to-end tests use it.

Everything it starts it stops: `with LocalNode.start(...) as node: ...`.
"""

from __future__ import annotations

import logging
import os
import subprocess
import sys
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import uvicorn
from pydantic import SecretStr

from node.api.app import create_app
from node.api.deps import NodeServices
from node.api.wiring import build_services
from node.chain.anvil import Anvil, free_port
from node.chain.binding import IndexedContracts
from node.chain.contract_client import ContractClient
from node.chain.contracts import Contracts
from node.chain.deploy import Deployment, deploy_all, write_deployment
from node.chain.indexer import Indexer, IndexerConfig
from node.chain.x402_channels import deploy_x402
from node.config import Settings, load_settings
from node.db.session import make_engine, session_factory, upgrade
from node.errors import ChainError, ChainMismatch, ConfigError, MirrorHalted, ReorgTooDeep

log = logging.getLogger(__name__)

# Roles among anvil's funded dev accounts.
OPERATOR, GUARDIAN, TREASURY, FIRST_USER = 0, 1, 2, 3


@dataclass
class LocalNode:
    settings: Settings
    anvil: Anvil
    deployment: Deployment
    services: NodeServices | None = None
    _server: uvicorn.Server | None = None
    _threads: list[threading.Thread] = field(default_factory=list)
    _stop: threading.Event = field(default_factory=threading.Event)
    _procs: list[subprocess.Popen[bytes]] = field(default_factory=list)
    index_poll_interval_s: float = 0.1  # tests want the mirror fast; `loranode indexer` polls once a second

    @classmethod
    def start_chain(cls, data_dir: Path, *, database_url: str | None = None, protocol_bps: int = 500,
                    node_bps: int = 1_500, challenge_period_s: int = 0, thaw_period_s: int = 7_200,
                    x402: bool = False, index_poll_interval_s: float = 0.1, indexer_process: bool = False,
                    **overrides: Any) -> LocalNode:
        """Anvil, the contracts and a migrated database: everything but the engine. The engine it serves
        runs in the API's process (one process to debug, as `loranode dev`, the demo and tests want),
        unless LORANODE_ENGINE_PROCESS says otherwise (`loranode api`'s default: core processes). The
        indexer runs on a thread of this process, every `index_poll_interval_s` (a benchmark of the API
        beside it wants the production interval: at 0.1 s it takes a good share of this process's GIL),
        or with `indexer_process` in `loranode indexer`, a process of its own, as a deployment runs it."""
        data_dir.mkdir(parents=True, exist_ok=True)
        overrides.setdefault("engine_process", engine_process_from_env())
        anvil = Anvil().start()
        try:
            keys = anvil.keys
            dep = deploy_all(anvil.rpc_url, keys[OPERATOR], guardian=_address(keys[GUARDIAN]),
                             treasury=_address(keys[TREASURY]), protocol_bps=protocol_bps, node_bps=node_bps,
                             thaw_period_s=thaw_period_s, challenge_period_s=challenge_period_s)
            if x402:  # the channel contracts at their canonical addresses, the operator's router (docs/x402.md)
                dep = deploy_x402(ContractClient(anvil.rpc_url, keys[OPERATOR]), dep, _address(keys[OPERATOR]))
            write_deployment(dep, data_dir / "deployments")
            chain = {"confirmations": 0, "finality_depth": 2, **overrides}
            settings = load_settings(data_dir=data_dir, rpc_url=anvil.rpc_url, operator_key=keys[OPERATOR],
                                     database_url=database_url,
                                     deployment_file=data_dir / "deployments" / f"{dep.chain_id}.json", **chain)
            upgrade(settings.resolved_database_url())
        except BaseException:
            anvil.stop()
            raise
        node = cls(settings=settings, anvil=anvil, deployment=dep, index_poll_interval_s=index_poll_interval_s)
        node._spawn("miner", node._mine)
        if indexer_process:
            node._procs.append(subprocess.Popen([sys.executable, "-m", "node", "indexer"],
                                                env={**os.environ, **settings_env(settings)},
                                                stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL))
        else:
            node._spawn("indexer", node._index)
        return node

    def contracts(self, key_index: int) -> Contracts:
        """The deployment's bindings, signing with dev account `key_index`."""
        return Contracts.connect(self.anvil.rpc_url, self.deployment, self.anvil.keys[key_index])

    def serve(self, model_path: Path, **overrides: Any) -> str:
        """Start the API (engine included) on a free loopback port; returns its base URL."""
        settings = self.settings.model_copy(update={"model_path": model_path, "port": free_port(), **overrides})
        self.settings = settings
        self.services = build_services(settings, self.deployment)
        config = uvicorn.Config(create_app(self.services), host="127.0.0.1", port=settings.port,
                                log_level="warning", lifespan="on", timeout_keep_alive=settings.keep_alive_s)
        self._server = uvicorn.Server(config)
        self._spawn("api", self._server.run)
        deadline = time.monotonic() + 60
        while not self._server.started:
            if time.monotonic() > deadline or not self._threads[-1].is_alive():
                raise ChainError("the API did not start", port=settings.port)
            time.sleep(0.05)
        return self.base_url

    @property
    def base_url(self) -> str:
        return f"http://127.0.0.1:{self.settings.port}"

    def start_settlement(self, log_dir: Path, **overrides: Any) -> None:
        """`loranode worker` and `loranode beat` as processes of their own, on the embedded broker."""
        self.settings = self.settings.model_copy(update=overrides)
        env = {**os.environ, **settings_env(self.settings)}
        log_dir.mkdir(parents=True, exist_ok=True)
        for kind in ("worker", "beat"):
            log = open(log_dir / f"{kind}.log", "ab")  # noqa: SIM115 - the child keeps it
            self._procs.append(subprocess.Popen([sys.executable, "-m", "node", kind], env=env, stdout=log,
                                                stderr=subprocess.STDOUT))

    def wait_for_mirror(self, timeout_s: float = 30.0, final: bool = True) -> None:
        """Block until the indexer has caught up with the chain head (after the txs just sent), and
        with `final`, until that block is final too: the dev chain mines `finality_depth` blocks at once
        (deposits fund paid requests, and registrations are served, only once final)."""
        from node.db import queries

        factory = session_factory(make_engine(self.settings.resolved_database_url(), pooled=False))
        target = int(str(self.anvil.rpc("eth_blockNumber")), 16)  # a hex quantity
        if final:
            self.anvil.rpc("anvil_mine", hex(self.settings.finality_depth))
        deadline = time.monotonic() + timeout_s
        while time.monotonic() < deadline:
            with factory() as session:
                head = queries.mirror_head(session)
            if head is not None and (head.final_block if final else head.last_block) >= target:
                return
            time.sleep(0.05)
        raise ChainError("the indexer did not catch up in time", target_block=target)

    # --- background work ----------------------------------------------------------------------------
    def _spawn(self, name: str, target: Any) -> None:
        thread = threading.Thread(target=target, name=f"local-{name}", daemon=True)
        thread.start()
        self._threads.append(thread)

    def _mine(self) -> None:
        """An empty block a second, so that confirmations and finality advance on an idle dev chain."""
        while not self._stop.wait(1.0):
            self.anvil.rpc("evm_mine")

    def _index(self) -> None:
        s = self.settings
        config = IndexerConfig(chain_id=self.deployment.chain_id, confirmations=s.confirmations,
                               finality_depth=s.finality_depth, start_block=self.deployment.from_block,
                               poll_interval_s=self.index_poll_interval_s)
        factory = session_factory(make_engine(s.resolved_database_url()))
        indexer = Indexer(config, self.anvil.rpc_url, factory, IndexedContracts.from_deployment(self.deployment))
        try:
            indexer.run_forever(self._stop)
        except (ChainMismatch, MirrorHalted, ReorgTooDeep) as e:  # on the cursor: the API refuses paid work
            log.error("the indexer stopped: %s", e.message)

    def stop(self) -> None:
        for proc in self._procs:
            proc.terminate()
        for proc in self._procs:
            try:
                proc.wait(timeout=10)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait()
        self._stop.set()
        if self._server is not None:
            self._server.should_exit = True
        for thread in self._threads:
            thread.join(timeout=15)
        self.anvil.stop()

    def __enter__(self) -> LocalNode:
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop()


def engine_process_from_env() -> bool:
    """LORANODE_ENGINE_PROCESS as Settings reads it; unset: False (the engine in the API's process)."""
    value = os.environ.get("LORANODE_ENGINE_PROCESS", "").strip().lower()
    if value in ("", "0", "false", "no", "off"):
        return False
    if value in ("1", "true", "yes", "on"):
        return True
    raise ConfigError(f"LORANODE_ENGINE_PROCESS must be true or false, not {value!r}")


def settings_env(settings: Settings) -> dict[str, str]:
    """The LORANODE_* environment that gives another process these settings."""
    env = {}
    for name, value in settings.model_dump().items():
        if value is None:
            continue
        if isinstance(value, SecretStr):
            value = value.get_secret_value()
        env[f"LORANODE_{name.upper()}"] = str(value)
    return env


def _address(key: str) -> str:
    from eth_account import Account

    return str(Account.from_key(key).address)
