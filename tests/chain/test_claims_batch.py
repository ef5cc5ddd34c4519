"""The guardian's amend reads every leaf's `claimed` in a few JSON-RPC batches, not one call per leaf.
Real anvil, real Settlement.

The cost without this: `check_claims_kept` read `claimed(node, account)` one RPC request at a time, so an
amend of a node with thousands of payees cost thousands of round trips (and a rate-limited RPC refused it).
"""

from __future__ import annotations

from collections import Counter
from typing import Any

import pytest
from eth_account import Account
from web3 import Web3

from node.chain.anvil import Anvil
from node.chain.contracts import Contracts
from node.chain.deploy import deploy_all
from node.settlement.amendment import check_claims_kept
from node.settlement.epoch_builder import rewards_tree

pytestmark = pytest.mark.chain
NUM_PAYEES = 1_200


class CountingProvider(Web3.HTTPProvider):
    """An HTTP provider that counts the requests it sends (a batch is one)."""

    requests: Counter[str]

    def make_request(self, method: Any, params: Any) -> Any:
        self.requests[str(method)] += 1
        return super().make_request(method, params)

    def make_batch_request(self, requests: Any) -> Any:
        self.requests["batch"] += 1
        return super().make_batch_request(requests)


def test_checking_the_claims_of_a_thousand_payees_takes_a_few_requests(anvil: Anvil) -> None:
    keys = anvil.keys
    me = Account.from_key(keys[0]).address
    dep = deploy_all(anvil.rpc_url, keys[0], guardian=me, treasury=me, protocol_bps=0, node_bps=0,
                     thaw_period_s=3_600, challenge_period_s=0)
    provider = CountingProvider(anvil.rpc_url)
    provider.requests = Counter()
    settlement = Contracts.connect(Web3(provider), dep).settlement
    leaves = {Account.create().address: i + 1 for i in range(NUM_PAYEES)}
    tree = rewards_tree(leaves, me)
    provider.requests.clear()
    check_claims_kept(settlement, me, tree)
    assert sum(provider.requests.values()) <= 4, provider.requests  # was 1,201 eth_calls (and 2,402 eth_chainId)

