"""What waits for an epoch (`outbox.pending`), summed per lane in SQL, and the gas price asked once a tick.

`pending` loaded every waiting receipt into Python to sum each lane's fees, on every tick of the worker:
its cost grew with the backlog (a node down for a day, then every beat). It now reads one row a lane,
summed in SQL exactly on SQLite and PostgreSQL alike (`amount_total`); these are its figures on both.
`is_due` and `_close` each asked the chain's gas price, so a tick that closed an epoch asked twice and could
judge the epoch due at one price and open it at another; a tick now asks once. Real anvil, contracts,
ledger, PostgreSQL; the RPC is the recording proxy of tests/fixtures/flaky_rpc.py."""

from __future__ import annotations

import pytest
from sqlalchemy import select
from web3 import Web3

from node.chain.contracts import Contracts
from node.chain.tx_manager import FeePolicy, TxManager
from node.chain.tx_store import SqlTxStore
from node.db.models import EpochState, Receipt, Voucher
from node.settlement import outbox
from node.settlement.policy import EpochPolicy
from node.settlement.service import SettlementService
from tests.adversarial.settlement_steps import LONG
from tests.fixtures.flaky_rpc import FlakyRpc
from tests.fixtures.settlement import OPERATOR, TOKEN, SettlementWorld

pytestmark = [pytest.mark.chain]


def test_pending_sums_each_lane_in_sql_with_the_same_figures_on_both_databases(
        settlement_world: SettlementWorld) -> None:
    world = settlement_world
    a, b = world.adapter_ids
    world.pay(0, 0, a, 5 * TOKEN, validity_s=LONG)
    world.pay(0, 1, a, 1, validity_s=600)  # a dust lane, due first
    world.pay(0, 0, b, 5 * TOKEN, validity_s=LONG)  # lane 0 now past 2**63 units
    world.pay(1, 0, b, 3 * TOKEN, validity_s=2_000)
    with world.factory() as session:
        rows = session.execute(select(Receipt.id, Receipt.created_at, Voucher.deadline, Voucher.lane)
                               .join(Voucher, Voucher.voucher_hash == Receipt.voucher_hash).order_by(Receipt.id)).all()
        ids, created, deadlines = [r[0] for r in rows], [r[1] for r in rows], [r[2] for r in rows]
        every = outbox.pending(session, world.node)
        worth = outbox.pending(session, world.node, min_lane_fee=2)
        one = outbox.pending(session, world.node, min_lane_fee=2, max_lanes=1)
        none = outbox.pending(session, world.node, min_lane_fee=11 * TOKEN)
    assert every == outbox.Pending(4, 13 * TOKEN + 1, ids[3], created[0], deadlines[1], 3)
    assert worth == outbox.Pending(3, 13 * TOKEN, ids[3], created[0], deadlines[3], 2)
    assert one == outbox.Pending(1, 3 * TOKEN, ids[3], created[3], deadlines[3], 1)  # the lane due first
    assert none == outbox.Pending(0, 0, None, None, None)  # no lane reaches 11 tokens


def test_a_tick_asks_the_gas_price_once(settlement_world: SettlementWorld, flaky_rpc: type[FlakyRpc]) -> None:
    world = settlement_world
    proxy = flaky_rpc(world.anvil.rpc_url).start()
    w3 = Web3(Web3.HTTPProvider(proxy.url))
    tx = TxManager(w3, world.key(OPERATOR), SqlTxStore(world.factory), FeePolicy(confirmations=2))
    service = SettlementService(world.factory, Contracts.connect(w3, world.deployment, world.key(OPERATOR)), tx,
                                EpochPolicy(max_age_s=0, token_per_eth=10**18))  # 1 token unit = 1 wei
    assert service.tick() is None  # nothing waits
    assert proxy.counts["method:eth_gasPrice"] <= 1
    world.pay(0, 0, world.adapter_ids[0], TOKEN // 10, validity_s=LONG)  # far above the settle's gas
    asked = proxy.counts["method:eth_gasPrice"]
    assert service.tick() is EpochState.BUILT  # judged due, closed and built in one beat
    assert proxy.counts["method:eth_gasPrice"] - asked == 1
