"""A settle stuck in the mempool through a guardian's veto and amend never lands on the vetoed leaves.
Real anvil (its base fee pushed above the node's fee cap), real contracts, the real worker, SQLite and
PostgreSQL.

The sequence without this: epoch 1 is settled; epoch 2's settle (its cumulative leaves built on epoch 1's)
is broadcast, then the base fee rises above the node's fee cap and it waits in the mempool. The guardian
vetoes epoch 1 (the stuck settle would now revert: NodeVetoed) and amends it. The amend clears the veto and
sets the node's last epoch back to 1, so the stuck settle is valid again: once fees fall it lands as epoch
2, whose root pays the vetoed leaves plus epoch 2's shares, and undoes the guardian's correction.
"""

from __future__ import annotations

from collections import Counter

import pytest

from node.db.models import EpochState
from node.errors import ChainError
from node.settlement.amendment import adopt_amendment, amend
from node.settlement.epoch_builder import cumulative_of, rewards_tree
from node.settlement.outbox import intent_key
from node.settlement.policy import EpochPolicy
from node.settlement.publication import published_epoch
from node.settlement.service import SettlementService
from tests.adversarial.settlement_steps import LONG, on_chain, tick_until
from tests.fixtures.settlement import GUARDIAN, OPERATOR, SettlementWorld, build_world

pytestmark = pytest.mark.chain
CHALLENGE_S = 3_600
GWEI = 10**9
NODE_FEE_CAP = 20 * GWEI
HIGH_BASE_FEE = 200 * GWEI  # above the node's cap, below the guardian's (500 gwei)
CORRECTION = 1_000


@pytest.fixture
def world(fresh_anvil: object, db_url: str) -> SettlementWorld:
    return build_world(fresh_anvil, db_url, challenge_period_s=CHALLENGE_S)  # type: ignore[arg-type]


def _base_fee(world: SettlementWorld, fee: int) -> None:
    """The next block's base fee (anvil lowers it after each near-empty block: set before each step)."""
    world.anvil.rpc("anvil_setNextBlockBaseFeePerGas", hex(fee))


def _tick(world: SettlementWorld, service: SettlementService) -> None:
    try:
        service.tick()
    except ChainError as exc:  # vetoed, or amended and not adopted yet: the worker says so and waits
        assert "guardian" in str(exc) or "adopt" in str(exc), exc


def _stuck_epoch_2(world: SettlementWorld, service: SettlementService) -> dict[str, int]:
    """Epoch 1 final; epoch 2 broadcast and left in the mempool by a base fee above the node's cap.
    Returns epoch 1's leaves."""
    world.pay(0, 0, world.adapter_ids[0], 3_000_001, validity_s=LONG)
    tick_until(world, service, 1, EpochState.FINAL)
    world.pay(1, 0, world.adapter_ids[1], 4_000_003, validity_s=LONG)
    world.anvil.rpc("evm_setAutomine", False)
    tick_until(world, service, 2, EpochState.SUBMITTED, mine=False)
    _base_fee(world, HIGH_BASE_FEE)
    world.anvil.rpc("evm_setAutomine", True)
    world.mine()
    assert on_chain(world)[0] == 1, "epoch 2's settle waits in the mempool"
    with world.factory() as session:
        row = published_epoch(session, world.node, 1)
        assert row is not None and row.trees is not None
        return cumulative_of(row.trees["rewards"])


def _amend_once_allowed(world: SettlementWorld, service: SettlementService, doc: dict) -> None:
    """The guardian amends; while the node has a transaction in the mempool it is refused (anvil drops one
    priced below the base fee from its pool: then only the node's store holds it), fees fall back, the
    worker ticks and the guardian tries again."""
    guardian = world.contracts(GUARDIAN).settlement
    for _ in range(5):
        _base_fee(world, HIGH_BASE_FEE)
        try:
            amend(guardian, world.node, doc)
            return
        except ChainError as exc:
            assert "mempool" in str(exc), exc
        _base_fee(world, GWEI)
        world.mine()
        _tick(world, service)
    raise AssertionError("the guardian could never amend")


