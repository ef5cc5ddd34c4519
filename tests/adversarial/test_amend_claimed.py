"""The guardian's amend never takes back what an account already claimed. Real anvil, real contracts,
the real worker, SQLite and PostgreSQL.

The attack without this: claims are cumulative and `claimed` survives an amend, so a corrected tree
that gives an account less than it was already paid (or leaves it out) adds up to the pot on paper, but
the pot has paid that account the difference already: once the others claim, the last of them is
refused (`ExceedsEpochTotal`) for good. `amend` refused neither, and spent the guardian's gas on it.
"""

from __future__ import annotations

from collections import Counter
from pathlib import Path

import pytest

from node.db.models import EpochState
from node.errors import ChainError
from node.settlement.amendment import amend
from node.settlement.claims import claim_all
from node.settlement.epoch_builder import cumulative_of, rewards_tree
from node.settlement.policy import EpochPolicy
from node.settlement.publication import export_epoch, published_epoch
from tests.adversarial.settlement_steps import LONG, tick_until
from tests.fixtures.settlement import GUARDIAN, OPERATOR, RELAYER, SettlementWorld, build_world

pytestmark = pytest.mark.chain
CHALLENGE_S = 3_600


@pytest.fixture
def world(fresh_anvil: object, db_url: str) -> SettlementWorld:
    return build_world(fresh_anvil, db_url, challenge_period_s=CHALLENGE_S)  # type: ignore[arg-type]


def _leaves(world: SettlementWorld, epoch_id: int) -> dict[str, int]:
    with world.factory() as session:
        row = published_epoch(session, world.node, epoch_id)
        assert row is not None and row.trees is not None
        return cumulative_of(row.trees["rewards"])


def _claimed_then_vetoed(world: SettlementWorld, tmp_path: Path) -> dict[str, int]:
    """Epoch 1 settled, unlocked and claimed by every payee; epoch 2 settled and vetoed. Epoch 2's leaves."""
    service = world.service(EpochPolicy(max_age_s=0))
    world.pay(0, 0, world.adapter_ids[0], 3_000_001, validity_s=LONG)
    tick_until(world, service, 1, EpochState.FINAL)
    world.anvil.rpc("evm_increaseTime", CHALLENGE_S + 1)
    world.mine()
    exported = export_epoch(world.factory, world.node, tmp_path / "epoch-1.json", 1)
    paid = claim_all(world.contracts(RELAYER), world.node, exported).paid
    assert paid and not any(v == 0 for v in paid.values())
    world.pay(1, 0, world.adapter_ids[1], 4_000_003, validity_s=LONG)
    tick_until(world, service, 2, EpochState.FINAL)
    world.contracts(GUARDIAN).settlement.veto(world.node, 2)
    return _leaves(world, 2)


def _refused(world: SettlementWorld, leaves: dict[str, int], match: str) -> None:
    guardian = world.contracts(GUARDIAN).settlement
    assert sum(leaves.values()) == guardian.rewards_total(world.node), "adds up to the pot"
    with pytest.raises(ChainError, match=match):
        amend(guardian, world.node, {"rewards": rewards_tree(leaves, world.node).to_json()})
    assert guardian.first_vetoed_epoch(world.node) == 2, "refused before any gas was spent"


def test_a_leaf_below_what_its_account_claimed_is_refused(world: SettlementWorld, tmp_path: Path) -> None:
    leaves = Counter(_claimed_then_vetoed(world, tmp_path))
    claimed = world.contracts(OPERATOR).settlement.claimed(world.node, world.node)
    moved = leaves[world.node] - claimed + 1
    contributor = next(a for a in leaves if a != world.node)
    leaves[world.node] -= moved
    leaves[contributor] += moved
    _refused(world, dict(leaves), "less than it already claimed")


def test_an_account_that_claimed_left_out_of_the_tree_is_refused(world: SettlementWorld, tmp_path: Path) -> None:
    leaves = Counter(_claimed_then_vetoed(world, tmp_path))
    contributor = next(a for a in leaves if a != world.node)
    leaves[contributor] += leaves.pop(world.node)
    _refused(world, dict(leaves), "already claimed")
