"""A stranger cannot spend the node's RPC quota: vouchers for channels with nothing in them (free to sign,
a fresh channel each time) cost the node a bounded number of chain reads, and a funded payer is served
as before. Before, each such voucher cost one read (the mirror shows nothing, so the hold asked the
chain) and an empty channel was never remembered: one client could make the node ask its RPC as fast as
it could send requests, spending its quota and slowing every paid request that needed a read. The
node's facilitator (`POST /x402/verify`, anyone may call it) reads channels through the same bound: it
read the chain for every voucher it was asked about (three calls each)."""

from __future__ import annotations

import base64
import json
import time
from typing import Any

import pytest
from eth_account import Account

from node.db.session import make_engine, session_factory, upgrade
from node.errors import ChainError, Overloaded
from node.payment.ledger import Ledger
from node.payment.pricing import Pricing
from node.payment.service import Hold, PaymentService
from node.payment.x402.book import ChannelBook
from node.payment.x402.chain_reads import ChannelState
from node.payment.x402.channel_check import EXCEEDS_BALANCE, X402Refused, check_terms
from node.payment.x402.facilitator import Facilitator
from node.payment.x402.service import X402Payments
from node.payment.x402.wire import decode_payment
from node.protocol.eip712 import Domain
from tests.payment.x402.sdk import NODE_KEY, PRICE, SdkPayer, node_terms, required_for


def _voucher_only(header: str) -> str:
    """The SDK's first payment (a deposit) as a bare voucher: a valid signature on a channel left empty."""
    value = json.loads(base64.b64decode(header))
    value["payload"]["type"] = "voucher"
    value["payload"].pop("deposit")
    return base64.b64encode(json.dumps(value).encode()).decode()


def _chain_now() -> int:  # the chain's time, as a chain in step with this machine's clock would tell it
    return int(time.time())


def _x402(db_url: str, chain: Any, mirror: Any) -> X402Payments:
    upgrade(db_url)
    factory = session_factory(make_engine(db_url))
    terms = node_terms()
    node = Account.from_key(NODE_KEY).address
    payments = PaymentService(Ledger(factory, node), Domain(31337, "0x" + "5e" * 20), node, Pricing(10, 20))
    return X402Payments(payments, ChannelBook(factory, node), terms, NODE_KEY, chain, lambda _: None,
                        chain_now=_chain_now, read_mirror=mirror)


def test_a_flood_of_strangers_vouchers_costs_a_bounded_number_of_rpc_reads(db_url: str) -> None:
    honest = _voucher_only(SdkPayer().pay(required_for(node_terms(), PRICE)))
    reads: list[bytes] = []
    honest_channel: list[bytes] = []

    def chain(channel: bytes) -> ChannelState:  # the RPC: every channel but the honest one is empty
        reads.append(channel)
        return ChannelState(balance=10**6) if channel in honest_channel else ChannelState()

    x402 = _x402(db_url, chain, lambda c: ChannelState(balance=10**6) if c in honest_channel  # the mirror
                 else ChannelState())
    honest_channel.append(x402.check(honest).channel_id)
    started = time.monotonic()
    for i in range(60):  # fresh keys, each signing for a channel it never funded
        header = _voucher_only(SdkPayer(f"0x{i + 1:064x}").pay(required_for(node_terms(), PRICE)))
        with pytest.raises(X402Refused) as refused:
            x402.hold(x402.check(header), PRICE)
        assert refused.value.reason == EXCEEDS_BALANCE
    bound = 20 + 5 * (time.monotonic() - started)  # the strangers' bucket: a burst of 20, then 5 reads/s
    assert len(reads) <= bound, f"{len(reads)} RPC reads for 60 strangers' empty channels"
    held = x402.hold(x402.check(honest), PRICE)  # a funded payer is served as before
    assert isinstance(held, Hold)
    x402.payments.cancel(held)


def _verify_body(header: str) -> dict[str, Any]:
    payload = json.loads(base64.b64decode(header))
    return {"x402Version": 2, "paymentPayload": payload, "paymentRequirements": payload["accepted"]}


class _Chain:
    """The channel contract as the facilitator reads it, counting reads: only `funded` has a balance."""

    def __init__(self) -> None:
        self.reads: list[bytes] = []
        self.funded: list[bytes] = []

    def now(self) -> int:
        return _chain_now()

    def channel(self, channel_id: bytes) -> ChannelState:
        self.reads.append(channel_id)
        return ChannelState(balance=10**6) if channel_id in self.funded else ChannelState()


