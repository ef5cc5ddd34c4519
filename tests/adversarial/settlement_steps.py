"""Steps and views the settlement attack tests share: tick an epoch to a state, read the chain, the
losses and the published leaves, empty a payer's escrow on chain time, and withdraw it ahead of a settle."""

from __future__ import annotations

from node.db.loss import LossReason, losses
from node.db.models import EpochState, SettlementEpoch
from node.settlement.epoch_builder import cumulative_of
from node.settlement.service import SettlementService
from tests.fixtures.settlement import OPERATOR, PAYERS, TOKEN, SettlementWorld

LONG = 10_000  # seconds of voucher validity that outlive every time jump of the tests


def tick_until(world: SettlementWorld, service: SettlementService, epoch_id: int, wanted: EpochState,
               mine: bool = True) -> None:
    for _ in range(30):
        service.tick()
        if service.state(epoch_id) is wanted:
            return
        if mine:
            world.mine()
            world.sync()
    raise AssertionError(f"epoch {epoch_id} is {service.state(epoch_id)}, not {wanted}")


def on_chain(world: SettlementWorld) -> tuple[int, int, int]:
    """(last epoch, rewards total, tokens held by the Settlement) of the node, as the chain has them."""
    c = world.contracts(OPERATOR)
    return (c.settlement.last_epoch(world.node), c.settlement.rewards_total(world.node),
            c.token.balance_of(c.settlement.address))


def settles(world: SettlementWorld, first_block: int) -> list[tuple[int, int, int, bool]]:
    """(gas used, wei paid for it, vouchers, reverted) of every settle mined since `first_block`."""
    settlement = world.contracts(OPERATOR).settlement
    out = []
    for number in range(first_block, world.w3.eth.block_number + 1):
        for tx in world.w3.eth.get_block(number, full_transactions=True)["transactions"]:
            if tx["to"] == settlement.address:
                receipt = world.w3.eth.get_transaction_receipt(tx["hash"])
                _, args = settlement.contract.decode_function_input(tx["input"])
                out.append((receipt["gasUsed"], receipt["gasUsed"] * receipt["effectiveGasPrice"],
                            len(args["vouchers"]), receipt["status"] == 0))
    return out


def lost(world: SettlementWorld) -> list[tuple[str, int, int, LossReason]]:
    with world.factory() as session:
        return [(r.payer, r.lane, r.amount, r.reason) for r in losses(session, world.node)]


def payer(world: SettlementWorld, index: int) -> str:
    return world.contracts(PAYERS[index]).client.address.lower()


def leaves_total(world: SettlementWorld, epoch_id: int) -> int:
    with world.factory() as session:
        row = session.query(SettlementEpoch).filter_by(epoch_id=epoch_id).one()
        return sum(cumulative_of(row.trees["rewards"]).values())


def empty_escrow(world: SettlementWorld, index: int) -> None:
    """Payer `index` thaws its whole escrow and waits out the thaw period (chain time)."""
    escrow = world.contracts(PAYERS[index]).escrow
    escrow.thaw(world.node, 1_000 * TOKEN)
    world.anvil.rpc("evm_increaseTime", 3_601)
    world.mine()


def withdraw_with_a_high_tip(world: SettlementWorld, key: int) -> None:
    """Anvil account `key` withdraws its escrow with a tip far above a settle's (mined first in its block)."""
    escrow = world.contracts(key).escrow
    world.w3.eth.send_transaction({"from": escrow.client.address, "to": escrow.address, "gas": 200_000,
                                   "data": escrow.contract.encode_abi("withdraw", args=[world.node]),
                                   "maxPriorityFeePerGas": 500 * 10**9, "maxFeePerGas": 1_000 * 10**9})


def withdraw_ahead_of_the_settle(world: SettlementWorld, service: SettlementService, key: int) -> None:
    """The node sends a built epoch's settle, whose preflight passes (the escrow of anvil account `key`
    still holds its money), and that account withdraws ahead of it with a higher tip, in the same block."""
    world.anvil.rpc("evm_setAutomine", False)
    assert service.tick() is EpochState.SUBMITTED  # the preflight passed: the escrow is still there
    withdraw_with_a_high_tip(world, key)
    world.mine()
    world.anvil.rpc("evm_setAutomine", True)
