"""The ledger under attack (SQLite, and PostgreSQL when configured), with a clock the test controls:
every voucher the header parser accepts can be stored, and one escrow is never spent twice."""

from __future__ import annotations

import base64
import json
from datetime import timedelta
from typing import Any

import pytest
from eth_account import Account
from hypothesis import HealthCheck, example, given, settings
from hypothesis import strategies as st
from sqlalchemy import delete
from sqlalchemy.orm import Session, sessionmaker

from node.chain.events import ChainEvent
from node.chain.mirror import Mirror
from node.db.models import Lane, Receipt
from node.db.models import Voucher as VoucherRow
from node.db.session import make_engine, session_factory, upgrade
from node.errors import BadRequest, VoucherConflict
from node.payment.ledger import Ledger
from node.payment.voucher_check import check_voucher
from node.protocol.eip712 import SECP256K1_N, Domain
from node.protocol.receipt import Receipt as ReceiptFields
from node.protocol.receipt import SignedReceipt, adapter_id_bytes
from node.protocol.voucher import UINT256_MAX, Voucher, decode_payment_header, request_hash, sign_voucher

NODE = "0xf39Fd6e51aad88F6F4ce6aB8827279cffFb92266"
DOMAIN = Domain(chain_id=31337, verifying_contract="0x5FbDB2315678afecb367f032d93F642f64180aa3")
PAYER_KEY = "0x59c6995e998f97a5a0044966f0945389dc9e86dae88c7a8412f4603b6b78690d"


class Clock:
    def __init__(self) -> None:
        self.now = 1_700_000_000.0

    def __call__(self) -> float:
        return self.now


def _ledger(db_url: str, deposit: int, **kw: Any) -> tuple[Ledger, sessionmaker[Session]]:
    upgrade(db_url)
    factory = session_factory(make_engine(db_url))
    payer = Account.from_key(PAYER_KEY).address.lower()
    ev = ChainEvent(31337, 1, "0x" + "01" * 32, "0x" + "02" * 32, 0, "0x" + "03" * 20, "Deposited",
                    {"payer": payer, "node": NODE.lower(), "amount": deposit})
    with factory.begin() as s:
        Mirror(31337).ingest(s, [ev], final_block=1)  # a final deposit: spendable
    return Ledger(factory, NODE, **kw), factory


def _wire(key: str, lane: int, cumulative: int, deadline: int, body: bytes) -> str:
    """The X-Payment header a client sends, signed by `key`."""
    v = Voucher(Account.from_key(key).address, NODE, lane, cumulative, request_hash(body), deadline)
    fields = {"payer": v.payer, "node": NODE, "lane": lane, "cumulative": str(cumulative),
              "requestHash": "0x" + v.request_hash.hex(), "deadline": deadline,
              "signature": "0x" + sign_voucher(key, v, DOMAIN).hex()}
    return base64.urlsafe_b64encode(json.dumps(fields).encode()).rstrip(b"=").decode()


def _receipt(n: int, fee: int) -> SignedReceipt:
    receipt = ReceiptFields(bytes(32), adapter_id_bytes(1), 1, b"\xab" * 32, 3, 4, fee, b"\xcd" * 32, 1)
    return SignedReceipt(receipt, n.to_bytes(32, "big"), b"\x11" * 65, NODE)


_ledgers: dict[str, tuple[Ledger, sessionmaker[Session]]] = {}
keys = st.integers(1, SECP256K1_N - 1).map(lambda k: "0x" + k.to_bytes(32, "big").hex())


