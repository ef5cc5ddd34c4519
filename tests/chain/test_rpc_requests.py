"""A view call of the node's web3 connection is one RPC request: the chain id web3 checks before every
eth_call is asked once per connection. Real anvil.

The cost without this: web3's validation middleware asked `eth_chainId` twice before every eth_call, so
each view the worker, the API and the CLI read cost three requests against the operator's RPC quota.
"""

from __future__ import annotations

from typing import Any

import pytest
from eth_account import Account

from node.chain.anvil import Anvil
from node.chain.contract_client import web3_for
from node.chain.contracts import Contracts
from node.chain.deploy import deploy_all

pytestmark = pytest.mark.chain
NUM_READS = 10


def test_a_view_call_is_one_request(anvil: Anvil) -> None:
    me = Account.from_key(anvil.keys[0]).address
    dep = deploy_all(anvil.rpc_url, anvil.keys[0], guardian=me, treasury=me, protocol_bps=0, node_bps=0,
                     thaw_period_s=3_600, challenge_period_s=0)
    w3 = web3_for(anvil.rpc_url)
    settlement = Contracts.connect(w3, dep).settlement
    sessions = w3.provider._request_session_manager  # type: ignore[attr-defined]
    post, posts = sessions.make_post_request, []

    def counted(*args: Any, **kwargs: Any) -> Any:
        posts.append(args)
        return post(*args, **kwargs)

    sessions.make_post_request = counted
    assert [settlement.last_epoch(me) for _ in range(NUM_READS)] == [0] * NUM_READS
    assert len(posts) == NUM_READS, f"{len(posts)} requests for {NUM_READS} reads"  # was 3 per read