@pytest.mark.parametrize("worker_up", [True, False], ids=["worker-sees-the-veto", "worker-down-until-the-amend"])
def test_a_settle_stuck_through_a_veto_and_amend_never_lands_on_the_vetoed_leaves(
        world: SettlementWorld, worker_up: bool) -> None:
    service = world.service(EpochPolicy(max_age_s=0), max_fee_cap=NODE_FEE_CAP)
    leaves = Counter(_stuck_epoch_2(world, service))
    _base_fee(world, HIGH_BASE_FEE)
    world.contracts(GUARDIAN).settlement.veto(world.node, 1)
    for _ in range(2 if worker_up else 0):
        _base_fee(world, HIGH_BASE_FEE)
        _tick(world, service)
    contributor = world.lineages[world.adapter_ids[0]].datasets[0][0]
    leaves[world.node] -= CORRECTION
    leaves[contributor] += CORRECTION
    doc = {"rewards": rewards_tree(dict(leaves), world.node).to_json()}
    _amend_once_allowed(world, service, doc)

    _base_fee(world, GWEI)  # fees fall: whatever waited in the mempool lands now
    if not worker_up:
        service.reconcile()  # what a restarted worker does first
    for _ in range(3):
        world.mine()
        _tick(world, service)
    settlement = world.contracts(OPERATOR).settlement
    assert on_chain(world)[0] == 1, "the settle built on the vetoed leaves landed after the amend"
    assert settlement.epoch(world.node, 1).rewards_root == rewards_tree(dict(leaves), world.node).root
    cancelled = service.tx.store.load(intent_key(world.node, 2))
    assert cancelled is not None and (cancelled.error or "").startswith("cancelled"), "the worker replaced it"

    assert adopt_amendment(world.factory, settlement, world.node, doc) == 1
    tick_until(world, service, 2, EpochState.FINAL)  # epoch 2's receipts, now on the corrected leaves
    with world.factory() as session:
        row = published_epoch(session, world.node, 2)
        assert row is not None and row.trees is not None
        after = cumulative_of(row.trees["rewards"])
    expected = Counter(world.expected_split())
    expected.update({world.node: -CORRECTION, contributor: CORRECTION})
    assert after == {a: v for a, v in expected.items() if v}, "epoch 2 adds its shares to the corrected leaves"
    assert on_chain(world)[:2] == (2, 3_000_001 + 4_000_003)


def test_the_guardian_cannot_amend_while_the_node_has_a_transaction_in_the_mempool(world: SettlementWorld) -> None:
    service = world.service(EpochPolicy(max_age_s=0))
    world.pay(0, 0, world.adapter_ids[0], 3_000_001, validity_s=LONG)
    tick_until(world, service, 1, EpochState.FINAL)
    with world.factory() as session:
        row = published_epoch(session, world.node, 1)
        assert row is not None and row.trees is not None
        leaves = cumulative_of(row.trees["rewards"])
    guardian = world.contracts(GUARDIAN).settlement
    guardian.veto(world.node, 1)
    doc = {"rewards": rewards_tree(leaves, world.node).to_json()}
    world.anvil.rpc("evm_setAutomine", False)
    operator = world.contracts(OPERATOR).client
    nonce = world.w3.eth.get_transaction_count(world.node, "pending")
    tx = {"type": 2, "chainId": world.deployment.chain_id, "nonce": nonce, "to": world.node, "value": 0,
          "gas": 21_000, "maxFeePerGas": 10 * GWEI, "maxPriorityFeePerGas": GWEI}
    assert operator.account is not None
    world.w3.eth.send_raw_transaction(operator.account.sign_transaction(tx).raw_transaction)
    with pytest.raises(ChainError, match="mempool") as refused:
        amend(guardian, world.node, doc)
    assert refused.value.facts["pending_nonces"] == f"{nonce}..{nonce}"
    world.mine()
    world.anvil.rpc("evm_setAutomine", True)
    assert amend(guardian, world.node, doc)[0] == 1, "amended once the node's transaction is mined"


@pytest.mark.parametrize("worker_up", [True, False], ids=["worker-cancelled-it", "worker-down-until-adopt"])
def test_an_operator_adopting_before_the_cancel_lands_still_settles_the_next_epoch(
        world: SettlementWorld, worker_up: bool) -> None:
    """Adopt dissolves the epoch whose settle is pending (cancelled, or not yet if the worker was down): its
    nonce must still be filled with a no-op (it is in no mempool here: priced out), or the next epoch's
    settle waits behind the gap for ever (and the stale settle, in some mempool, lands on the vetoed leaves)."""
    service = world.service(EpochPolicy(max_age_s=0), max_fee_cap=NODE_FEE_CAP)
    leaves = Counter(_stuck_epoch_2(world, service))
    _base_fee(world, HIGH_BASE_FEE)
    world.contracts(GUARDIAN).settlement.veto(world.node, 1)
    _base_fee(world, HIGH_BASE_FEE)
    if worker_up:
        _tick(world, service)  # the worker cancels epoch 2's settle
    contributor = world.lineages[world.adapter_ids[0]].datasets[0][0]
    leaves.update({world.node: -CORRECTION, contributor: CORRECTION})
    doc = {"rewards": rewards_tree(dict(leaves), world.node).to_json()}
    _amend_once_allowed(world, service, doc)
    assert adopt_amendment(world.factory, world.contracts(OPERATOR).settlement, world.node, doc) == 1
    _base_fee(world, GWEI)
    service.reconcile()
    tick_until(world, service, 2, EpochState.FINAL)
    cancelled = service.tx.store.load(intent_key(world.node, 2))
    assert cancelled is not None and (cancelled.error or "").startswith("cancelled")
    assert on_chain(world)[:2] == (2, 3_000_001 + 4_000_003)