def test_the_facilitators_verify_of_strangers_vouchers_costs_a_bounded_number_of_rpc_reads() -> None:
    chain = _Chain()
    facilitator = Facilitator(node_terms(), chain, lambda token, owner: 0)  # type: ignore[arg-type]
    honest = _voucher_only(SdkPayer().pay(required_for(node_terms(), PRICE)))
    chain.funded.append(check_terms(decode_payment(honest), node_terms()))
    assert facilitator.verify(_verify_body(honest))["isValid"]
    started = time.monotonic()
    for i in range(60):  # fresh keys, each signing for a channel it never funded
        header = _voucher_only(SdkPayer(f"0x{i + 1:064x}").pay(required_for(node_terms(), PRICE)))
        verified = facilitator.verify(_verify_body(header))
        assert not verified["isValid"] and verified["invalidReason"].endswith("channel_not_found"), verified
    bound = 20 + 5 * (time.monotonic() - started)  # the strangers' bucket: a burst of 20, then 5 reads/s
    assert len(chain.reads) <= bound, f"{len(chain.reads)} RPC reads for 60 strangers' empty channels"
    assert facilitator.verify(_verify_body(honest))["isValid"]  # a funded channel verifies as before


def test_strangers_deposits_cost_a_bounded_number_of_rpc_calls_and_never_take_the_deposit_lock(db_url: str) -> None:
    """A deposit from a key that holds no tokens (free to sign) is refused by the chain; the node asked it
    under the lock every deposit shares (one nonce at a time), two calls each, so a flood of them kept
    honest payers' deposits, and the requests waiting on them, queued."""
    simulated: list[bytes] = []
    submitted: list[bytes] = []

    def simulate(payment: Any) -> None:  # the chain: the payer holds nothing, the deposit would revert
        simulated.append(payment.voucher.channel_id)
        raise ChainError("deposit reverted: transfer amount exceeds balance", error="0x")

    def submit(payment: Any) -> None:
        submitted.append(payment.voucher.channel_id)
        simulate(payment)

    upgrade(db_url)
    factory = session_factory(make_engine(db_url))
    node = Account.from_key(NODE_KEY).address
    payments = PaymentService(Ledger(factory, node), Domain(31337, "0x" + "5e" * 20), node, Pricing(10, 20))
    x402 = X402Payments(payments, ChannelBook(factory, node), node_terms(), NODE_KEY, lambda c: ChannelState(), submit,
                        chain_now=_chain_now, simulate_deposit=simulate)
    started = time.monotonic()
    for i in range(60):  # fresh keys, each authorizing a deposit of tokens it does not hold
        header = SdkPayer(f"0x{i + 1:064x}").pay(required_for(node_terms(), PRICE))
        with pytest.raises((X402Refused, Overloaded)):
            x402.hold(x402.check(header), PRICE)
    bound = 20 + 5 * (time.monotonic() - started)  # the strangers' bucket: a burst of 20, then 5 calls/s
    assert len(simulated) <= bound, f"{len(simulated)} RPC calls for 60 strangers' deposits"
    assert submitted == [], "a deposit the chain refuses took the lock every deposit shares"


def test_the_facilitators_verify_of_strangers_deposits_costs_a_bounded_number_of_rpc_calls() -> None:
    chain, balances = _Chain(), []

    def balance_of(token: str, owner: str) -> int:  # the first call a deposit costs: the payer holds nothing
        balances.append(owner)
        return 0

    facilitator = Facilitator(node_terms(), chain, balance_of)  # type: ignore[arg-type]
    started = time.monotonic()
    for i in range(60):  # fresh keys, each authorizing a deposit of tokens it does not hold
        verified = facilitator.verify(_verify_body(SdkPayer(f"0x{i + 1:064x}").pay(required_for(node_terms(), PRICE))))
        assert not verified["isValid"], verified
    bound = 20 + 5 * (time.monotonic() - started)  # reads and deposit checks share the strangers' bucket
    assert len(chain.reads) + len(balances) <= bound, f"{len(chain.reads) + len(balances)} RPC calls for 60 deposits"
