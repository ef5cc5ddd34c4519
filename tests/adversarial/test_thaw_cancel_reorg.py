"""A thaw cancelled in a block that is not final yet does not free the money it was thawing.

The attack: a payer thaws its whole escrow and waits the thaw period out (the thaw is final and has
ended), then cancels the thaw. The mirror showed the cancel at once, so the node served against the
whole balance while the cancel was two blocks deep but not final. A reorg deeper than that dropped
the cancel: the thaw, ended long ago, was back, and the payer withdrew everything before settlement
collected what it had been charged; the node was never paid. Now the hold counts a thaw as cancelled
only as of the last final block; a thaw started in a block not final yet counts at once. Real anvil
(`anvil_reorg`), contracts, indexer, ledger and settlement, on SQLite and PostgreSQL.
"""

from __future__ import annotations

import pytest

from node.db.models import EpochState
from node.errors import InsufficientEscrow
from node.settlement.policy import EpochPolicy
from tests.adversarial.settlement_steps import LONG, on_chain
from tests.fixtures.settlement import FINALITY_DEPTH, PAYERS, TOKEN, SettlementWorld

pytestmark = pytest.mark.chain
FEE = 10_000_000
ALL = 1_000 * TOKEN  # the payer's whole escrow (tests/fixtures/settlement.py)


def serve(world: SettlementWorld) -> int:
    """One paid request of payer 0: the fee the node charged, or 0 when it refused (402)."""
    try:
        world.pay(0, 0, world.adapter_ids[0], FEE, validity_s=LONG)
    except InsufficientEscrow:
        return 0
    return FEE


def settle(world: SettlementWorld) -> int:
    """Settle whatever the node charged; the tokens the Settlement holds afterwards."""
    service = world.service(EpochPolicy(max_age_s=10**9))
    epoch_id = service.close_epoch()
    for _ in range(30):
        if epoch_id is None or service.state(epoch_id) in (EpochState.FINAL, EpochState.FAILED):
            break
        service.step()
        world.mine()
        world.sync()
    return on_chain(world)[2]


def thaw_out_then_cancel(world: SettlementWorld) -> int:
    """Payer 0 thaws its whole escrow, waits the thaw out until it is final, then cancels it (mined,
    indexed, one block on top: not final). Returns the cancel's block."""
    escrow = world.contracts(PAYERS[0]).escrow
    escrow.thaw(world.node, ALL)
    world.anvil.rpc("evm_increaseTime", escrow.thaw_period_s() + 1)
    world.mine(FINALITY_DEPTH)
    world.sync()
    cancel = escrow.thaw(world.node, 0)
    world.mine()
    world.sync()
    return int(cancel["blockNumber"])


def test_a_reorg_that_drops_a_thaw_cancel_never_lets_the_payer_withdraw_what_it_was_charged(
        settlement_world: SettlementWorld) -> None:
    world = settlement_world
    cancel_block = thaw_out_then_cancel(world)
    charged = serve(world)  # the cancel is two blocks deep, not final
    world.anvil.rpc("anvil_reorg", world.w3.eth.block_number - cancel_block + 1, [])  # drops the cancel
    world.sync()
    escrow = world.contracts(PAYERS[0]).escrow
    escrow.withdraw(world.node)  # the thaw is back, and ended long ago
    world.mine()
    world.sync()
    assert escrow.account(escrow.client.address, world.node).balance == 0
    assert settle(world) == charged  # the node collected every fee it charged


def test_a_thaw_cancel_frees_the_escrow_once_final(settlement_world: SettlementWorld) -> None:
    world = settlement_world
    thaw_out_then_cancel(world)
    with pytest.raises(InsufficientEscrow, match="not final"):
        world.pay(0, 0, world.adapter_ids[0], FEE, validity_s=LONG)
    world.mine(FINALITY_DEPTH)
    world.sync()
    assert serve(world) == FEE
    assert settle(world) == FEE


def test_a_thaw_started_in_a_block_not_final_yet_counts_at_once(settlement_world: SettlementWorld) -> None:
    world = settlement_world
    assert serve(world) == FEE  # never thawed: served
    world.contracts(PAYERS[0]).escrow.thaw(world.node, ALL - FEE)
    world.sync()
    with pytest.raises(InsufficientEscrow):  # the thaw is one block deep: it counts already
        world.pay(0, 0, world.adapter_ids[0], FEE, validity_s=LONG)
