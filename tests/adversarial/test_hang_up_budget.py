"""A funded payer that hangs up before its first token is charged nothing and its hold is released, so the
same escrow pays for the next try: repeated, it kept the node's grammar compile threads busy for free and
an honest payer's structured request waited behind its compiles (a 400 past the 5 s compile limit, or a
429 for want of a place in flight). Each such hang-up now spends from a budget (node/api/hang_up_budget.py);
many funded addresses share one. Live node, the compile slowed, a small budget that never refills."""

from __future__ import annotations

import threading
import time
from collections.abc import Iterator

import pytest

from node.client.payer import Payer
from tests.adversarial.test_stream_hang_up_before_start import _chat, _send
from tests.fixtures.paid_node import PaidNode, _fund
from tests.fixtures.slow_compile import slow_compiles, wait_ended

pytestmark = pytest.mark.chain
COMPILE_S, BURST = 1.0, 2
ATTACKER, MANY, PLAIN = 9, (10, 11, 12, 13), 14  # anvil dev keys no other role of the paid node uses
TOKEN = 10**18


@pytest.fixture(scope="module")
def node(paid_node: PaidNode) -> PaidNode:
    for who in (ATTACKER, *MANY, PLAIN):
        _fund(paid_node.local, who, 1_000 * TOKEN)
    paid_node.local.wait_for_mirror()
    return paid_node


@pytest.fixture
def slow_budget(node: PaidNode) -> Iterator[None]:
    """Every compile takes COMPILE_S longer; the budget: BURST hang-ups, shared and per buyer, no refill."""
    with slow_compiles(node, COMPILE_S, BURST):
        yield


def _was_charged(payer: Payer, lane: int) -> bool:
    """Whether the lane's request was answered and charged after all (its answer ended before the node saw
    its client leave), so no free hang-up."""
    return int(payer.channel(lane)["chargedTotal"]) > 0


def _served_in(node: PaidNode, payer: Payer, tag: str, lane: int) -> float:
    """Seconds until a structured (plain) request is answered, retrying while the node is full (429)."""
    started = time.monotonic()
    while (resp := _send(node, payer, _chat(node, tag, stream=False), lane)) is not None \
            and resp.status_code == 429 and time.monotonic() - started < 30:
        time.sleep(0.1)
    assert resp is not None and resp.status_code == 200, resp.text if resp is not None else "no answer"
    return time.monotonic() - started


def test_a_payer_hanging_up_during_its_compiles_never_starves_an_honest_payer(node: PaidNode,
                                                                             slow_budget: None) -> None:
    honest = Payer(node.payer_keys[0], node.base_url)
    attacker = Payer(node.local.anvil.keys[ATTACKER], node.base_url)
    calm = _served_in(node, honest, "calm", 300)
    stop, lanes = threading.Event(), iter(range(1_000, 100_000))

    def hang_up_again_and_again() -> None:
        while not stop.is_set():
            lane = next(lanes)
            if _send(node, attacker, _chat(node, f"a{lane}"), lane, read_s=0.3) is not None:
                time.sleep(0.2)  # refused: try again soon

    threads = [threading.Thread(target=hang_up_again_and_again) for _ in range(2)]
    for thread in threads:
        thread.start()
    try:
        time.sleep(5)  # what it got in before its first hang-up counted is compiled by now
        took = [_served_in(node, honest, f"busy{i}", 301 + i) for i in range(3)]
    finally:
        stop.set()
        for thread in threads:
            thread.join()
    assert max(took) <= calm + COMPILE_S, f"an honest request took {took} s during the hang-ups, {calm:.2f} s alone"


def test_many_funded_addresses_hanging_up_share_one_budget(node: PaidNode, slow_budget: None) -> None:
    """Each of 4 funded addresses that never bought hangs up 3 times: 12 free compiles before; now each gets
    its first, the later ones share one bucket (BURST), and the rest are refused up front."""
    admitted, refused, charged = 0, [], 0
    for i, who in enumerate(MANY):
        payer = Payer(node.local.anvil.keys[who], node.base_url)
        for n in range(3):
            lane = 500 + 10 * i + n
            resp = _send(node, payer, _chat(node, f"m{lane}"), lane, read_s=0.3)
            if resp is None:
                admitted += 1
                wait_ended(node)  # its compile ends and its hold is released
                charged += _was_charged(payer, lane)
            else:
                refused.append(resp)
    free = admitted - charged
    assert free <= len(MANY) + BURST, f"{free} of 12 hang-ups made the node compile for free"
    assert refused and all(r.status_code == 429 for r in refused), [r.text for r in refused]
    error = refused[-1].json()["error"]
    assert error["code"] == "hang_up_budget_spent" and int(refused[-1].headers["Retry-After"]) >= 1


def test_plain_requests_given_up_before_their_first_token_spend_the_budget_too(node: PaidNode,
                                                                              slow_budget: None) -> None:
    """The client of a plain structured request gives up during its compile: the hold is released, nothing
    charged, and it is counted like a stream's hang-up (BURST of them, then 429 before any compile)."""
    payer = Payer(node.local.anvil.keys[PLAIN], node.base_url)
    # a buyer from the start: its own bucket all along (a first purchase in the middle, an answer that ended
    # before its client's leaving was seen, would give it a fresh bucket and BURST more free hang-ups)
    _served_in(node, payer, "p-buyer", 699)
    outcomes, expected, free = [], [], 0
    for lane in range(700, 705):
        expected.append(429 if free >= BURST else None)
        resp = _send(node, payer, _chat(node, f"p{lane}", stream=False), lane, read_s=0.3)
        outcomes.append(None if resp is None else resp.status_code)
        if resp is None:
            wait_ended(node)  # its compile ends, its answer is cut and its hold released
            free += not _was_charged(payer, lane)  # on a busy box an answer may end before its client's leaving
    assert outcomes == expected and free <= BURST, (outcomes, free)  # is seen: charged, no free hang-up
