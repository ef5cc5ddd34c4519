"""The lane quote must cover every request the node then accepts.

`GET /v1/channels/{payer}/{lane}` answers a quote "for a request of up to the whole context", and the
SDK (and the viem example in docs/api.md) signs `chargedTotal + quote.maxFee`. A quote lower than
what the node then holds for a request refuses an honest client with 402. Live node on anvil."""

from __future__ import annotations

import openai
import pytest

from node.client.payer import Payer
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
