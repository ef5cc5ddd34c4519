"""The whole road: paid requests through the live API with the openai client, the settlement worker's
runtime built from the node's Settings, the epoch published by the same API, and a contributor's claim
with the proof fetched from it."""

from __future__ import annotations

import httpx
import pytest
from web3 import Web3

from node.client.payer import Payer
from node.db.models import EpochState
from node.protocol.receipt import LEAF_TYPES
from node.settlement.claims import claim
from node.settlement.merkle import MerkleTree
from node.settlement.policy import EpochPolicy
from node.settlement.runtime import SettlementRuntime
from node.settlement.split import Lineage, SplitParams, split_fee
from tests.fixtures.paid_node import ADAPTER_OWNER, CONTRIBUTORS, LINEAGE_WEIGHTS, OWNER_SHARE_BPS, PAYERS, PaidNode

pytestmark = [pytest.mark.chain, pytest.mark.slow]


def test_paid_requests_settle_and_a_contributor_claims_its_exact_share(paid_node: PaidNode) -> None:
    local, receipts = paid_node.local, []
    for i, lane in ((0, 0), (0, 0), (1, 0), (1, 4)):
        client = Payer(paid_node.payer_keys[i], paid_node.base_url).openai(lane=lane)
        out = client.completions.create(model=str(paid_node.adapter_id), prompt="the sea", max_tokens=4)
        receipts.append(out.model_extra["receipt"])
    service = SettlementRuntime.from_settings(local.settings, EpochPolicy(max_age_s=0)).service
    service.reconcile()
    epoch_id = service.close_epoch()
    assert epoch_id == 1 and service.run_until_final(epoch_id, timeout_s=60) is EpochState.FINAL

    ops = local.contracts(0)
    fees = [int(r["fee"]) for r in receipts]
    assert ops.settlement.rewards_total(ops.client.address) == sum(fees)
    for i, lane in ((0, 0), (1, 0), (1, 4)):
        payer = local.contracts(PAYERS[i]).client.address
        charged = int(httpx.get(f"{paid_node.base_url}/v1/channels/{payer}/{lane}").json()["chargedTotal"])
        assert ops.settlement.collected(payer, ops.client.address, lane) == charged

    contributors = [local.contracts(c).client.address for c in CONTRIBUTORS]
    owner = local.contracts(ADAPTER_OWNER).client.address
    lineage = Lineage(owner, OWNER_SHARE_BPS, tuple(zip(contributors, LINEAGE_WEIGHTS, strict=True)))
    params = SplitParams(local.deployment.treasury, ops.client.address, 500, 1_500)
    expected = sum(split_fee(f, params, lineage)[contributors[1]] for f in fees)
    before = ops.token.balance_of(contributors[1])
    assert claim(local.contracts(0), ops.client.address, contributors[1], paid_node.base_url) == expected > 0
    assert ops.token.balance_of(contributors[1]) - before == expected

    on_chain = ops.settlement.epoch(ops.client.address, epoch_id)
    proof = httpx.get(f"{paid_node.base_url}/v1/receipts/{receipts[2]['id']}/proof").json()
    assert proof["epochId"] == epoch_id and Web3.to_checksum_address(proof["node"]) == ops.client.address
    assert MerkleTree.verify(on_chain.receipts_root, LEAF_TYPES, proof["leaf"],
                             [bytes.fromhex(p[2:]) for p in proof["proof"]])
