"""The `x402` Python SDK's batch-settlement client, as a test's payer (a client nobody here wrote)."""

from __future__ import annotations

from typing import Any

from eth_account import Account
from x402 import x402ClientSync
from x402.http.utils import encode_payment_signature_header
from x402.mechanisms.evm.batch_settlement.client import BatchSettlementEvmScheme
from x402.schemas import PaymentRequired

from node.payment.x402.terms import LaneTerms, X402Terms, payment_required
from node.payment.x402.typed import CHANNELS_ADDRESS

PAYER_KEY = "0x" + "5a" * 32
NODE_KEY = "0x" + "b0" * 32
ROUTER = "0x" + "ab" * 20
TOKEN = "0x" + "70" * 20


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
