"""An adapter's own chat template with the engine in a core process of its own: the template is read
where the adapter's files are (the core's store) and carried back to the API, which renders chat with
it; a template that is refused still refuses before any hold. The in-process twins: test_models.py."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import openai
import pytest

from node.client.payer import Payer
from node.engine.core_client import CoreClient
from tests.api.test_models import (
    ADAPTER_TEMPLATE,
    HOSTILE_TEMPLATE,
    MESSAGES,
    _prompt_tokens,
    base_node,
)
from tests.fixtures.paid_node import PaidNode, register_templated

pytestmark = [pytest.mark.chain]


@pytest.fixture(scope="module")
def node(tiny_model: Path, tiny_adapters: object, tmp_path_factory: pytest.TempPathFactory) -> Iterator[PaidNode]:
    yield from base_node(tiny_model, tiny_adapters, tmp_path_factory, engine_process=True)


def test_the_adapters_own_template_crosses_from_the_core_and_a_hostile_one_holds_nothing(
        node: PaidNode, tiny_model: Path, tmp_path: Path) -> None:
    services = node.local.services
    assert services is not None and isinstance(services.engine.engine, CoreClient)  # out of process indeed
    own = register_templated(node, tiny_model, tmp_path / "own", ADAPTER_TEMPLATE)
    hostile = register_templated(node, tiny_model, tmp_path / "hostile", HOSTILE_TEMPLATE)
    payer = Payer(node.payer_keys[0], node.base_url)
    client = payer.openai(lane=1)
    for _ in range(2):  # the second answers from what the API kept of the core's answer
        mine = client.chat.completions.create(model=str(own), messages=MESSAGES, max_tokens=2)  # type: ignore[arg-type]
        assert mine.usage is not None and mine.usage.prompt_tokens == _prompt_tokens(node, ADAPTER_TEMPLATE)
    base = client.chat.completions.create(model=str(node.adapter_id), messages=MESSAGES,  # type: ignore[arg-type]
                                          max_tokens=2)
    assert base.usage is not None and base.usage.prompt_tokens == _prompt_tokens(node, None) != \
        _prompt_tokens(node, ADAPTER_TEMPLATE)
    refused_lane = payer.openai(lane=2)
    with pytest.raises(openai.BadRequestError) as refused:
        refused_lane.chat.completions.create(model=str(hostile), messages=MESSAGES, max_tokens=2)  # type: ignore[arg-type]
    assert refused.value.body["code"] == "chat_template_error"  # type: ignore[index]
    assert int(payer.channel(2)["chargedTotal"]) == 0
