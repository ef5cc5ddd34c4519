"""The models a request may name, with the official `openai` client against a live node: the base model
alone is listed, callable by its served name at the base prices, receipted with adapter id 0 and the
empty lineage (its settlement: tests/settlement/test_base_model_settlement.py)."""

from __future__ import annotations

import os
from collections.abc import Iterator
from pathlib import Path

import httpx
import openai
import pytest
from transformers import AutoTokenizer

from node.chain.contracts import EMPTY_LINEAGE_HASH
from node.client.payer import Payer, verify_receipt
from node.devkit.local_node import LocalNode
from tests.fixtures.database import POSTGRES_ENV
from tests.fixtures.paid_node import (
    PaidNode,
    _fresh_postgres,
    build_paid_node,
    register_templated,
)

pytestmark = [pytest.mark.chain]
PROMPT_PRICE, COMPLETION_PRICE = 10**9, 2 * 10**9  # the adapters'
BASE_PROMPT_PRICE, BASE_COMPLETION_PRICE = 3 * 10**9, 7 * 10**8  # one above, one below the adapters'
ADAPTER_TEMPLATE = ("{% for m in messages %}### {{ m['role'] | upper }}: {{ m['content'] }}\n\n{% endfor %}"
                    "{% if add_generation_prompt %}### ASSISTANT: {% endif %}")
HOSTILE_TEMPLATE = "{{ ''.__class__.__mro__[1].__subclasses__() }}"
MESSAGES = [{"role": "system", "content": "be brief"}, {"role": "user", "content": "the sea"}]


def base_node(tiny_model: Path, tiny_adapters: object, tmp_path_factory: pytest.TempPathFactory,
              **serve: object) -> Iterator[PaidNode]:
    """A paid node whose base model is served as "tiny-base" at its own prices (`serve`: more settings)."""
    data_dir = tmp_path_factory.mktemp("models-node")
    db_url = os.environ.get(POSTGRES_ENV)
    local = LocalNode.start_chain(data_dir, database_url=_fresh_postgres(db_url) if db_url else None,
                                  prompt_token_price=PROMPT_PRICE, completion_token_price=COMPLETION_PRICE,
                                  default_max_tokens=16)
    try:
        adapter = tiny_adapters.paths["sea-r8"]  # type: ignore[attr-defined]
        yield build_paid_node(local, tiny_model, adapter, data_dir, served_model_name="tiny-base",
                              base_prompt_token_price=BASE_PROMPT_PRICE,
                              base_completion_token_price=BASE_COMPLETION_PRICE, **serve)
    finally:
        local.stop()


@pytest.fixture(scope="module")
def node(tiny_model: Path, tiny_adapters: object, tmp_path_factory: pytest.TempPathFactory) -> Iterator[PaidNode]:
    yield from base_node(tiny_model, tiny_adapters, tmp_path_factory)


@pytest.fixture(scope="module")
def templated(node: PaidNode, tiny_model: Path, tmp_path_factory: pytest.TempPathFactory) -> tuple[int, int]:
    """(an adapter with its own chat template, an adapter whose template tries to escape the sandbox)."""
    root = tmp_path_factory.mktemp("templated")
    return (register_templated(node, tiny_model, root / "own", ADAPTER_TEMPLATE),
            register_templated(node, tiny_model, root / "hostile", HOSTILE_TEMPLATE))


def _client(node: PaidNode, lane: int, i: int = 0) -> openai.OpenAI:
    return Payer(node.payer_keys[i], node.base_url).openai(lane=lane)  # type: ignore[no-any-return]


def test_the_models_list_the_base_first_and_each_adapter_as_its_child(node: PaidNode) -> None:
    client = _client(node, 0)
    listed = client.models.list().data
    assert [m.id for m in listed][:2] == ["tiny-base", str(node.adapter_id)]
    base, adapter = listed[:2]
    operator = node.local.contracts(0).client.address
    assert base.object == "model" and base.owned_by == operator and base.model_extra["parent"] is None
    assert base.model_extra["prices"]["promptTokenPrice"] == str(BASE_PROMPT_PRICE)
    assert adapter.model_extra["parent"] == "tiny-base" and adapter.owned_by != operator
    assert adapter.model_extra["prices"]["completionTokenPrice"] == str(COMPLETION_PRICE)
    assert client.models.retrieve("tiny-base").id == "tiny-base"
    assert client.models.retrieve(str(node.adapter_id)).model_extra["lineage"]["datasets"]
    for unknown in ("999", "0", "adapter-0", "gpt-4o"):
        with pytest.raises(openai.NotFoundError):
            client.models.retrieve(unknown)


