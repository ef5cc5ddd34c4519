"""How the mirror row of an epoch follows its events, decoded from real logs on anvil."""

from __future__ import annotations

import pytest
from eth_account import Account
from web3.types import TxReceipt

from node.chain.contracts import Contracts
from node.chain.events import ChainEvent, decode_log
from node.chain.projection import entity_of, replay
from node.protocol.voucher import SignedVoucher, Voucher, voucher_typed_data
from tests.fixtures.contracts import CHALLENGE_PERIOD_S, Roles

pytestmark = pytest.mark.chain


def _events(c: Contracts, receipt: TxReceipt) -> list[ChainEvent]:
    decoded = (decode_log(dict(log), c.client.chain_id) for log in receipt["logs"])
    return [ev for ev in decoded if ev is not None and ev.name.startswith("Epoch")]


def _settle(c: Contracts, roles: Roles, epoch_id: int, total: int) -> TxReceipt:
    now = int(c.client.w3.eth.get_block("latest")["timestamp"])
    voucher = Voucher(payer=roles.address(roles.payer), node=roles.address(roles.node), lane=0, cumulative=total,
                      request_hash=b"\x42" * 32, deadline=now + 3600)
    signed = Account.sign_typed_data(roles.payer, full_message=voucher_typed_data(voucher, c.settlement.domain()))
    sv = SignedVoucher.of(voucher, bytes(signed.signature))
    return c.settlement.settle(epoch_id, [sv], [100], b"\x01" * 32, total, b"\x02" * 32, 1)


def test_an_amended_epoch_row_carries_the_corrected_roots_and_no_veto(chain_contracts: Contracts,
                                                                       roles: Roles) -> None:
    payer, node = chain_contracts.as_signer(roles.payer), chain_contracts.as_signer(roles.node)
    guardian = chain_contracts.as_signer(roles.guardian)
    payer.token.mint(payer.client.address, 1000)
    payer.escrow.deposit(node.client.address, 1000, payer.token)
    events = _events(node, _settle(node, roles, 1, 100)) + _events(node, _settle(node, roles, 2, 200))
    events += _events(node, guardian.settlement.veto(node.client.address, 1))
    vetoed = replay(None, [ev for ev in events if entity_of(ev) == entity_of(events[0])])
    assert vetoed is not None and vetoed["vetoed_block"] is not None

    amended = _events(node, guardian.settlement.amend(node.client.address, b"\x0a" * 32, 200, b"\x0b" * 32, 2))
    assert [ev.name for ev in amended] == ["EpochAmended"]
    assert amended[0].args["droppedThrough"] == 2
    row = replay(vetoed, amended)
    assert row is not None
    assert (row["rewards_root"], row["rewards_total"]) == ("0x" + "0a" * 32, 200)
    assert (row["receipts_root"], row["receipt_count"], row["vetoed_block"]) == ("0x" + "0b" * 32, 2, None)
    amended_at = int(node.client.w3.eth.get_block(amended[0].block_number)["timestamp"])
    assert row["unlock_at"].timestamp() == amended_at + CHALLENGE_PERIOD_S  # a fresh challenge period
