"""Attacks on the rewards pot, on a real anvil chain through the Python bindings: a node publishes a
fraudulent root, the guardian vetoes it, and the vetoed epoch's funds still reach their payees."""

from __future__ import annotations

import pytest
from eth_account import Account

from node.chain.anvil import Anvil
from node.chain.contracts import ClaimRequest, Contracts
from node.errors import ChainError
from node.protocol.voucher import SignedVoucher, Voucher, voucher_typed_data
from node.settlement.merkle import MerkleTree
from tests.fixtures.contracts import CHALLENGE_PERIOD_S, Roles

pytestmark = pytest.mark.chain
REWARD_TYPES = ["address", "uint256"]
NO_RECEIPTS = b"\0" * 32


def _travel(anvil: Anvil, seconds: int) -> None:
    anvil.rpc("evm_increaseTime", seconds)
    anvil.rpc("evm_mine")


def _voucher(c: Contracts, roles: Roles, cumulative: int) -> SignedVoucher:
    now = int(c.client.w3.eth.get_block("latest")["timestamp"])
    voucher = Voucher(payer=roles.address(roles.payer), node=roles.address(roles.node), lane=0,
                      cumulative=cumulative, request_hash=b"\x42" * 32, deadline=now + 3600)
    signed = Account.sign_typed_data(roles.payer, full_message=voucher_typed_data(voucher, c.settlement.domain()))
    return SignedVoucher.of(voucher, bytes(signed.signature))


def _claims(node: str, epoch_id: int, tree: MerkleTree, leaves: list[tuple[str, int]]) -> list[ClaimRequest]:
    return [ClaimRequest(node, epoch_id, account, amount, tuple(tree.proof(i)))
            for i, (account, amount) in enumerate(leaves)]


def _error(excinfo: pytest.ExceptionInfo[ChainError]) -> str:
    return str(excinfo.value.facts["error"])


def test_a_vetoed_epochs_funds_reach_the_corrected_roots_leaves(anvil: Anvil, chain_contracts: Contracts,
                                                                roles: Roles) -> None:
    payer = chain_contracts.as_signer(roles.payer)
    node = chain_contracts.as_signer(roles.node)
    guardian = chain_contracts.as_signer(roles.guardian)
    relayer = chain_contracts.as_signer(roles.relayer)
    node_address = node.client.address
    payer.token.mint(payer.client.address, 10_000)
    payer.escrow.deposit(node_address, 10_000, payer.token)
    contributor, treasury = roles.address(roles.contributor), roles.address(roles.treasury)

    honest = [(contributor, 700), (treasury, 300)]
    first = MerkleTree.of(honest, REWARD_TYPES)
    node.settlement.settle(1, [_voucher(node, roles, 1000)], [1000], first.root, 1000, NO_RECEIPTS, 1)
    _travel(anvil, CHALLENGE_PERIOD_S)
    relayer.settlement.claim(node_address, 1, contributor, 700, first.proof(0))
    # Epoch 2 collects 500 more under a root that hands the whole pot to the node itself.
    fraud = MerkleTree.of([(node_address, 1500), (treasury, 0)], REWARD_TYPES)
    node.settlement.settle(2, [_voucher(node, roles, 1500)], [500], fraud.root, 1500, NO_RECEIPTS, 1)
    guardian.settlement.veto(node_address, 2)
    _travel(anvil, CHALLENGE_PERIOD_S)

    with pytest.raises(ChainError) as vetoed:
        relayer.settlement.claim(node_address, 2, node_address, 1500, fraud.proof(0))
    assert _error(vetoed) == "EpochIsVetoed"
    with pytest.raises(ChainError) as blocked:
        node.settlement.settle(3, [_voucher(node, roles, 1600)], [100], first.root, 1600, NO_RECEIPTS, 1)
    assert _error(blocked) == "NodeVetoed"
    with pytest.raises(ChainError) as too_much:
        guardian.settlement.amend(node_address, fraud.root, 1501, NO_RECEIPTS, 2)
    assert _error(too_much) == "RewardsTotalMismatch"

    corrected_leaves = [(contributor, 1050), (treasury, 450)]  # cumulative: alice's 700 already paid
    corrected = MerkleTree.of(corrected_leaves, REWARD_TYPES)
    guardian.settlement.amend(node_address, corrected.root, 1500, NO_RECEIPTS, 2)
    assert node.settlement.first_vetoed_epoch(node_address) == 0
    assert not node.settlement.is_claimable(node_address, 2)  # the correction has its own challenge period
    _travel(anvil, CHALLENGE_PERIOD_S)
    relayer.settlement.claim_many(_claims(node_address, 2, corrected, corrected_leaves))

    assert relayer.token.balance_of(contributor) == 1050
    assert relayer.token.balance_of(treasury) == 450
    assert relayer.token.balance_of(node_address) == 0
    assert relayer.token.balance_of(relayer.settlement.address) == 0  # nothing stuck
    assert relayer.settlement.paid_out(node_address) == relayer.settlement.rewards_total(node_address) == 1500
    # The node settles again on top of the corrected epoch.
    node.settlement.settle(3, [_voucher(node, roles, 1600)], [100], first.root, 1600, NO_RECEIPTS, 1)
    assert node.settlement.last_epoch(node_address) == 3
