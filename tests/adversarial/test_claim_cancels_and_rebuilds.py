"""Settles cancelled to free the guard's claims must not use up an epoch's rebuilds.

A settle waiting at its fee cap with an x402 claim behind its nonce is cancelled (node/settlement/
follow_step.py `_free_claims`); its epoch fails and is rebuilt as a new attempt (recovery.py). Each such
cancel used one of the epoch's `MAX_ATTEMPTS` rebuilds, the limit that stops an epoch the chain keeps
refusing: a spike that comes back, with a payer withdrawing each time (one deposit and one withdrawal
per round), ended settlement after `MAX_ATTEMPTS` rounds, every payee of the node waiting for an
operator. Now a settle the node cancelled itself (a no-op took its nonce: the price, not the epoch's
content) does not count; a settle the chain refuses still does. Real anvil, contracts, indexer, ledger
and settlement; the claim is stood in for by a plain transaction of the operator key sent behind the
settle's nonce under the guard's intent prefix (what `_free_claims` looks for).
"""

from __future__ import annotations

import pytest

from node.chain.tx_manager import TxAttempt, TxRecord, TxState
from node.db.models import EpochState
from node.settlement import outbox, recovery
from node.settlement.follow_step import CLAIM_PREFIX
from node.settlement.policy import LANE_GAS, SETTLE_BASE_GAS, EpochPolicy
from node.settlement.service import SettlementService
from tests.chain.test_tx_manager import MemoryTxStore
from tests.fixtures.settlement import OPERATOR, PAYERS, SettlementWorld

ETH = 10**18
FEE = 1_000
SPIKE = 30
LIMIT = 2  # the limit's value is not the point: two rounds reach it as eight did


def _beat(world: SettlementWorld, service: SettlementService, base_fee: int) -> None:
    """One block at `base_fee`, the indexer caught up, then one worker tick."""
    world.anvil.rpc("anvil_setNextBlockBaseFeePerGas", hex(base_fee))
    world.anvil.rpc("evm_mine")
    world.sync()
    service.tick()


def _cancel_for_a_claim(world: SettlementWorld, service: SettlementService, round_: int, normal: int,
                        spike: int) -> None:
    """Epoch 1's settle is sent at today's price; a spike prices it out and a claim is sent behind its
    nonce: the settle is cancelled so that the claim lands."""
    for _ in range(10):
        _beat(world, service, normal)
        if service.state(1) is EpochState.SUBMITTED:
            break
    assert service.state(1) is EpochState.SUBMITTED, f"round {round_}: epoch 1 is {service.state(1)}, not sent"
    _beat(world, service, spike)
    tx = service.tx
    claim = f"{CLAIM_PREFIX}stand-in:{round_}"
    tx.send(claim, tx.sender, "0x", gas=21_000)  # priced for the spike, behind the settle's nonce
    for _ in range(10):
        _beat(world, service, spike)
        record = tx.poll(claim)
        if record.state is not TxState.PENDING and service.state(1) is not EpochState.SUBMITTED:
            break
    assert tx.poll(claim).state is not TxState.PENDING, f"round {round_}: the claim still waits"
    with world.factory() as session:
        row = outbox.epoch_row(session, tx.sender, 1)
    assert row is not None
    settles = [tx.store.load(outbox.intent_key(tx.sender, 1, a)) for a in range(outbox.attempt_of(row) + 1)]
    assert any(r is not None and any(a.is_cancel and a.tx_hash == r.mined_hash for a in r.attempts)
               for r in settles), f"round {round_}: no settle was cancelled for the claim"


@pytest.mark.chain
@pytest.mark.slow
def test_settles_cancelled_for_claims_do_not_stop_settlement(settlement_world: SettlementWorld,
                                                             monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(recovery, "MAX_ATTEMPTS", LIMIT)
    world = settlement_world
    world.pay(0, 0, world.adapter_ids[0], FEE)
    gas_price = int(world.w3.eth.gas_price)
    token_per_eth = FEE * ETH // (2 * (SETTLE_BASE_GAS + LANE_GAS) * gas_price)  # pays twice its settle today
    service = world.service(EpochPolicy(max_age_s=0, token_per_eth=token_per_eth), bump_after_s=0)
    normal = int(world.w3.eth.get_block("latest")["baseFeePerGas"])
    world.anvil.rpc("evm_setAutomine", False)
    try:
        for round_ in range(LIMIT + 1):
            _cancel_for_a_claim(world, service, round_, normal, gas_price * SPIKE)
        for _ in range(20):  # the spike is over
            _beat(world, service, normal)
            if service.state(1) is EpochState.FINAL:
                break
    finally:
        world.anvil.rpc("evm_setAutomine", True)
    assert service.state(1) is EpochState.FINAL, f"epoch 1 is {service.state(1)}"
    payer = world.contracts(PAYERS[0]).client.address
    assert world.contracts(OPERATOR).settlement.collected(payer, world.node, 0) == FEE, "nothing lost"


def test_refusals_by_the_chain_still_count() -> None:
    """Of four attempts: one reverted on chain, one refused before it was sent (no record), one whose nonce
    another transaction took, one the node cancelled itself. Three count toward the limit."""
    store, node = MemoryTxStore(), "0x" + "ab" * 20

    def record(attempt: int, error: str, cancel: bool) -> TxRecord:
        sent = TxAttempt(f"0x{attempt:064x}", 1, 1, "0x", 0.0)
        no_op = TxAttempt(f"0x{attempt + 100:064x}", 2, 2, "0x", 0.0, is_cancel=True)
        return TxRecord(outbox.intent_key(node, 1, attempt), node, attempt, node, "0x", 0, 21_000,
                        TxState.FAILED, (sent, no_op), (no_op if cancel else sent).tx_hash, 1, error)

    store.save(record(0, "reverted on chain", cancel=False))
    store.save(record(2, "nonce 2 used by another transaction", cancel=False))
    store.save(record(3, "cancelled: a no-op took nonce 3", cancel=True))
    assert recovery.refusals(store, node, 1, 3) == 3
    assert recovery.refusals(store, node, 1, 0) == 1
