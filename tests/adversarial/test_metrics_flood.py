"""Scraping /metrics, free to anyone, cannot take the node from paying users.

Each scrape read the node's settlement backlog from the database: every receipt of the node joined to its
epoch, and every signed attempt of every transaction the node ever sent (a settle's raw transaction
carries all its vouchers), on a pooled connection. That grows with the node's history, so a stranger
scraping a few at once held the connections and the CPU the holds and charges of paid requests need.
Now the backlog is read at most once per few seconds, whoever scrapes, and a scrape that finds a read
under way answers with the last one. Live node on anvil; the history is written as the transaction
manager leaves it; the scrapes come from a process of their own."""

from __future__ import annotations

from typing import Any

import httpx
import pytest
from sqlalchemy import insert

from node.client.payer import Payer
from node.db.models import TxIntent
from node.db.session import make_engine, session_factory, transaction
from tests.fixtures.flood import fastest_paid_seconds, paid_seconds_during_gets, signed_completions
from tests.fixtures.paid_node import PaidNode

pytestmark = [pytest.mark.chain, pytest.mark.slow]
NUM_INTENTS = 6_000  # transactions the node sent over its life: settles, sweeps, refunds
RAW_BYTES = 16_000  # a settle's signed transaction with its vouchers
NUM_SCRAPING = 32


def _mined(node: str, nonce: int) -> dict[str, Any]:
    attempt = {"tx_hash": "0x" + f"{nonce:064x}", "max_fee_per_gas": "2000000000", "max_priority_fee_per_gas": "1",
               "raw": "0x" + "ab" * RAW_BYTES, "sent_at": "2026-12-01T00:00:00+00:00"}
    return {"key": f"history:{nonce}", "sender": node, "nonce": nonce, "to": node, "data": "0x", "value": 0,
            "gas": 300_000, "state": "mined", "attempts": [attempt, {**attempt, "max_fee_per_gas": "3000000000"}],
            "mined_hash": attempt["tx_hash"], "mined_block": nonce}


def test_a_flood_of_metrics_scrapes_does_not_hold_up_paid_requests(paid_node: PaidNode) -> None:
    payer = Payer(paid_node.payer_keys[0], paid_node.base_url)
    calm = fastest_paid_seconds(paid_node, signed_completions(paid_node, payer, 1_100))
    svc = paid_node.local.services
    assert svc is not None and svc.split is not None
    node = svc.split.node.lower()
    factory = session_factory(make_engine(paid_node.local.settings.resolved_database_url(), pooled=False))
    with transaction(factory) as session:
        for first in range(1_000_000, 1_000_000 + NUM_INTENTS, 500):
            session.execute(insert(TxIntent), [_mined(node, nonce) for nonce in range(first, first + 500)])
    scraped = httpx.get(f"{paid_node.base_url}/metrics", timeout=120)
    assert scraped.status_code == 200 and "loranode_settlement_pending_receipts" in scraped.text
    bumps = [line for line in scraped.text.splitlines() if line.startswith("loranode_tx_fee_bumps_total ")]
    assert bumps and float(bumps[0].split()[1]) >= NUM_INTENTS, "every intent's fee bump is counted"

    headers = signed_completions(paid_node, payer, 1_110)
    flooded = paid_seconds_during_gets(paid_node, headers, [f"{paid_node.base_url}/metrics"], NUM_SCRAPING)
    print(f"paid request alone {calm:.3f} s, during the scrapes {flooded:.3f} s")
    assert flooded < calm + 5.0, f"a paid request took {flooded:.2f} s during a flood of metrics scrapes " \
                                 f"({calm:.2f} s without)"
