"""The lane quote must cover every request the node then accepts, and the SDK signs no more than the
request it pays for can cost (the node's exact quote of its body), unless its caller set a budget.

`GET /v1/channels/{payer}/{lane}` answers a quote "for a request of up to the whole context", and the
SDK (and the viem example in docs/api.md) signs `chargedTotal + quote.maxFee`. A quote lower than
what the node then holds for a request refuses an honest client with 402. Live node on anvil."""

from __future__ import annotations

import dataclasses
import json
import time

import httpx
import openai
import pytest

from node.client.payer import Payer
from node.errors import PaymentError
from node.payment.pricing import Pricing
from node.protocol.voucher import SignedVoucher, Voucher, request_hash, sign_voucher
from tests.fixtures.paid_node import PaidNode

pytestmark = pytest.mark.chain
PROMPT_ROOM = 32  # more tokens than the short prompts below take, chat template included


def _client(node: PaidNode, lane: int) -> tuple[Payer, object]:
    payer = Payer(node.payer_keys[1], node.base_url)  # no budget: signs chargedTotal + the channel's quote
    return payer, payer.openai(lane=lane, max_retries=0)


def test_a_client_signing_the_lane_quote_gets_a_long_completion(paid_node: PaidNode) -> None:
    payer, client = _client(paid_node, 70)
    max_tokens = payer.info.max_model_len - PROMPT_ROOM
    out = client.completions.create(model=str(paid_node.adapter_id), prompt="the sea is",  # type: ignore[attr-defined]
                                    max_tokens=max_tokens, stop=[" ", "."])
    fee = int(out.model_extra["receipt"]["fee"])
    assert int(payer.channel(70)["chargedTotal"]) == fee


def test_a_client_signing_the_lane_quote_gets_a_long_chat_answer(paid_node: PaidNode) -> None:
    payer, client = _client(paid_node, 71)
    max_tokens = payer.info.max_model_len - PROMPT_ROOM
    out = client.chat.completions.create(model=str(paid_node.adapter_id),  # type: ignore[attr-defined]
                                         messages=[{"role": "user", "content": "the sea"}],
                                         max_completion_tokens=max_tokens, stop=[" ", "."])
    assert int(payer.channel(71)["chargedTotal"]) == int(out.model_extra["receipt"]["fee"])


def test_the_lane_quote_covers_the_costliest_request_that_fits(paid_node: PaidNode) -> None:
    """Whatever split of the context between prompt and answer: the quote is never below its max fee."""
    payer = Payer(paid_node.payer_keys[1], paid_node.base_url)
    length = payer.info.max_model_len
    quote = payer.channel(72)["quote"]
    prices = (int(quote["promptTokenPrice"]), int(quote["completionTokenPrice"]))
    costliest = max(max(prices[0] * (length - m) + prices[1] * m for m in (1, length - 1)), int(quote["minFee"]))
    assert int(quote["maxFee"]) >= costliest
    with pytest.raises(openai.BadRequestError):  # and nothing larger is accepted: max_tokens past the context
        _client(paid_node, 72)[1].completions.create(model=str(paid_node.adapter_id),  # type: ignore[attr-defined]
                                                     prompt="the sea", max_tokens=length)


def _signed_post(node: PaidNode, path: str, body: bytes, lane: int, cumulative: int, deadline: int) -> httpx.Response:
    payer = Payer(node.payer_keys[1], node.base_url)
    voucher = Voucher(payer=payer.address, node=payer.info.node, lane=lane, cumulative=cumulative,
                      request_hash=request_hash(body), deadline=deadline)
    header = SignedVoucher.of(voucher, sign_voucher(node.payer_keys[1], voucher, payer.info.domain)).encode()
    return httpx.post(f"{node.base_url}{path}", content=body, timeout=120,
                      headers={"Content-Type": "application/json", "X-Payment": header})


@pytest.mark.parametrize(("path", "request_body"), [
    ("/v1/completions", {"prompt": "the sea is", "max_tokens": 3}),
    ("/v1/chat/completions", {"messages": [{"role": "user", "content": "the sea"}], "max_completion_tokens": 3}),
], ids=["completion", "chat"])
def test_the_quote_of_a_body_is_exactly_what_the_node_holds_for_it(paid_node: PaidNode, path: str,
                                                                    request_body: dict[str, object]) -> None:
    """A voucher one unit short of `chargedTotal + maxFee` is refused, and one for exactly that is served."""
    lane = 73 if "chat" in path else 74
    body = json.dumps({"model": str(paid_node.adapter_id), **request_body}).encode()
    payer = Payer(paid_node.payer_keys[1], paid_node.base_url)
    quote = httpx.post(f"{paid_node.base_url}/v1/quote{path.removeprefix('/v1')}", content=body,
                       params={"payer": payer.address, "lane": lane}).json()
    assert quote["maxTokens"] == 3 and quote["promptTokens"] > 1
    charged, max_fee, deadline = int(quote["chargedTotal"]), int(quote["maxFee"]), int(time.time()) + 3_600
    assert max_fee == quote["promptTokens"] * 10**9 + 3 * 2 * 10**9  # the paid node's prices
    short = _signed_post(paid_node, path, body, lane, charged + max_fee - 1, deadline)
    assert short.status_code == 402 and short.json()["error"]["code"] == "insufficient_escrow", short.text
    exact = _signed_post(paid_node, path, body, lane, charged + max_fee, deadline)
    assert exact.status_code == 200, exact.text