@settings(max_examples=40, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(key=keys, lane=st.integers(0, 2**32 - 1), cumulative=st.integers(0, UINT256_MAX),
       deadline=st.integers(0, 2**64 - 1))
@example(key=PAYER_KEY, lane=2**32 - 1, cumulative=UINT256_MAX, deadline=2**63 - 1)
@example(key=PAYER_KEY, lane=0, cumulative=0, deadline=2**63)
@example(key=PAYER_KEY, lane=0, cumulative=0, deadline=2**64 - 1)
def test_every_voucher_the_parser_accepts_is_stored_as_sent(db_url: str, key: str, lane: int, cumulative: int,
                                                            deadline: int) -> None:
    """The parser's whole range (uint32 lane, uint256 cumulative, the deadline as far as uint64) against
    the voucher row: a value is refused as a 400 before any work, or stored and read back unchanged."""
    ledger, factory = _ledgers.get(db_url) or _ledgers.setdefault(db_url, _ledger(db_url, deposit=0))
    with factory.begin() as s:  # each example on empty lanes (hypothesis reuses the test's database)
        for table in (Receipt, VoucherRow, Lane):
            s.execute(delete(table))
    body = json.dumps([key, lane, cumulative, deadline]).encode()  # a request of its own each time
    try:
        header = decode_payment_header(_wire(key, lane, cumulative, deadline, body))
    except BadRequest as refused:
        assert "deadline" in refused.message and deadline >= 2**63
        return
    checked = check_voucher(header, body, domain=DOMAIN, node=NODE)
    hold = ledger.reserve(checked, 0)
    assert not isinstance(hold, dict)
    ledger.commit(hold, checked, 0, _receipt(int.from_bytes(checked.digest, "big") % 2**60, 0), lambda t: {"t": t})
    with factory() as s:
        row = s.get(VoucherRow, checked.digest_hex)
        assert row is not None and (row.lane, row.cumulative, row.deadline) == (lane, cumulative, deadline)


def _checked(lane: int, cumulative: int, body: bytes) -> Any:
    header = decode_payment_header(_wire(PAYER_KEY, lane, cumulative, 4_000_000_000, body))
    return check_voucher(header, body, domain=DOMAIN, node=NODE)


def test_a_hold_past_its_ttl_can_no_longer_be_charged_so_one_escrow_is_spent_once(db_url: str) -> None:
    clock = Clock()
    ledger, _ = _ledger(db_url, deposit=100, reservation_ttl_s=60, clock=clock)
    slow = _checked(0, 100, b"slow")
    slow_hold = ledger.reserve(slow, 100)  # all of the escrow, held
    clock.now += 61  # past the TTL, the hold no longer counts: another lane may hold the same escrow
    fast = _checked(1, 100, b"fast")
    ledger.commit(ledger.reserve(fast, 100), fast, 100, _receipt(1, 100), lambda t: {"t": t})
    with pytest.raises(VoucherConflict, match="expired"):
        ledger.commit(slow_hold, slow, 100, _receipt(2, 100), lambda t: {"t": t})
    payer = Account.from_key(PAYER_KEY).address
    assert ledger.channel(payer, 0).charged_total + ledger.channel(payer, 1).charged_total == 100


def test_a_hold_is_chargeable_until_its_ttl_less_the_clock_skew(db_url: str) -> None:
    clock = Clock()
    ledger, _ = _ledger(db_url, deposit=100, reservation_ttl_s=60, clock=clock)
    checked = _checked(0, 100, b"in time")
    hold = ledger.reserve(checked, 100)
    clock.now += ledger.max_hold.total_seconds() - 1
    assert ledger.max_hold < timedelta(seconds=60)
    assert ledger.commit(hold, checked, 70, _receipt(1, 70), lambda t: {"t": t})[0] == 70


def test_the_same_voucher_held_by_another_api_process_is_409_until_that_hold_expires(db_url: str) -> None:
    """Two API processes on one PostgreSQL (or two lives of one on SQLite): a voucher in flight on one is
    never generated a second time by the other; only its own process, restarted, may take it over."""
    clock = Clock()
    ledger_a, factory = _ledger(db_url, deposit=1_000, reservation_ttl_s=60, clock=clock, instance="host-a:8000")
    ledger_b = Ledger(factory, NODE, reservation_ttl_s=60, clock=clock, instance="host-b:8000")
    checked = _checked(0, 100, b"twice")
    ledger_a.reserve(checked, 100)
    with pytest.raises(VoucherConflict, match="in flight"):
        ledger_b.reserve(checked, 100)
    restarted_a = Ledger(factory, NODE, reservation_ttl_s=60, clock=clock, instance="host-a:8000")
    hold = restarted_a.reserve(checked, 100)  # its first life died: the retry needs no TTL wait
    clock.now += 61
    ledger_b.reserve(checked, 100)  # past the TTL, any process may take it over
    with pytest.raises(VoucherConflict, match="expired or was taken over"):
        restarted_a.commit(hold, checked, 50, _receipt(1, 50), lambda t: {"t": t})
