"""The contracts through the Python bindings on a real anvil chain: register, pay, settle, claim."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from eth_account import Account

from node.chain.anvil import Anvil
from node.chain.contracts import ClaimRequest, Contracts, lineage_hash
from node.chain.deploy import Deployment, deploy_all, read_deployment, write_deployment
from node.errors import ChainError
from node.protocol.receipt import LEAF_TYPES, Receipt, adapter_id_bytes
from node.protocol.voucher import SignedVoucher, Voucher, recover_voucher_signer, voucher_digest, voucher_typed_data
from node.settlement.merkle import MerkleTree
from tests.fixtures.contracts import CHALLENGE_PERIOD_S, NODE_BPS, PROTOCOL_BPS, THAW_PERIOD_S, Roles

pytestmark = pytest.mark.chain
REWARD_TYPES = ["address", "uint256"]


def _now(c: Contracts) -> int:
    return int(c.client.w3.eth.get_block("latest")["timestamp"])


def _travel(anvil: Anvil, seconds: int) -> None:
    anvil.rpc("evm_increaseTime", seconds)
    anvil.rpc("evm_mine")


def _signed_voucher(c: Contracts, roles: Roles, lane: int, cumulative: int) -> SignedVoucher:
    """Signed the way a dApp does it: eth-account over the EIP-712 typed data."""
    voucher = Voucher(payer=roles.address(roles.payer), node=roles.address(roles.node), lane=lane,
                      cumulative=cumulative, request_hash=b"\x42" * 32, deadline=_now(c) + 3600)
    typed = voucher_typed_data(voucher, c.settlement.domain())
    signed = Account.sign_typed_data(roles.payer, full_message=typed)
    return SignedVoucher.of(voucher, bytes(signed.signature))


def _fund(c: Contracts, roles: Roles, amount: int) -> Contracts:
    payer = c.as_signer(roles.payer)
    payer.token.mint(payer.client.address, amount)
    payer.escrow.deposit(roles.address(roles.node), amount, payer.token)
    return payer


def test_deploy_writes_a_deployment_file_that_reads_back(chain_deployment: Deployment,
                                                         chain_contracts: Contracts, tmp_path: Path) -> None:
    path = write_deployment(chain_deployment, tmp_path / "deployments")
    assert path.name == "31337.json"
    assert json.loads(path.read_text())["settlement"] == chain_deployment.settlement
    assert read_deployment(path) == chain_deployment
    s = chain_contracts.settlement
    assert (s.protocol_bps(), s.node_bps()) == (PROTOCOL_BPS, NODE_BPS)
    assert s.treasury() == chain_deployment.treasury
    assert chain_contracts.escrow.thaw_period_s() == THAW_PERIOD_S
    assert chain_deployment.from_block == min(chain_deployment.blocks.values())


def test_register_datasets_and_an_adapter_with_its_lineage(chain_contracts: Contracts, roles: Roles) -> None:
    contributor = chain_contracts.as_signer(roles.contributor)
    payout = roles.address(roles.contributor)
    ids = [contributor.datasets.register(bytes([i]) * 32, f"ipfs://data{i}", payout) for i in (1, 2)]
    assert ids == [1, 2]
    contributor.datasets.update(2, "https://mirror/data2", roles.address(roles.relayer))
    assert contributor.datasets.get(2).payout == roles.address(roles.relayer)
    assert contributor.datasets.get(1).content_hash == b"\x01" * 32

    owner = chain_contracts.as_signer(roles.adapter_owner)
    adapter_id = owner.adapters.register(b"\xba" * 32, b"\x5e" * 32, "file:///a", ids, [6000, 4000], 2500)
    info = owner.adapters.get(adapter_id)
    assert (adapter_id, info.owner, info.owner_share_bps) == (1, roles.address(roles.adapter_owner), 2500)
    assert info.lineage_hash == lineage_hash(ids, [6000, 4000])
    assert adapter_id_bytes(adapter_id) == (1).to_bytes(32, "big")
    owner.adapters.deprecate(adapter_id)
    assert owner.adapters.get(adapter_id).is_deprecated


def test_a_revert_raises_chain_error_with_the_custom_error_decoded(chain_contracts: Contracts,
                                                                   roles: Roles) -> None:
    c = chain_contracts
    c.datasets.register(b"\x01" * 32, "u", roles.address(roles.contributor))
    with pytest.raises(ChainError) as bad_weights:
        c.adapters.register(b"\x01" * 32, b"\x02" * 32, "u", [1], [9999], 0)
    assert bad_weights.value.facts == {"error": "WeightsSum", "args": {"sumBps": 9999}}
    with pytest.raises(ChainError) as stranger:
        c.as_signer(roles.relayer).datasets.update(1, "v", roles.address(roles.relayer))
    assert stranger.value.facts["error"] == "NotDatasetOwner"
    assert stranger.value.facts["args"]["caller"] == roles.address(roles.relayer)


def test_pay_settle_and_claim_with_python_proofs(anvil: Anvil, chain_contracts: Contracts,
                                                 roles: Roles) -> None:
    payer = _fund(chain_contracts, roles, 10**18)
    node_address = roles.address(roles.node)
    node = chain_contracts.as_signer(roles.node)
    sv = _signed_voucher(chain_contracts, roles, lane=7, cumulative=3000)
    domain = node.settlement.domain()
    assert node.settlement.voucher_digest(sv.voucher) == voucher_digest(sv.voucher, domain)
    assert recover_voucher_signer(sv.voucher, domain, sv.signature) == roles.address(roles.payer)

    fee = 2500  # the node charged less than the voucher allows; the rest stays with the payer
    payees = [(roles.address(roles.treasury), 125), (node_address, 1250),
              (roles.address(roles.contributor), 1125)]
    rewards = MerkleTree.of(payees, REWARD_TYPES)
    receipt = Receipt(voucher_digest(sv.voucher, domain), adapter_id_bytes(1), 5, b"\x11" * 32, 12, 34, fee,
                      b"\x22" * 32, 1)
    receipts = MerkleTree.of([receipt.leaf()], LEAF_TYPES)
    node.settlement.settle(1, [sv], [fee], rewards.root, fee, receipts.root, 1)

    epoch = node.settlement.epoch(node_address, 1)
    assert (epoch.rewards_root, epoch.rewards_total) == (rewards.root, fee)
    assert (epoch.receipts_root, epoch.receipt_count) == (receipts.root, 1)
    assert node.settlement.collected(roles.address(roles.payer), node_address, 7) == fee
    assert payer.escrow.account(roles.address(roles.payer), node_address).balance == 10**18 - fee
    with pytest.raises(ChainError) as resent:
        node.settlement.settle(1, [sv], [fee], rewards.root, fee, receipts.root, 1)
    assert resent.value.facts["error"] == "EpochOutOfOrder"

    relayer = chain_contracts.as_signer(roles.relayer)
    with pytest.raises(ChainError) as locked:
        relayer.settlement.claim(node_address, 1, payees[2][0], payees[2][1], rewards.proof(2))
    assert locked.value.facts["error"] == "EpochLocked"
    _travel(anvil, CHALLENGE_PERIOD_S)
    for i, (account, amount) in enumerate(payees):
        relayer.settlement.claim(node_address, 1, account, amount, rewards.proof(i))
        assert relayer.token.balance_of(account) == amount
    assert relayer.token.balance_of(relayer.settlement.address) == 0
    with pytest.raises(ChainError) as again:
        relayer.settlement.claim(node_address, 1, payees[0][0], payees[0][1], rewards.proof(0))
    assert again.value.facts["error"] == "NothingToClaim"


def test_second_epoch_collects_the_rest_and_claim_many_pays_the_difference(
        anvil: Anvil, chain_contracts: Contracts, roles: Roles) -> None:
    _fund(chain_contracts, roles, 10**18)
    node = chain_contracts.as_signer(roles.node)
    contributor = roles.address(roles.contributor)
    treasury = roles.address(roles.treasury)
    first = MerkleTree.of([(contributor, 700), (treasury, 300)], REWARD_TYPES)
    none = b"\0" * 32
    node.settlement.settle(1, [_signed_voucher(node, roles, 0, 1000)], [1000], first.root, 1000, none, 3)
    second = MerkleTree.of([(contributor, 1400), (treasury, 600)], REWARD_TYPES)
    # The voucher signs up to 5000, the node collects 1000 more: collected stays below cumulative.
    node.settlement.settle(2, [_signed_voucher(node, roles, 0, 5000)], [1000], second.root, 2000, none, 3)
    _travel(anvil, CHALLENGE_PERIOD_S)
    node_address = node.client.address
    node.settlement.claim(node_address, 1, contributor, 700, first.proof(0))
    claims = [ClaimRequest(node_address, 2, account, amount, tuple(second.proof(i)))
              for i, (account, amount) in enumerate([(contributor, 1400), (treasury, 600)])]
    node.settlement.claim_many(claims)
    node.settlement.claim_many(claims)  # nothing due any more: skipped, no revert
    assert node.token.balance_of(contributor) == 1400
    assert node.settlement.claimed(node_address, treasury) == 600
    assert node.settlement.paid_out(node_address) == node.settlement.rewards_total(node_address) == 2000


def test_thaw_then_withdraw_after_the_thawing_period(anvil: Anvil, chain_contracts: Contracts,
                                                     roles: Roles) -> None:
    payer = _fund(chain_contracts, roles, 1000)
    node_address = roles.address(roles.node)
    payer.escrow.thaw(node_address, 400)
    with pytest.raises(ChainError) as early:
        payer.escrow.withdraw(node_address)
    assert early.value.facts["error"] == "StillThawing"
    _travel(anvil, THAW_PERIOD_S)
    payer.escrow.withdraw(node_address)
    assert payer.token.balance_of(payer.client.address) == 400
    account = payer.escrow.account(payer.client.address, node_address)
    assert (account.balance, account.thawing, account.thaw_end_at) == (600, 0, 0)


def test_deploy_on_an_existing_token_and_guardian_veto(anvil: Anvil, chain_contracts: Contracts,
                                                       roles: Roles) -> None:
    dep = deploy_all(anvil.rpc_url, roles.deployer, guardian=roles.address(roles.guardian),
                     treasury=roles.address(roles.treasury), protocol_bps=0, node_bps=0, thaw_period_s=60,
                     challenge_period_s=600, token=chain_contracts.deployment.token)
    assert dep.token == chain_contracts.deployment.token and "DemoToken" not in dep.blocks
    c = Contracts.connect(anvil.rpc_url, dep, roles.deployer)
    _fund(c, roles, 100)
    node = c.as_signer(roles.node)
    node.settlement.settle(1, [_signed_voucher(node, roles, 0, 100)], [100], b"\x01" * 32, 100, b"\0" * 32, 1)
    with pytest.raises(ChainError) as not_guardian:
        node.settlement.veto(node.client.address, 1)
    assert not_guardian.value.facts["error"] == "NotGuardian"
    c.as_signer(roles.guardian).settlement.veto(node.client.address, 1)
    assert node.settlement.epoch(node.client.address, 1).is_vetoed
    assert node.settlement.first_vetoed_epoch(node.client.address) == 1
    _travel(anvil, CHALLENGE_PERIOD_S)
    assert not node.settlement.is_claimable(node.client.address, 1)
    with pytest.raises(ChainError) as blocked:
        node.settlement.settle(2, [], [], b"\x02" * 32, 100, b"\0" * 32, 0)
    assert blocked.value.facts["error"] == "NodeVetoed"
