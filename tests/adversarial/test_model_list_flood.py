"""Listing the node's models, free to anyone, cannot take the database from paying users.

Anyone may register adapters for the node's base model (gas only), and GET /v1/models and /v1/adapters
read every one of them from the database on every call, two queries each, on the API's request threads:
a stranger keeping a few dozen listings in flight held every pooled database connection, and the holds
and charges of paid requests waited for one. Now one caller at a time reads the listing, and the adapters
(two queries, whatever their number) only once the indexer has moved the mirror. Live node on anvil; the
listings come from a process of their own."""

from __future__ import annotations

from pathlib import Path

import httpx
import pytest

from node.client.payer import Payer
from node.lora.content_hash import adapter_weights_sha256, base_model_id
from tests.fixtures.flood import fastest_paid_seconds, paid_seconds_during_gets, signed_completions
from tests.fixtures.paid_node import ADAPTER_OWNER, LINEAGE_WEIGHTS, OWNER_SHARE_BPS, PaidNode

pytestmark = [pytest.mark.chain, pytest.mark.slow]
NUM_ADAPTERS = 300
NUM_LISTING = 48


def test_a_flood_of_model_listings_does_not_hold_up_paid_requests(paid_node: PaidNode, tiny_model: Path) -> None:
    owner = paid_node.local.contracts(ADAPTER_OWNER)
    base, weights = base_model_id(tiny_model), adapter_weights_sha256(paid_node.adapter_path)
    for _ in range(NUM_ADAPTERS):
        owner.adapters.register(base, weights, paid_node.adapter_path.as_uri(), list(paid_node.dataset_ids),
                                list(LINEAGE_WEIGHTS), OWNER_SHARE_BPS)
    paid_node.local.wait_for_mirror()
    listed = httpx.get(f"{paid_node.base_url}/v1/models", timeout=60).json()["data"]
    assert len(listed) == NUM_ADAPTERS + 2  # the base model and the node's adapter too
    payer = Payer(paid_node.payer_keys[0], paid_node.base_url)
    calm = fastest_paid_seconds(paid_node, signed_completions(paid_node, payer, 800))
    headers = signed_completions(paid_node, payer, 810)
    listings = [f"{paid_node.base_url}/v1/{what}" for what in ("adapters", "models")]
    flooded = paid_seconds_during_gets(paid_node, headers, listings, NUM_LISTING)
    print(f"paid request alone {calm:.3f} s, during the listings {flooded:.3f} s")
    # it shares the API's CPU with the listings (1.2 s at a load of 25 on 2 CPUs), never waits for their
    # database connections (23 s on main)
    assert flooded < calm + 5.0, f"a paid request took {flooded:.2f} s during a flood of model listings " \
                                 f"({calm:.2f} s without)"
