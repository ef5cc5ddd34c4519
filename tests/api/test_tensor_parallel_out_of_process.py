"""A paid node whose engine core splits the model over 2 tensor-parallel ranks (`loranode api
--engine-process --tensor-parallel-size 2`: the settings the CLI sets): a paid completion is answered
by the split model, token for token as one device answers it, and charged for what it answered."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import pytest

from node.client.payer import Payer
from node.engine import EngineConfig, LLMEngine, SamplingParams
from node.engine.core_client import CoreClient
from tests.api.test_models import COMPLETION_PRICE, PROMPT_PRICE, base_node
from tests.engine.test_tp_shapes import _tp_workers
from tests.fixtures.models import TinyAdapters
from tests.fixtures.paid_node import PaidNode

pytestmark = [pytest.mark.chain, pytest.mark.slow]
PROMPT = "The river runs past"


@pytest.fixture(scope="module")
def node(tiny_model: Path, tiny_adapters: TinyAdapters, tmp_path_factory: pytest.TempPathFactory,
         ) -> Iterator[PaidNode]:
    yield from base_node(tiny_model, tiny_adapters, tmp_path_factory, engine_process=True, tensor_parallel_size=2)


def test_a_paid_completion_is_answered_by_the_split_model_as_one_device_answers(
        node: PaidNode, tiny_model: Path, tiny_adapters: TinyAdapters) -> None:
    engine = node.local.services.engine.engine  # type: ignore[union-attr]
    assert isinstance(engine, CoreClient) and len(_tp_workers(engine.pids()[0])) == 1  # type: ignore[arg-type]
    one = LLMEngine(EngineConfig(model_path=tiny_model))
    one.add_adapter("sea-r8", tiny_adapters.paths["sea-r8"])
    expected = one.generate([PROMPT], SamplingParams(max_tokens=8, temperature=0), ["sea-r8"])[0]
    payer = Payer(node.payer_keys[0], node.base_url)
    answer = payer.openai(lane=1).completions.create(model=str(node.adapter_id), prompt=PROMPT, max_tokens=8,
                                                     temperature=0)
    assert answer.choices[0].text == expected.text
    usage, fee = answer.usage, int(answer.model_extra["receipt"]["fee"])
    assert usage.prompt_tokens == len(expected.prompt_token_ids) and usage.completion_tokens == len(expected.token_ids)
    assert fee == PROMPT_PRICE * usage.prompt_tokens + COMPLETION_PRICE * usage.completion_tokens
    assert int(payer.channel(1)["chargedTotal"]) == fee
