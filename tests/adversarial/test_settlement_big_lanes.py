"""A lane whose waiting fees pass 2**63 token units must not stop the node's settlement.

On SQLite (`loranode dev`, the demo) amounts are 78-digit strings (node/db/types.py), and SQLite's own
sum() over them raises "integer overflow" once a sum passes 2**63 - 1 (about 9.22 tokens of 18 decimals),
or turns floats when one amount does. `epoch_lanes` summed a lane's waiting fees with it: one payer that
ran up ten tokens on a lane between two epochs (any busy dApp does in an hour) made every tick raise, so no
epoch ever closed again and no payee was paid; the node's backlog (its metrics) raised the same way. Now
every such sum is exact SQL on both databases (`amount_total`). Real anvil, contracts, ledger, settlement."""

from __future__ import annotations

import pytest

from node.db.backlog import read_backlog
from node.db.models import EpochState
from node.settlement import outbox
from node.settlement.policy import EpochPolicy
from tests.adversarial.settlement_steps import LONG, payer, tick_until
from tests.fixtures.settlement import OPERATOR, TOKEN, SettlementWorld

pytestmark = [pytest.mark.chain, pytest.mark.slow]


def test_a_lane_past_two_to_the_63_is_settled_and_holds_up_no_one(settlement_world: SettlementWorld) -> None:
    world = settlement_world
    a, b = world.adapter_ids
    for _ in range(2):
        world.pay(0, 0, a, 5 * TOKEN, validity_s=LONG)  # 10 tokens on one lane: past 2**63 units
    world.pay(1, 0, b, 3, validity_s=LONG)  # an honest small lane of another payer
    assert 10 * TOKEN > 2**63
    with world.factory() as session:
        assert read_backlog(session, world.node).unsettled_value == 10 * TOKEN + 3
        p = outbox.pending(session, world.node)
        assert (p.num_receipts, p.total_fee, p.num_lanes) == (3, 10 * TOKEN + 3, 2)
    service = world.service(EpochPolicy(max_age_s=0))
    tick_until(world, service, 1, EpochState.FINAL)
    settlement = world.contracts(OPERATOR).settlement
    assert settlement.collected(payer(world, 0), world.node, 0) == 10 * TOKEN
    assert settlement.collected(payer(world, 1), world.node, 0) == 3
    assert settlement.rewards_total(world.node) == 10 * TOKEN + 3
