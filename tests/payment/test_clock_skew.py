"""Replicas whose clocks disagree (NTP drift of a minute is real) share one PostgreSQL ledger: a hold's age,
and so whether it still counts, is the same on every replica. Two ledgers in one test, one process clock
running 90 s ahead of the other's, on the real PostgreSQL."""

from __future__ import annotations

import pytest

from node.errors import InsufficientEscrow, VoucherConflict
from node.payment.ledger import Ledger
from node.shared_clock import SharedClock
from tests.payment.test_ledger import NODE, PAYER, Clock, _body, _receipt, _setup, _voucher

SKEW_S = 90.0
TTL_S = 600.0


def _replicas(postgres_url: str, deposit: int) -> tuple[Ledger, Ledger, Clock]:
    factory = _setup(postgres_url, deposit)
    clock = Clock()
    behind = Ledger(factory, NODE, reservation_ttl_s=TTL_S, clock=clock, instance="a:8000")
    ahead = Ledger(factory, NODE, reservation_ttl_s=TTL_S, clock=lambda: clock() + SKEW_S, instance="b:8000")
    for replica in (behind, ahead):  # each read the database's clock when made (node/payment/ledger.py): the
        assert isinstance(replica.clock, SharedClock)  # fake clock's steps below are time passing on both
    return behind, ahead, clock


def test_a_replica_whose_clock_runs_ahead_still_counts_a_live_hold_of_the_other_against_the_escrow(
        postgres_url: str) -> None:
    """A stream still read at 540 s on replica A (within its delivery limit, 565 s) holds the whole escrow; before,
    replica B, 90 s ahead, read the hold as expired and held the same escrow again on another lane: both charged,
    twice the escrow."""
    a, b, clock = _replicas(postgres_url, deposit=100)
    first = _voucher(0, 100)
    held = a.reserve(first, 100)
    clock.now += 540
    assert 540 < a.max_hold.total_seconds()  # A may still charge it
    with pytest.raises(InsufficientEscrow):
        b.reserve(_voucher(1, 100, b"other lane"), 100)
    assert a.commit(held, first, 100, _receipt(1, 100), _body)[0] == 100
    assert a.channel(PAYER, 0).spendable == 0


def test_a_replica_whose_clock_runs_ahead_cannot_take_over_a_lane_the_other_may_still_charge(
        postgres_url: str) -> None:
    """Before, B took the lane over and A's charge for the tokens it had sent was refused: a free answer."""
    a, b, clock = _replicas(postgres_url, deposit=1_000)
    first = _voucher(0, 100)
    held = a.reserve(first, 100)
    clock.now += 540
    with pytest.raises(VoucherConflict, match="in flight"):
        b.reserve(_voucher(0, 200, b"next"), 100)
    assert a.commit(held, first, 100, _receipt(1, 100), _body)[0] == 100


def test_a_hold_expires_for_every_replica_at_once_whatever_their_clocks(postgres_url: str) -> None:
    """The crashed replica's hold is taken over once it is past the TTL, on the clock both read it by."""
    a, b, clock = _replicas(postgres_url, deposit=1_000)
    crashed = _voucher(0, 100)
    a.reserve(crashed, 100)
    clock.now += TTL_S + 1
    b.reserve(_voucher(0, 100, b"after the crash"), 100)
