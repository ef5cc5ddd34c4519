"""The `x402` Python SDK's batch-settlement client, as a test's payer (a client nobody here wrote)."""

from __future__ import annotations

from typing import Any

from eth_account import Account
from x402 import x402ClientSync
from x402.http.utils import encode_payment_signature_header
from x402.mechanisms.evm.batch_settlement.client import BatchSettlementEvmScheme, process_payment_response
from x402.mechanisms.evm.signers import EthAccountSignerWithRPC
from x402.schemas import PaymentRequired

from node.payment.x402.terms import LaneTerms, X402Terms, payment_required
from node.payment.x402.typed import CHANNELS_ADDRESS
from node.payment.x402.wire import Payment, decode_payment, encode_header

PAYER_KEY = "0x" + "5a" * 32
NODE_KEY = "0x" + "b0" * 32
ROUTER = "0x" + "ab" * 20
TOKEN = "0x" + "70" * 20
PRICE = 3_000  # a request's ceiling (accepted.amount) in the chain tests


def node_terms(chain_id: int = 31337, **overrides: Any) -> X402Terms:
    values: dict[str, Any] = {"chain_id": chain_id, "token": TOKEN, "token_name": "loranode demo token",
                              "token_version": "1", "router": ROUTER,
                              "authorizer": Account.from_key(NODE_KEY).address, "withdraw_delay_s": 86_400}
    return X402Terms(**{**values, **overrides})


def lane_terms(chain_id: int = 31337) -> LaneTerms:
    node = Account.from_key(NODE_KEY).address
    return LaneTerms(chain_id, TOKEN, node, CHANNELS_ADDRESS, CHANNELS_ADDRESS)


class SdkPayer:
    """One payer: an SDK client with the batch-settlement scheme on the node's network."""

    def __init__(self, key: str = PAYER_KEY, chain_id: int = 31337) -> None:
        self.account = Account.from_key(key)
        self.scheme = BatchSettlementEvmScheme(self.account)
        self.client = x402ClientSync().register(f"eip155:{chain_id}", self.scheme)
        # our demo token is no default asset of the SDK: allow it, with a cap per payment
        self.client.set_spend_controls({"allowed_assets": True, "max_amount_per_payment": "1000000000000000000"})

    def pay(self, required: dict[str, Any]) -> str:
        """The `PAYMENT-SIGNATURE` header the SDK answers this `PaymentRequired` with."""
        payload = self.client.create_payment_payload(PaymentRequired.model_validate(required))
        return encode_payment_signature_header(payload)


def required_for(terms: X402Terms, amount: int, **states: Any) -> dict[str, Any]:
    accepts = [lane_terms(terms.chain_id).requirements(amount), terms.requirements(amount, **states)]
    return payment_required("http://node.test/v1/chat/completions", accepts)


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
