"""The cold-load gate's budgets on their own clock: a funded caller's unpaid cold loads are bounded per
window and renewed by a purchase; callers that have not bought share one bucket; a table full of
callers gives a newcomer the free bucket only."""

from __future__ import annotations

import asyncio

import pytest

from node.api.cold_load import Caller, ColdLoadGate
from node.errors import Overloaded
from node.lora.provider import LoadState


class Cold:
    def state(self, adapter_id: str) -> LoadState:
        return LoadState.COLD


def _gate(now: list[float], **budget: int) -> ColdLoadGate:
    return ColdLoadGate(Cold(), rate_per_s=0.0, burst=0, window_s=60.0, clock=lambda: now[0],  # type: ignore[arg-type]
                        **budget)


def _admitted(gate: ColdLoadGate, caller: Caller, n: int) -> int:
    ok = 0
    for i in range(n):
        try:
            asyncio.run(gate.admit(f"adapter-{i}", caller))
            ok += 1
        except Overloaded:
            pass
    return ok


def test_a_funded_caller_gets_its_budget_per_window_and_a_purchase_renews_it() -> None:
    now = [0.0]
    gate, rich = _gate(now, per_payer=3), Caller("lane:0xaa", lambda: 10**18)
    assert _admitted(gate, rich, 10) == 3
    gate.paid("lane:0xaa")
    assert _admitted(gate, rich, 10) == 3
    now[0] += 60.0
    assert _admitted(gate, rich, 10) == 3


def test_a_caller_without_escrow_spends_no_budget_and_gets_the_free_bucket() -> None:
    gate = _gate([0.0], per_payer=3)
    with pytest.raises(Overloaded):
        asyncio.run(gate.admit("a", Caller("lane:0xbb", lambda: 0)))
    assert not gate._unpaid


def test_a_full_table_of_callers_leaves_newcomers_the_free_bucket_until_a_window_passes() -> None:
    now = [0.0]
    gate = _gate(now, per_payer=2, max_payers=2)
    for key in ("lane:0x01", "lane:0x02"):
        assert _admitted(gate, Caller(key, lambda: 1), 1) == 1
    newcomer = Caller("lane:0x03", lambda: 1)
    assert _admitted(gate, newcomer, 1) == 0
    now[0] += 60.0  # the others' windows are over: their entries make room
    assert _admitted(gate, newcomer, 1) == 1


def test_quotes_naming_many_funded_payers_share_one_bucket() -> None:
    """A quote's `payer` is a name, not a proof: naming every funded address in turn (8 loads each) buys no
    more than the named callers' bucket, while a payer proven by its voucher that bought keeps its own budget."""
    now = [0.0]
    gate = ColdLoadGate(Cold(), rate_per_s=0.0, burst=0, named_rate_per_s=0.0, named_burst=3,  # type: ignore[arg-type]
                        clock=lambda: now[0])
    named = sum(_admitted(gate, Caller(f"quote:0x{i:040x}", lambda: 1, is_proven=False), 8) for i in range(10))
    assert named == 3
    gate.paid("lane:0x01")
    assert _admitted(gate, Caller("lane:0x01", lambda: 1), 8) == 8


def test_many_funded_payers_that_never_buy_share_one_bucket() -> None:
    """One unit of escrow makes an address a paying caller: before, each of K such addresses (a deposit
    each, never spent) made the node fetch its 8 adapters every window, K x 8 loads for nothing. Callers
    that have not bought here share the named callers' bucket; one that bought keeps its own budget."""
    now = [0.0]
    gate = ColdLoadGate(Cold(), rate_per_s=0.0, burst=0, clock=lambda: now[0])  # type: ignore[arg-type]
    fresh = sum(_admitted(gate, Caller(f"lane:0x{i:040x}", lambda: 1), 8) for i in range(100))
    assert fresh <= 8, f"100 funded addresses that never bought made the node fetch {fresh} adapters"
    gate.paid("lane:0xb0")
    assert _admitted(gate, Caller("lane:0xb0", lambda: 1), 10) == 8
    gate.named.rate_per_s = gate.named.tokens = 0.0
    now[0] += 600.0  # a purchase counts for one window
    assert _admitted(gate, Caller("lane:0xb0", lambda: 1), 10) == 0
