"""A payer with code at its address (an EIP-7702 delegation, or any code) is collected like any payer.

The node accepts ECDSA vouchers only; the contract checks ECDSA first and asks ERC-1271 only when that
fails, so code a payer puts at its address after paying (a delegation to a contract with no
isValidSignature, or code that reverts on every call) cannot make its vouchers fail on chain while the
node's check passed. Found nothing to fix; this pins it. Real anvil (`anvil_setCode`), contracts, indexer,
ledger and settlement."""

from __future__ import annotations

import pytest

from node.db.models import EpochState
from node.settlement.policy import EpochPolicy
from tests.adversarial.settlement_steps import LONG, lost, payer, tick_until
from tests.fixtures.settlement import OPERATOR, SettlementWorld

pytestmark = [pytest.mark.chain, pytest.mark.slow]
FEE = 10**15


def test_code_put_at_payers_addresses_after_they_paid_does_not_stop_their_collection(
        settlement_world: SettlementWorld) -> None:
    world = settlement_world
    for p in range(2):
        world.pay(p, 0, world.adapter_ids[0], FEE, validity_s=LONG)
    token = world.deployment.token.lower().removeprefix("0x")
    world.anvil.rpc("anvil_setCode", payer(world, 0), "0xef0100" + token)  # delegated to a contract without 1271
    world.anvil.rpc("anvil_setCode", payer(world, 1), "0xfe")  # code that reverts on every call
    assert world.w3.eth.get_code(world.w3.to_checksum_address(payer(world, 1))) == b"\xfe"
    tick_until(world, world.service(EpochPolicy(max_age_s=0)), 1, EpochState.FINAL)
    settlement = world.contracts(OPERATOR).settlement
    for p in range(2):
        assert settlement.collected(payer(world, p), world.node, 0) == FEE
    assert lost(world) == []
