"""Two settlement workers ticking at once (a task delivered twice, two worker processes) send each settle once.

Each worker has its own database engine and its own RPC client, as two processes would; the RPC is slow
now and then (tests/fixtures/flaky_rpc.py), which widens every window between a read and the write that
follows it. `SettlementService.tick` runs under the per-node database lock (a PostgreSQL advisory lock,
or a file lock on SQLite), so the workers take turns: no tick fails, no settle reverts or is sent twice,
and every lane is collected exactly once. Real anvil, contracts, indexer, ledger, PostgreSQL."""

from __future__ import annotations

import threading

import pytest
from web3 import Web3

from node.chain.contracts import Contracts
from node.chain.tx_manager import FeePolicy, TxManager
from node.chain.tx_store import SqlTxStore, key_lock
from node.db.models import EpochState
from node.db.session import make_engine, session_factory
from node.settlement.policy import EpochPolicy
from node.settlement.service import SettlementService
from tests.adversarial.settlement_steps import LONG, lost, payer, settles, tick_until
from tests.fixtures.flaky_rpc import FlakyRpc
from tests.fixtures.settlement import OPERATOR, SettlementWorld

pytestmark = [pytest.mark.chain, pytest.mark.slow]
FEE = 10**15
TICKS = 12


def _worker(world: SettlementWorld, rpc_url: str) -> SettlementService:
    engine = make_engine(world.db_url)
    factory = session_factory(engine)
    w3 = Web3(Web3.HTTPProvider(rpc_url))
    key = world.key(OPERATOR)
    tx = TxManager(w3, key, SqlTxStore(factory), FeePolicy(confirmations=2))
    contracts = Contracts.connect(w3, world.deployment, key, nonce_lock=key_lock(engine))
    return SettlementService(factory, contracts, tx, EpochPolicy(max_age_s=0))


def test_two_workers_ticking_at_once_send_each_settle_once(settlement_world: SettlementWorld,
                                                            flaky_rpc: type[FlakyRpc]) -> None:
    world = settlement_world
    a, b = world.adapter_ids
    first_block = world.w3.eth.block_number + 1
    proxy = flaky_rpc(world.anvil.rpc_url, stall_every=5, stall_s=0.1).start()
    workers = [_worker(world, proxy.url), _worker(world, proxy.url)]
    errors: list[BaseException] = []

    def run(service: SettlementService) -> None:
        for _ in range(TICKS):
            try:
                service.tick()
            except BaseException as exc:  # every failure is reported below
                errors.append(exc)

    for round_ in range(3):  # receipts arrive while the workers tick: each round closes an epoch or more
        for p in range(3):
            world.pay(p, round_, a if p % 2 else b, FEE, validity_s=LONG)
        threads = [threading.Thread(target=run, args=(w,)) for w in workers]
        for t in threads:
            t.start()
        for t in threads:
            t.join()
        world.mine(2)
        world.sync()
    assert errors == []
    last = workers[0].contracts.settlement.last_epoch(world.node)
    assert last >= 1
    tick_until(world, workers[0], last, EpochState.FINAL)
    sent = settles(world, first_block)
    assert [reverted for *_, reverted in sent] == [False] * len(sent)
    assert len(sent) == world.contracts(OPERATOR).settlement.last_epoch(world.node)  # one send per epoch
    settlement = world.contracts(OPERATOR).settlement
    for round_ in range(3):
        for p in range(3):
            assert settlement.collected(payer(world, p), world.node, round_) == FEE
    assert lost(world) == []
    assert settlement.rewards_total(world.node) == 9 * FEE
