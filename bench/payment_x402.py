"""The payment path per request, x402 batch-settlement against our lanes, in the same run (docs/x402.md).

Same database, same node, same chain (anvil with our channel contract at its canonical address): for k
requests each, alternated, the stateless check, the hold and the charge + receipt commit, on a lane
(the baseline) and on an x402 channel (the x402 hold also reads the channel's state from the chain,
three `eth_call`s at most every 2 s, until the indexer mirrors channels). The client side (signing) is
not timed. Each round interleaves the two paths request by request; each path keeps its best p50 over
the rounds (the machine is shared).

    python bench/payment_x402.py [--k 200] [--rounds 3] [--channels 0] [--database-url postgresql+psycopg://...]
Prints a table and writes bench/results/payment_x402.json.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import tempfile
import time
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from eth_account import Account
from sqlalchemy import insert

from node.chain.anvil import Anvil
from node.chain.contract_client import ContractClient
from node.chain.deploy import deploy_all
from node.chain.events import ChainEvent
from node.chain.mirror import Mirror
from node.chain.x402_channels import X402Chain, deploy_router, ensure_channel_contracts, token_domain
from node.db.models import Lane
from node.db.session import make_engine, session_factory, upgrade
from node.payment.ledger import Ledger
from node.payment.pricing import Pricing
from node.payment.service import PaymentService, Usage
from node.payment.x402.book import ChannelBook
from node.payment.x402.service import X402Payments
from node.payment.x402.terms import X402Terms, payment_required
from node.protocol.eip712 import Domain
from node.protocol.receipt import Receipt, SignedReceipt, adapter_id_bytes
from node.protocol.voucher import PaymentHeader, Voucher, request_hash, sign_voucher
from tests.payment.x402.sdk import Payer

PRICE = 10**6
USAGE = Usage(4, 8)
PRICING = Pricing(10, 100, 0)


def _setup(anvil: Anvil, db_url: str) -> tuple[PaymentService, X402Payments, X402Terms, str]:
    keys = anvil.keys
    node_key, payer_key, node = keys[0], keys[5], Account.from_key(keys[0]).address
    deployer = ContractClient(anvil.rpc_url, node_key)
    dep = deploy_all(anvil.rpc_url, node_key, guardian=Account.from_key(keys[1]).address,
                     treasury=Account.from_key(keys[2]).address, protocol_bps=500, node_bps=1000,
                     thaw_period_s=3600, challenge_period_s=0)
    ensure_channel_contracts(deployer)
    router = deploy_router(deployer, node, dep.escrow)
    deployer.transact(deployer.contract("DemoToken3009", dep.token).functions.mint(
        Account.from_key(payer_key).address, 10**24))
    name, version = token_domain(deployer, dep.token)
    terms = X402Terms(dep.chain_id, dep.token, name, version, router, node, 86_400)
    upgrade(db_url)
    factory = session_factory(make_engine(db_url))
    lane_payer = Account.from_key(keys[6]).address.lower()
    event = ChainEvent(dep.chain_id, 1, "0x" + "01" * 32, "0x" + "02" * 32, 0, dep.escrow, "Deposited",
                       {"payer": lane_payer, "node": node.lower(), "amount": 10**24})
    with factory.begin() as s:
        Mirror(dep.chain_id).ingest(s, [event], final_block=1)  # the lane payer's escrow, final
    payments = PaymentService(Ledger(factory, node), Domain(dep.chain_id, dep.settlement), node, PRICING)
    chain = X402Chain(ContractClient(anvil.rpc_url, node_key), router)
    x402 = X402Payments(payments, ChannelBook(factory, node), terms, node_key, chain.channel, chain.deposit,
                        chain_now=chain.now)
    return payments, x402, terms, payer_key


def _other_channels(x402: X402Payments, count: int) -> None:
    """`count` channels charged before, as lanes of the router (what a node with many payers holds)."""
    if count:
        rows = [{"payer": x402.router, "node": x402.payments.node.lower(), "lane": 10_000 + i, "charged_total": 1_000,
                 "last_cumulative": 1_000, "reserved": 0, "updated_at": datetime.now(UTC)} for i in range(count)]
        with x402.ledger.factory.begin() as s:
            s.execute(insert(Lane), rows)


def _receipt(digest: bytes, node: str) -> Any:
    def issue(fee: int) -> SignedReceipt:
        r = Receipt(digest, adapter_id_bytes(1), 1, b"\xab" * 32, USAGE.prompt_tokens, USAGE.completion_tokens,
                    fee, os.urandom(32), 1)
        return SignedReceipt(r, os.urandom(32), b"\x11" * 65, node)
    return issue


def _lane_request(payments: PaymentService, key: str, i: int, charged: list[int]) -> float:
    payer, node, domain = Account.from_key(key).address, payments.node, payments.domain
    body = json.dumps({"prompt": f"p{i}", "n": time.time_ns()}).encode()
    v = Voucher(payer, node, 9, charged[0] + PRICE, request_hash(body), 4_000_000_000)
    header = PaymentHeader(payer, node, 9, v.cumulative, v.request_hash, v.deadline,
                           sign_voucher(key, v, domain)).encode()
    t0 = time.perf_counter()
    checked = payments.check(header, body)
    hold = payments.hold(checked, PRICE)
    total, _ = payments.finish(hold, USAGE, _receipt(checked.digest, node), lambda r: {"receipt": r})
    elapsed = (time.perf_counter() - t0) * 1000
    charged[0] = total
    return elapsed


def _x402_request(x402: X402Payments, required: dict[str, Any], sdk: Payer) -> float:
    header, payment = sdk.pay(required)
    t0 = time.perf_counter()
    hold = x402.hold(x402.check(header), PRICE)
    total, _ = x402.payments.finish(hold, USAGE, _receipt(hold.checked.digest, x402.payments.node),
                                    lambda r: {"receipt": r})
    response = x402.payment_response(hold, total)
    elapsed = (time.perf_counter() - t0) * 1000
    sdk.answered(payment, response, PRICE)
    return elapsed


def _round(payments: PaymentService, x402: X402Payments, terms: X402Terms, sdk: Payer, lane_key: str, k: int,
           charged: list[int]) -> tuple[float, float]:
    """k requests on each path, interleaved one by one (whatever else loads the machine loads both): the
    two p50s in ms."""
    required = payment_required("http://bench/v1/completions", [terms.requirements(PRICE)])
    lane, chan = [], []
    for i in range(k):
        lane.append(_lane_request(payments, lane_key, i, charged))
        chan.append(_x402_request(x402, required, sdk))
    return statistics.median(lane), statistics.median(chan)


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--k", type=int, default=200)
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--database-url", default=None)
    ap.add_argument("--channels", type=int, default=0, help="other x402 channels the node already serves")
    args = ap.parse_args()
    with tempfile.TemporaryDirectory() as tmp, Anvil() as anvil:
        db_url = args.database_url or f"sqlite:///{Path(tmp) / 'bench.db'}"
        payments, x402, terms, payer_key = _setup(anvil, db_url)
        _other_channels(x402, args.channels)
        sdk = Payer(payer_key, anvil.rpc_url, terms.chain_id)
        charged: list[int] = [0]
        _round(payments, x402, terms, sdk, anvil.keys[6], 20, charged)  # the deposit and warm-up: not kept
        rounds = [_round(payments, x402, terms, sdk, anvil.keys[6], args.k, charged) for _ in range(args.rounds)]
    lane_p50, x402_p50 = [r[0] for r in rounds], [r[1] for r in rounds]
    lane, chan = min(lane_p50), min(x402_p50)
    result = {"k": args.k, "rounds": args.rounds, "other_channels": args.channels, "database": db_url.split(":")[0],
              "load": os.getloadavg()[0],
              "lane_check_hold_charge_p50_ms": lane, "x402_check_hold_charge_p50_ms": chan,
              "x402_over_lane": chan / lane, "per_round_ratios": [round(x / y, 3) for y, x in rounds],
              "target_ratio": 1.2}
    print(f"{'path':<10} {'p50 ms (check + hold + charge)':>32}")
    print(f"{'lane':<10} {lane:>32.3f}")
    print(f"{'x402':<10} {chan:>32.3f}   {chan / lane:.2f}x the lane path (target <= 1.2x)")
    out = Path(__file__).resolve().parent / "results" / "payment_x402.json"
    out.write_text(json.dumps(result, indent=2) + "\n")


if __name__ == "__main__":
    main()
