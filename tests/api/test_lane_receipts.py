"""A paying app reconciles its money from the node: `GET /v1/channels/{payer}/{lane}/receipts` (the SDK's
`Payer.receipts`) lists the lane's receipts, newest first, each with the charged total after it, to the
payer only, and the lane's `spendable` is what its escrow has left. Paid with the official `openai`
client on a live node."""

from __future__ import annotations

import httpx
import pytest

from node.chain.receipt_read import HEADER, lane_read_id, sign_read
from node.client.payer import Payer, verify_receipt
from node.errors import NodeRefusal
from tests.fixtures.paid_node import PaidNode

pytestmark = pytest.mark.chain
LANE = 4321


def test_a_payer_lists_what_it_was_charged_on_a_lane_request_by_request(paid_node: PaidNode) -> None:
    payer = Payer(paid_node.payer_keys[0], paid_node.base_url)
    channel = payer.channel(LANE)
    before, spendable = int(channel["chargedTotal"]), int(channel["spendable"])
    client = payer.openai(lane=LANE)
    answers = [client.chat.completions.create(model=str(paid_node.adapter_id), max_tokens=4, temperature=0,
                                              messages=[{"role": "user", "content": f"the sea, {i}"}])
               for i in range(3)]
    got = [a.model_extra["receipt"] for a in answers]  # type: ignore[index]

    listed = Payer(paid_node.payer_keys[0], paid_node.base_url).receipts(LANE)  # an app with no memory
    rows = listed["receipts"]
    assert [r["id"] for r in rows] == [r["id"] for r in reversed(got)] and listed["next"] is None
    assert all(verify_receipt(r, payer.info.domain) == payer.info.node for r in rows)
    assert [r["chargedTotal"] for r in rows] == [r["chargedTotal"] for r in reversed(got)]
    assert int(rows[0]["chargedTotal"]) == before + sum(int(r["fee"]) for r in rows) \
        == int(payer.channel(LANE)["chargedTotal"])
    assert all(int(r["cumulative"]) >= int(r["chargedTotal"]) for r in rows)
    # what the app has left: its escrow less what it was charged (collected on chain or not)
    assert int(payer.channel(LANE)["spendable"]) == spendable - sum(int(r["fee"]) for r in rows)

    first = payer.receipts(LANE, limit=2)
    rest = payer.receipts(LANE, limit=2, before=first["next"])
    assert [r["id"] for r in first["receipts"] + rest["receipts"]] == [r["id"] for r in rows]
    assert rest["next"] is None and "output" not in rows[0]  # the text stays at GET /v1/receipts/{id}
    assert payer.receipts(LANE + 1)["receipts"] == []


def test_a_lanes_receipts_are_refused_to_anyone_but_its_payer(paid_node: PaidNode) -> None:
    payer, stranger = (Payer(k, paid_node.base_url) for k in paid_node.payer_keys[:2])
    url = f"{paid_node.base_url}/v1/channels/{payer.address}/{LANE}/receipts"
    unsigned = httpx.get(url)
    assert unsigned.status_code == 401 and unsigned.json()["error"]["code"] == "read_unauthorized"
    info = payer.info
    foreign = sign_read(stranger.key, stranger.address, lane_read_id(info.node, LANE), info.domain)
    assert httpx.get(url, headers={HEADER: foreign}).status_code == 403
    other_lane = sign_read(payer.key, payer.address, lane_read_id(info.node, LANE + 1), info.domain)
    assert httpx.get(url, headers={HEADER: other_lane}).status_code == 401
    with pytest.raises(NodeRefusal):
        stranger.receipts(LANE, limit=0)
