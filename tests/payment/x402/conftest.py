"""An x402 world on the session anvil: the loranode contracts on an ERC-3009 token, the channel
contracts at their canonical addresses, the node's router, a funded payer; and the SDK as that payer."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import pytest
from eth_account import Account
from x402 import x402ClientSync
from x402.http.utils import encode_payment_signature_header
from x402.mechanisms.evm.batch_settlement.client import BatchSettlementEvmScheme, process_payment_response
from x402.mechanisms.evm.signers import EthAccountSignerWithRPC
from x402.schemas import PaymentRequired

from node.chain.anvil import Anvil
from node.chain.contract_client import ContractClient
from node.chain.deploy import Deployment, deploy_all
from node.chain.x402_channels import X402Chain, deploy_router, ensure_channel_contracts, token_domain
from node.payment.x402.terms import X402Terms, payment_required
from node.payment.x402.wire import Payment, decode_payment, encode_header
from tests.fixtures.contracts import Roles

PRICE = 3_000  # the request's ceiling (accepted.amount)


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


class Payer:
    """The SDK, as an app would use it: the scheme on the node's network, reading the chain by RPC."""

    def __init__(self, key: str, rpc_url: str, chain_id: int) -> None:
        self.scheme = BatchSettlementEvmScheme(EthAccountSignerWithRPC(Account.from_key(key), rpc_url))
        self.client = x402ClientSync().register(f"eip155:{chain_id}", self.scheme)
        self.client.set_spend_controls({"allowed_assets": True, "max_amount_per_payment": "1000000000000000000"})

    def pay(self, required: dict[str, Any]) -> tuple[str, Payment]:
        payload = self.client.create_payment_payload(PaymentRequired.model_validate(required))
        header = encode_payment_signature_header(payload)
        return header, decode_payment(header)

    def answered(self, payment: Payment, response: dict[str, Any], amount: int = PRICE) -> None:
        """What the SDK does with the answer's PAYMENT-RESPONSE."""
        local = {"channel_id": "0x" + payment.voucher.channel_id.hex(), "request_amount": str(amount)}
        if payment.deposit is not None:
            local["deposit_amount"] = str(payment.deposit.amount)
        process_payment_response(self.scheme._storage, {"PAYMENT-RESPONSE": encode_header(response)}.get, local)

    def recover(self, required: dict[str, Any]) -> bool:
        return bool(self.scheme.process_corrective_payment_required(PaymentRequired.model_validate(required)))


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
