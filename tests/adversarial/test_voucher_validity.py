"""A client that signs vouchers as long-lived as the node asks is never refused.

The node refuses a new voucher with less than `min_voucher_validity_s` left. It must say so where a
client reads its parameters (`GET /v1/node`), and the SDK must never sign a shorter deadline than it
was asked for (nor than the node requires). Live node on anvil."""

from __future__ import annotations

import httpx
import pytest

from node.client.payer import Payer
from tests.fixtures.paid_node import PaidNode

pytestmark = pytest.mark.chain


def _min_validity_s(node: PaidNode) -> int:
    return int(httpx.get(f"{node.base_url}/v1/node").json()["minVoucherValiditySeconds"])


def test_the_node_publishes_the_voucher_validity_it_requires(paid_node: PaidNode) -> None:
    assert paid_node.local.services is not None
    assert _min_validity_s(paid_node) == paid_node.local.services.payments.min_validity_s > 0


@pytest.mark.parametrize("validity", ["the node's minimum", "less than the node's minimum"])
def test_an_sdk_client_signing_short_vouchers_is_served(paid_node: PaidNode, validity: str) -> None:
    minimum = _min_validity_s(paid_node)
    payer = Payer(paid_node.payer_keys[1], paid_node.base_url,
                  validity_s=minimum if validity == "the node's minimum" else 1)
    lane = 90 if validity == "the node's minimum" else 91
    for prompt in ("the sea", "the calm sea"):  # the second within the same minute as the first
        out = payer.openai(lane=lane, max_retries=0).completions.create(
            model=str(paid_node.adapter_id), prompt=prompt, max_tokens=2)
        assert int(out.model_extra["receipt"]["fee"]) > 0
