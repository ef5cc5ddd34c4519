"""An x402 world on a chain of its own (per module): the loranode contracts on an ERC-3009 token, the channel
contracts at their canonical addresses, the node's router and a funded payer."""

from __future__ import annotations

import threading
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from typing import Any

import pytest
from web3 import Web3

from node.chain.anvil import Anvil
from node.chain.contract_client import ContractClient
from node.chain.deploy import Deployment, deploy_all
from node.chain.x402_channels import X402Chain, deploy_router, ensure_channel_contracts, token_domain
from node.payment.x402.terms import X402Terms, payment_required
from tests.fixtures.contracts import Roles
from tests.payment.x402.sdk import PRICE


@dataclass(frozen=True)
class X402World:
    terms: X402Terms
    chain: X402Chain  # as the node
    deployer: ContractClient
    dep: Deployment
    rpc_url: str

    def required(self, error: Any = None, amount: int = PRICE) -> dict[str, Any]:
        """The node's 402 for a request of ceiling `amount` (corrective when `error` is an X402Refused)."""
        states = {"channel_state": error.channel_state, "voucher_state": error.voucher_state} if error else {}
        out = payment_required("http://node.test/v1/chat/completions", [self.terms.requirements(amount, **states)])
        if error is not None:
            out["error"] = error.reason
        return out


@pytest.fixture(scope="module")
def anvil() -> Iterator[Anvil]:
    """Not the session chain: tests that wait out thaw periods move its clock ahead of the wall clock,
    and the SDK dates its ERC-3009 authorizations by the wall clock (they would revert as expired)."""
    with Anvil() as chain:
        yield chain


@pytest.fixture(scope="module")
def roles(anvil: Anvil) -> Roles:
    return Roles(*anvil.keys[:8])


@pytest.fixture
def x402_world(anvil: Anvil, roles: Roles) -> X402World:
    deployer = ContractClient(anvil.rpc_url, roles.deployer)
    token, _ = deployer.deploy("DemoToken3009")
    dep = deploy_all(anvil.rpc_url, roles.deployer, guardian=roles.address(roles.guardian),
                     treasury=roles.address(roles.treasury), protocol_bps=500, node_bps=1000, thaw_period_s=3600,
                     challenge_period_s=0, token=token)
    ensure_channel_contracts(deployer)
    node = roles.address(roles.node)
    router = deploy_router(deployer, node, dep.escrow)
    name, version = token_domain(deployer, token)
    deployer.transact(deployer.contract("DemoToken3009", token).functions.mint(roles.address(roles.payer), 10**18))
    terms = X402Terms(dep.chain_id, token, name, version, router, node, 86_400)
    return X402World(terms, X402Chain(ContractClient(anvil.rpc_url, roles.node), router), deployer, dep, anvil.rpc_url)


def at_once_between_blocks(w3: Web3, calls: list[Callable[[], object]]) -> None:
    """Run `calls` on threads at once while the chain mines a block every 2 s, not one per transaction: each
    passes its checks before the first deposit is mined (two replicas, or copies of one request)."""
    w3.provider.make_request("evm_setAutomine", [False])
    w3.provider.make_request("evm_setIntervalMining", [2])
    try:
        threads = [threading.Thread(target=call) for call in calls]
        for t in threads:
            t.start()
        for t in threads:
            t.join(timeout=60)
    finally:
        w3.provider.make_request("evm_setIntervalMining", [0])
        w3.provider.make_request("evm_setAutomine", [True])