def test_the_base_model_answers_by_name_at_the_base_price_with_an_empty_lineage_receipt(node: PaidNode) -> None:
    payer = Payer(node.payer_keys[0], node.base_url)
    client = payer.openai(lane=1)
    chat = client.chat.completions.create(model="tiny-base", max_tokens=6, temperature=0,
                                          messages=[{"role": "user", "content": "the sea"}])
    text = client.completions.create(model="tiny-base", prompt="the sea is", max_tokens=5, temperature=0)
    for out in (chat, text):
        receipt = out.model_extra["receipt"]
        assert out.model == "tiny-base" and verify_receipt(receipt, payer.info.domain) == payer.info.node
        assert receipt["adapterId"] == "0x" + "00" * 32 and receipt["method"] == 1
        assert receipt["lineageHash"] == "0x" + EMPTY_LINEAGE_HASH.hex()
        usage = out.usage
        assert int(receipt["fee"]) == BASE_PROMPT_PRICE * usage.prompt_tokens + \
            BASE_COMPLETION_PRICE * usage.completion_tokens
    assert int(payer.channel(1)["chargedTotal"]) == sum(int(o.model_extra["receipt"]["fee"]) for o in (chat, text))


def test_quotes_are_per_model_and_cover_either_without_one(node: PaidNode) -> None:
    def max_fee(**params: object) -> int:
        got = httpx.get(f"{node.base_url}/v1/quote", params={"prompt_tokens": 10, "max_tokens": 5, **params})
        return int(got.json()["maxFee"])

    assert max_fee(model="tiny-base") == 10 * BASE_PROMPT_PRICE + 5 * BASE_COMPLETION_PRICE
    assert max_fee(model=str(node.adapter_id)) == 10 * PROMPT_PRICE + 5 * COMPLETION_PRICE
    assert max_fee() == 10 * max(PROMPT_PRICE, BASE_PROMPT_PRICE) + 5 * max(COMPLETION_PRICE, BASE_COMPLETION_PRICE)


def test_an_adapter_is_still_charged_at_the_adapter_price(node: PaidNode) -> None:
    out = _client(node, 2).completions.create(model=str(node.adapter_id), prompt="the sea", max_tokens=3)
    assert int(out.model_extra["receipt"]["fee"]) == PROMPT_PRICE * out.usage.prompt_tokens + \
        COMPLETION_PRICE * out.usage.completion_tokens


def test_a_model_without_a_chat_template_is_refused_for_chat_before_any_hold(node: PaidNode) -> None:
    payer = Payer(node.payer_keys[1], node.base_url)
    body = b'{"model":"tiny-base","max_tokens":4,"messages":[{"role":"user","content":"hi"}]}'
    header = payer.payment_header(body, 3)
    tokenizer = node.local.services.engine.engine.tokenizer  # type: ignore[union-attr]
    template, tokenizer.chat_template = tokenizer.chat_template, None
    try:
        refused = httpx.post(f"{node.base_url}/v1/chat/completions", content=body, timeout=60,
                             headers={"content-type": "application/json", "X-Payment": header})
    finally:
        tokenizer.chat_template = template
    assert refused.status_code == 400 and refused.json()["error"]["code"] == "no_chat_template"
    assert int(payer.channel(3)["chargedTotal"]) == 0
    again = httpx.post(f"{node.base_url}/v1/chat/completions", content=body, timeout=60,
                       headers={"content-type": "application/json", "X-Payment": header})
    assert again.status_code == 200, again.text  # the voucher was never held nor spent


def _prompt_tokens(node: PaidNode, template: str | None) -> int:
    """How many tokens MESSAGES take rendered with `template` (None: the base model's), by transformers."""
    tokenizer = AutoTokenizer.from_pretrained(str(node.local.settings.model_path))
    text = tokenizer.apply_chat_template(MESSAGES, chat_template=template, tokenize=False, add_generation_prompt=True)
    return len(tokenizer(text).input_ids)


def test_an_adapter_with_its_own_chat_template_is_prompted_in_it(node: PaidNode, templated: tuple[int, int]) -> None:
    own, _ = templated
    client = _client(node, 4)
    mine = client.chat.completions.create(model=str(own), messages=MESSAGES, max_tokens=2)  # type: ignore[arg-type]
    base = client.chat.completions.create(model=str(node.adapter_id), messages=MESSAGES,  # type: ignore[arg-type]
                                          max_tokens=2)
    assert mine.usage.prompt_tokens == _prompt_tokens(node, ADAPTER_TEMPLATE) != _prompt_tokens(node, None)
    assert base.usage.prompt_tokens == _prompt_tokens(node, None)  # no template of its own: the base model's


def test_a_hostile_adapter_template_is_refused_for_chat_before_any_hold(node: PaidNode,
                                                                         templated: tuple[int, int]) -> None:
    _, hostile = templated
    payer = Payer(node.payer_keys[1], node.base_url)
    client = payer.openai(lane=6)
    with pytest.raises(openai.BadRequestError) as refused:
        client.chat.completions.create(model=str(hostile), messages=MESSAGES, max_tokens=2)  # type: ignore[arg-type]
    assert refused.value.body["code"] == "chat_template_error"  # type: ignore[index]
    assert int(payer.channel(6)["chargedTotal"]) == 0
    out = client.completions.create(model=str(hostile), prompt="the sea", max_tokens=2)  # its weights still serve
    assert int(payer.channel(6)["chargedTotal"]) == int(out.model_extra["receipt"]["fee"]) > 0
