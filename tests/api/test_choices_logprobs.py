"""n choices and logprobs with the official `openai` client, plain and streamed, on both endpoints:
choices by index, usage over all of them, one receipt whose outputHash covers every choice, and
logprobs in OpenAI's shapes that agree between a plain answer, its stream and its idempotent replay."""

from __future__ import annotations

import json
from typing import Any

import httpx
import pytest
from eth_hash.auto import keccak

from node.client.payer import Payer, verify_receipt
from node.protocol.receipt import output_text
from tests.fixtures.paid_node import PaidNode

pytestmark = pytest.mark.chain
PROMPT_PRICE, COMPLETION_PRICE = 10**9, 2 * 10**9
MESSAGES = [{"role": "user", "content": "tell me of the sea"}]


def _payer(node: PaidNode) -> Payer:
    return Payer(node.payer_keys[0], node.base_url)


def _check_receipt(payer: Payer, receipt: dict[str, Any], usage: Any, texts: list[str]) -> None:
    assert verify_receipt(receipt, payer.info.domain) == payer.info.node
    assert receipt["completionTokens"] == usage.completion_tokens
    assert int(receipt["fee"]) == PROMPT_PRICE * usage.prompt_tokens + COMPLETION_PRICE * usage.completion_tokens
    assert receipt["outputHash"] == "0x" + keccak(output_text(texts).encode()).hex()


def test_chat_n_choices_with_logprobs_plain_and_streamed_agree(paid_node: PaidNode) -> None:
    payer = _payer(paid_node)
    client = payer.openai(lane=80)
    ask = dict(model=str(paid_node.adapter_id), messages=MESSAGES, n=3, max_tokens=6, temperature=1.0, seed=5,
               logprobs=True, top_logprobs=2)
    out = client.chat.completions.create(**ask)
    texts = [c.message.content for c in out.choices]
    assert [c.index for c in out.choices] == [0, 1, 2] and len(set(texts)) > 1  # each choice draws its own
    per_choice = [len(c.logprobs.content) for c in out.choices]
    assert sum(per_choice) == out.usage.completion_tokens
    for choice in out.choices:
        for token in choice.logprobs.content:
            assert len(token.top_logprobs) == 2 and token.top_logprobs[0].logprob >= token.top_logprobs[1].logprob
    _check_receipt(payer, out.model_extra["receipt"], out.usage, texts)

    chunks = list(client.chat.completions.create(**ask, stream=True))
    streamed = ["".join(c.delta.content or "" for ch in chunks for c in ch.choices if c.index == i) for i in range(3)]
    assert streamed == texts  # the same seeds, the same answers
    streamed_lp = [[t.logprob for ch in chunks for c in ch.choices if c.index == i and c.logprobs
                    for t in c.logprobs.content] for i in range(3)]
    plain_lp = [[t.logprob for t in c.logprobs.content] for c in out.choices]
    # equal up to float32 rounding: a batch of another shape may sum in another order
    assert [pytest.approx(lp, abs=1e-4) for lp in plain_lp] == streamed_lp
    last = chunks[-1]
    assert sorted(c.finish_reason for c in last.choices) == ["length"] * 3
    _check_receipt(payer, last.model_extra["receipt"], last.usage, texts)


def test_completions_logprobs_and_text_offsets_plain_stream_and_replay(paid_node: PaidNode) -> None:
    payer = _payer(paid_node)
    client = payer.openai(lane=81)
    ask = dict(model=str(paid_node.adapter_id), prompt="the sea", n=2, max_tokens=8, temperature=0, logprobs=3)
    out = client.completions.create(**ask)
    for choice in out.choices:
        lp = choice.logprobs
        assert len(lp.tokens) == len(lp.token_logprobs) == len(lp.top_logprobs) == 8
        assert lp.text_offset == [sum(len(t) for t in lp.tokens[:i]) for i in range(8)]
        assert all(max(top.values()) == pytest.approx(lp_) for top, lp_ in zip(lp.top_logprobs, lp.token_logprobs,
                                                                                strict=True))  # greedy
    first, second = out.choices[0].logprobs, out.choices[1].logprobs  # greedy: two equal answers
    assert first.tokens == second.tokens and first.token_logprobs == pytest.approx(second.token_logprobs, abs=1e-4)
    chunks = list(client.completions.create(**ask, stream=True))
    tokens = [t for ch in chunks for c in ch.choices if c.index == 0 and c.logprobs for t in c.logprobs.tokens]
    assert tokens == out.choices[0].logprobs.tokens
    _check_receipt(payer, chunks[-1].model_extra["receipt"], chunks[-1].usage, [c.text for c in out.choices])

    body = json.dumps({**ask, "stream": True}).encode()
    header = payer.payment_header(body, 82)
    answers = []
    for _ in range(2):  # the answer, then its idempotent replay from the stored body
        with httpx.stream("POST", f"{paid_node.base_url}/v1/completions", content=body, timeout=60,
                          headers={"X-Payment": header, "Content-Type": "application/json"}) as resp:
            events = [json.loads(line[6:]) for line in resp.iter_lines() if line.startswith("data: {")]
        answers.append([[t for e in events for c in e["choices"] if c["index"] == i and c["logprobs"]
                         for t in c["logprobs"]["tokens"]] for i in range(2)])
        assert events[-1]["usage"]["completion_tokens"] == 16
    assert answers[0] == answers[1] == [out.choices[0].logprobs.tokens] * 2
