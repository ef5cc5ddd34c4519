"""The guardian's amend reads every leaf's `claimed` in a few JSON-RPC batches, not one call per leaf.
Real anvil, real Settlement.

The cost without this: `check_claims_kept` read `claimed(node, account)` one RPC request at a time, so an
amend of a node with thousands of payees cost thousands of round trips (and a rate-limited RPC refused it).
"""

from __future__ import annotations

import json
from collections import Counter
from pathlib import Path
from typing import Any

import pytest
from eth_account import Account
from web3 import Web3

from node.chain.anvil import Anvil
from node.chain.contracts import Contracts
from node.chain.deploy import deploy_all
from node.errors import ChainError
from node.settlement.amendment import check_claims_kept
from node.settlement.claims import claim_all
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



def test_a_relayer_reads_what_a_thousand_payees_claimed_in_a_few_requests(anvil: Anvil, tmp_path: Path) -> None:
    """`claim_all` reads each payee's `claimed` before it builds its claims: in batches, not one by one."""
    keys = anvil.keys
    node = Account.from_key(keys[4]).address
    dep = deploy_all(anvil.rpc_url, keys[0], guardian=node, treasury=node, protocol_bps=0, node_bps=0,
                     thaw_period_s=3_600, challenge_period_s=0)
    tree = rewards_tree({Account.create().address: 0 for _ in range(NUM_PAYEES)}, node)  # nothing due to anyone
    Contracts.connect(anvil.rpc_url, dep, keys[4]).settlement.settle(1, [], [], tree.root, 0, bytes(32), 0)
    exported = tmp_path / "epoch-1.json"
    exported.write_text(json.dumps({"node": node, "epochId": 1, "rewards": tree.to_json()}))
    provider = CountingProvider(anvil.rpc_url)
    provider.requests = Counter()
    relayer = Contracts.connect(Web3(provider), dep, keys[5])
    provider.requests.clear()
    assert claim_all(relayer, node, exported).paid == {}
    assert sum(provider.requests.values()) <= 12, provider.requests  # was 3,606: 1,202 eth_call, 2,404 eth_chainId


class BatchRefusingProvider(Web3.HTTPProvider):
    """An RPC that refuses JSON-RPC batches as some hosted ones do: one error object for the whole batch."""

    def make_batch_request(self, requests: Any) -> Any:
        return {"jsonrpc": "2.0", "id": None, "error": {"code": -32600, "message": "batch requests are disabled"}}


def test_an_rpc_that_refuses_batches_is_a_chain_error_naming_it(anvil: Anvil) -> None:
    me = Account.from_key(anvil.keys[0]).address
    dep = deploy_all(anvil.rpc_url, anvil.keys[0], guardian=me, treasury=me, protocol_bps=0, node_bps=0,
                     thaw_period_s=3_600, challenge_period_s=0)
    settlement = Contracts.connect(Web3(BatchRefusingProvider(anvil.rpc_url)), dep).settlement
    with pytest.raises(ChainError, match="batch") as refused:
        settlement.claims_of(me, [me])
    assert "disabled" in refused.value.facts["error"]
