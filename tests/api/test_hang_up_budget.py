"""The hang-up budget's rule on a clock of our own: what honest payers do never meets it, a payer that keeps
hanging up before its first token is refused until its bucket refills, and funded addresses that never buy
share one bucket however many there are. The same sentences hold for the counts of one process and for
those replicas share in Redis (node/api/shared_budget.py)."""

from __future__ import annotations

from collections.abc import Callable

import pytest

from node.api.hang_up_budget import HangUpBudget, HangUpBudgetSpent, HangUps, Ticket
from node.api.shared_budget import SharedCounts, SharedHangUpBudget

Budget = Callable[[list[float]], HangUps]


@pytest.fixture(params=["process", "redis"])
def make(request: pytest.FixtureRequest) -> Budget:
    """A budget on the clock `now[0]`: this process's counts, or the node's in Redis."""

    def process(now: list[float]) -> HangUpBudget:
        return HangUpBudget(rate_per_s=0.1, burst=4, per_payer_rate_per_s=0.05, per_payer_burst=3, window_s=600.0,
                            clock=lambda: now[0])

    if request.param == "process":
        return process
    url = request.getfixturevalue("redis_url")
    return lambda now: SharedHangUpBudget(SharedCounts(url, "loranode:budget:0xnode:", clock=lambda: now[0]),
                                          process(now))


def _hang_ups(budget: HangUps, key: str, n: int) -> int:
    """How many of `n` requests of `key` were admitted, each ending in a hang-up before its first token."""
    admitted = 0
    for _ in range(n):
        try:
            ticket = budget.admit(key)
        except HangUpBudgetSpent:
            continue
        admitted += 1
        ticket.hung_up()
        ticket.done()  # every ending calls it: after a hang-up it gives nothing back
    return admitted


def test_one_hang_up_now_and_then_and_node_faults_never_meet_the_budget(make: Budget) -> None:
    now = [0.0]
    budget = make(now)
    for _ in range(50):  # retries after node faults (503): released, nothing spent
        budget.admit("lane:0xa").done()
    for _ in range(3):  # a hang-up every 10 minutes, answered requests between
        assert _hang_ups(budget, "lane:0xa", 1) == 1
        for _ in range(20):
            budget.admit("lane:0xa").done()
        now[0] += 600.0


def test_a_payer_that_keeps_hanging_up_is_refused_with_retry_after_until_its_bucket_refills(make: Budget) -> None:
    now = [0.0]
    budget = make(now)
    assert _hang_ups(budget, "lane:0xa", 20) == 4
    with pytest.raises(HangUpBudgetSpent) as refused:
        budget.admit("lane:0xa")
    assert refused.value.code == "hang_up_budget_spent" and refused.value.status == 429
    assert refused.value.facts["retry_after_s"] == 10  # the shared bucket's next token
    now[0] += 10.0
    assert _hang_ups(budget, "lane:0xa", 20) == 1
    budget.admit("lane:0xb").done()  # another payer that never hung up is not held back


def test_a_buyer_spends_its_own_bucket_and_others_spending_the_shared_one_never_refuse_it(make: Budget) -> None:
    now = [0.0]
    budget = make(now)
    budget.paid("lane:0xb0")
    assert _hang_ups(budget, "lane:0xa", 20) == 4  # the shared bucket is empty
    assert _hang_ups(budget, "lane:0xb0", 20) == 3  # the buyer's own
    budget.paid("lane:0xb0")  # a purchase renews its standing, not its bucket
    assert _hang_ups(budget, "lane:0xb0", 20) == 0
    now[0] += 20.0  # its bucket refills at its rate
    assert _hang_ups(budget, "lane:0xb0", 20) == 1


def test_many_funded_addresses_that_never_buy_share_one_bucket(make: Budget) -> None:
    """Before, each of 100 funded addresses hung up for free as often as it liked; now each gets its first
    hang-up (it had none), and every later one comes from one shared bucket (4 tokens) for all of them."""
    now = [0.0]
    budget = make(now)
    free = sum(_hang_ups(budget, f"lane:0x{i:040x}", 5) for i in range(100))
    assert free <= 100 + 4, f"100 funded addresses hung up {free} times for free"


def test_others_hang_ups_never_refuse_a_payer_that_has_not_hung_up(make: Budget) -> None:
    """Strangers running the shared bucket into its deepest debt do not keep a new customer out: a payer
    with no hang-up of its own is admitted, whatever the bucket's level."""
    now = [0.0]
    budget = make(now)
    for i in range(50):
        _hang_ups(budget, f"lane:0x{i:040x}", 3)
    with pytest.raises(HangUpBudgetSpent):  # the shared bucket is in debt: a stranger that hung up is refused
        budget.admit(f"lane:0x{0:040x}")
    for i in range(50, 60):
        budget.admit(f"lane:0x{i:040x}").done()  # admitted: no HangUpBudgetSpent


def test_a_request_with_no_payment_has_a_ticket_that_counts_nothing(make: Budget) -> None:
    budget = make([0.0])
    ticket = budget.admit(None)
    ticket.hung_up()
    assert isinstance(ticket, Ticket) and _hang_ups(budget, "lane:0xa", 20) == 4  # nothing was spent

