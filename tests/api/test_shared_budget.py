"""With several API replicas behind HAProxy (one PostgreSQL, one Redis), the free-work budgets are the
node's, not each replica's: a payer spreading its hang-ups or its unpaid cold loads over the replicas gets
what one replica alone would give it. Two replicas' budgets in one test, on the real Redis."""

from __future__ import annotations

import asyncio

import pytest

from node.api.cold_load import Caller, ColdLoadGate
from node.api.hang_up_budget import HangUpBudget, HangUpBudgetSpent, HangUps
from node.api.shared_budget import SharedColdLoadGate, SharedCounts, SharedHangUpBudget, shared_counts
from node.errors import Overloaded
from node.lora.provider import LoadState

pytestmark = pytest.mark.redis


class Cold:
    def state(self, adapter_id: str) -> LoadState:
        return LoadState.COLD


NOBODY = "redis://127.0.0.1:1/0"  # no Redis listens there


def _hang_up_replica(redis_url: str, node: str = "0xnode") -> HangUps:
    """One replica's budget, as PaymentGate builds it: the node's counts in Redis, its own for when Redis fails."""
    local = HangUpBudget(rate_per_s=0.0, burst=4, per_payer_rate_per_s=0.0, per_payer_burst=3)
    return SharedHangUpBudget(SharedCounts(redis_url, f"loranode:budget:{node}:"), local)


def _cold_load_replica(redis_url: str) -> SharedColdLoadGate:
    local = ColdLoadGate(Cold(), rate_per_s=0.0, burst=0, named_rate_per_s=0.0, named_burst=3,  # type: ignore[arg-type]
                         per_payer=3)
    return SharedColdLoadGate(Cold(), SharedCounts(redis_url, "loranode:budget:0xnode:"), local)  # type: ignore[arg-type]


def _hang_ups(replicas: list[HangUps], key: str, n: int) -> int:
    """How many of `n` requests of `key`, sent to the replicas in turn, were admitted, each then hung up
    before its first token."""
    admitted = 0
    for i in range(n):
        try:
            ticket = replicas[i % len(replicas)].admit(key)
        except HangUpBudgetSpent:
            continue
        admitted += 1
        ticket.hung_up()
    return admitted


def _cold_loads(replicas: list[SharedColdLoadGate], caller: Caller, n: int) -> int:
    admitted = 0
    for i in range(n):
        try:
            asyncio.run(replicas[i % len(replicas)].admit(f"adapter-{i}", caller))
            admitted += 1
        except Overloaded:
            pass
    return admitted


def test_a_payer_hanging_up_on_two_replicas_gets_one_replicas_budget(redis_url: str) -> None:
    alone = _hang_ups([_hang_up_replica(redis_url, "0xalone")], "lane:0xa", 20)  # a node of one replica
    spread = _hang_ups([_hang_up_replica(redis_url), _hang_up_replica(redis_url)], "lane:0xb", 20)
    assert alone == 4 and spread == 4, f"one replica gave {alone} free hang-ups, two gave {spread}"


def test_a_funded_caller_spreading_its_cold_loads_over_two_replicas_gets_one_replicas_budget(redis_url: str) -> None:
    """Callers that have not bought share the named bucket (3): before, each replica had its own."""
    replicas = [_cold_load_replica(redis_url), _cold_load_replica(redis_url)]
    fresh = sum(_cold_loads(replicas, Caller(f"lane:0x{i:040x}", lambda: 1), 4) for i in range(4))
    assert fresh == 3, f"two replicas fetched {fresh} adapters for callers that never bought"


def test_a_buyers_unpaid_cold_loads_on_two_replicas_are_one_budget_and_a_purchase_on_either_renews_it(
        redis_url: str) -> None:
    replicas = [_cold_load_replica(redis_url), _cold_load_replica(redis_url)]
    buyer = Caller("lane:0xb0", lambda: 1)
    replicas[0].paid("lane:0xb0")
    assert _cold_loads(replicas, buyer, 10) == 3
    replicas[1].paid("lane:0xb0")
    assert _cold_loads(replicas, buyer, 10) == 3


def test_a_buyer_that_buys_again_on_the_same_replica_within_seconds_has_its_cold_loads_renewed(
        redis_url: str) -> None:
    """A payer trying adapters in turn, one purchase each, on one replica: each purchase renews its
    budget there, as on an embedded node, however soon it follows the last (before, only the first
    purchase in 5 s reached Redis, and the payer's next loads fell to the free bucket: 429)."""
    replica = _cold_load_replica(redis_url)
    buyer = Caller("lane:0xb1", lambda: 1)
    for _ in range(3):
        replica.paid("lane:0xb1")
        assert _cold_loads([replica], buyer, 4) == 3


def test_an_honest_payers_64_parallel_lanes_on_two_replicas_are_all_admitted_at_once(redis_url: str) -> None:
    """64 streams of one payer that has not hung up, none at its first token yet: all admitted (no 429, no
    wait), and all answered leave the budget whole (its 4 tokens)."""
    replicas = [_hang_up_replica(redis_url), _hang_up_replica(redis_url)]
    tickets = [replicas[i % 2].admit("lane:0xb") for i in range(64)]
    for ticket in tickets:
        ticket.done()
    assert _hang_ups(replicas, "lane:0xb", 20) == 4


def test_with_redis_down_each_replica_serves_honest_payers_and_bounds_hang_ups_on_its_own() -> None:
    """Fails safe for money and for payers alike: the budget of one process each, as before they were shared."""
    replica = _hang_up_replica(NOBODY)
    for _ in range(20):
        replica.admit("lane:0xc").done()
    assert _hang_ups([replica], "lane:0xd", 20) == 4
    gate = _cold_load_replica(NOBODY)
    assert _cold_loads([gate], Caller("lane:0xe", lambda: 1), 8) == 3


def test_a_node_whose_broker_is_redis_shares_its_counts_there_and_an_embedded_node_keeps_them_in_its_process(
        redis_url: str) -> None:
    counts = shared_counts(redis_url, "0xABC")
    assert counts is not None and counts.prefix == "loranode:budget:0xabc:"
    assert shared_counts("sqla+sqlite:///data/broker.db", "0xABC") is None


def test_a_payer_alternating_between_replicas_whose_clocks_differ_gets_one_replicas_budget(redis_url: str) -> None:
    """Each replica stamped the shared bucket with its own clock: the one 60 s ahead refilled 60 s of tokens
    every time it read a stamp of the other (0.1/s: the whole burst), so a payer alternating the two hung up
    without end. Both now count on Redis's clock."""
    now = [1_700_000_000.0]

    def replica(skew_s: float) -> HangUps:
        local = HangUpBudget(rate_per_s=0.1, burst=4, per_payer_rate_per_s=0.05, per_payer_burst=3, window_s=600.0,
                             clock=lambda: now[0] + skew_s)
        return SharedHangUpBudget(SharedCounts(redis_url, "loranode:budget:0xnode:", clock=lambda: now[0] + skew_s),
                                  local)

    assert _hang_ups([replica(0.0), replica(60.0)], "lane:0xf", 40) == 4