def test_the_sdk_signs_what_the_request_can_cost_not_the_whole_context(paid_node: PaidNode) -> None:
    payer, client = _client(paid_node, 75)
    before = int(payer.channel(75)["chargedTotal"])
    out = client.completions.create(model=str(paid_node.adapter_id), prompt="the sea is",  # type: ignore[attr-defined]
                                    max_tokens=4)
    prompt_tokens = int(out.model_extra["receipt"]["promptTokens"])
    channel = payer.channel(75)
    assert int(channel["lastCumulative"]) == before + prompt_tokens * 10**9 + 4 * 2 * 10**9
    assert int(channel["chargedTotal"]) == before + int(out.model_extra["receipt"]["fee"])


def test_the_sdk_serves_max_tokens_up_to_the_models_room(paid_node: PaidNode) -> None:
    payer, client = _client(paid_node, 76)
    prompt_tokens = int(httpx.post(f"{paid_node.base_url}/v1/quote/completions", json={
        "model": str(paid_node.adapter_id), "prompt": "the sea", "max_tokens": 1}).json()["promptTokens"])
    room = payer.info.max_model_len - prompt_tokens
    out = client.completions.create(model=str(paid_node.adapter_id), prompt="the sea",  # type: ignore[attr-defined]
                                    max_tokens=room, stop=[" ", "."])
    assert int(payer.channel(76)["lastCumulative"]) == prompt_tokens * 10**9 + room * 2 * 10**9
    assert int(out.model_extra["receipt"]["fee"]) > 0


def test_a_budget_caps_what_the_sdk_signs(paid_node: PaidNode) -> None:
    """The caller's budget is the most a voucher adds: a request that may cost more is refused, not
    signed for more than the caller said."""
    budget = 60 * 10**9
    payer = Payer(paid_node.payer_keys[1], paid_node.base_url, budget=budget)
    client = payer.openai(lane=77, max_retries=0)
    out = client.completions.create(model=str(paid_node.adapter_id), prompt="the sea", max_tokens=2)
    assert int(payer.channel(77)["lastCumulative"]) == budget
    charged = int(out.model_extra["receipt"]["chargedTotal"])
    with pytest.raises(openai.APIStatusError) as refused:
        client.completions.create(model=str(paid_node.adapter_id), prompt="the sea", max_tokens=100)
    assert refused.value.status_code == 402 and "does not cover" in refused.value.message
    assert int(payer.channel(77)["lastCumulative"]) == budget and int(payer.channel(77)["chargedTotal"]) == charged


def test_the_sdk_signs_nothing_for_a_quote_above_the_published_prices(paid_node: PaidNode) -> None:
    """A node whose quote disagrees with the prices it publishes (here the payer read them as half of
    what the node charges) gets no voucher: the request fails before anything is signed or sent."""
    payer = Payer(paid_node.payer_keys[1], paid_node.base_url)
    published = payer.info
    assert published.pricing is not None
    halved = Pricing(published.pricing.prompt_token_price // 2, published.pricing.completion_token_price // 2)
    payer._info = dataclasses.replace(published, pricing=halved)
    before = payer.channel(78)
    with pytest.raises(PaymentError, match="quoted more than this request can cost"):
        payer.openai(lane=78, max_retries=0).completions.create(model=str(paid_node.adapter_id), prompt="the sea",
                                                                max_tokens=2)
    assert payer.channel(78) == before


def test_a_small_request_after_a_large_one_on_a_lane_is_served_and_charged_every_time(paid_node: PaidNode) -> None:
    """The node refuses a voucher below one it accepted on the lane; the SDK signs exactly what a request
    can cost, so after a large request it signs just above the lane's last voucher instead, and the same
    small body sent twice is two paid requests, not a replay of one."""
    payer, client = _client(paid_node, 77)
    model = str(paid_node.adapter_id)
    client.completions.create(model=model, prompt="the sea is", max_tokens=300, stop=["."])  # type: ignore[attr-defined]
    charged = int(payer.channel(77)["chargedTotal"])
    fees = []
    for _ in range(2):
        out = client.completions.create(model=model, prompt="the sea", max_tokens=2)  # type: ignore[attr-defined]
        assert out.usage.completion_tokens == 2
        fees.append(int(out.model_extra["receipt"]["fee"]))
    assert int(payer.channel(77)["chargedTotal"]) == charged + sum(fees)
