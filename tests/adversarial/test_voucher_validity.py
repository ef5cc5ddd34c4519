"""A client that signs vouchers as long-lived as the node asks is never refused.

The node refuses a new voucher with less than `min_voucher_validity_s` left. It must say so where a
client reads its parameters (`GET /v1/node`), and the SDK must never sign a shorter deadline than it
was asked for (nor than the node requires). Live node on anvil."""

from __future__ import annotations

import json
import time

import httpx
import pytest

from node.client.payer import Payer
from node.protocol.voucher import SignedVoucher, Voucher, request_hash, sign_voucher
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


def test_a_voucher_that_expires_too_soon_is_refused_with_its_own_code(paid_node: PaidNode) -> None:
    """Not `bad_signature`: the signature is good, the deadline is too near for the node to settle it."""
    payer = Payer(paid_node.payer_keys[1], paid_node.base_url)
    body = json.dumps({"model": str(paid_node.adapter_id), "prompt": "the sea", "max_tokens": 2}).encode()
    voucher = Voucher(payer=payer.address, node=payer.info.node, lane=92, cumulative=10**18,
                      request_hash=request_hash(body), deadline=int(time.time()) + _min_validity_s(paid_node) // 2)
    header = SignedVoucher.of(voucher, sign_voucher(paid_node.payer_keys[1], voucher, payer.info.domain)).encode()
    resp = httpx.post(f"{paid_node.base_url}/v1/completions", content=body,
                      headers={"Content-Type": "application/json", "X-Payment": header})
    assert resp.status_code == 401, resp.text
    error = resp.json()["error"]
    assert error["code"] == "voucher_expires_too_soon"
    assert f"needs at least {_min_validity_s(paid_node)} s left" in error["message"]
