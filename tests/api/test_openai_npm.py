"""A JavaScript dApp: the official `openai` npm client (vouchers signed with viem in a fetch wrapper)
against a live node: models, chat on an adapter, a completion and a streamed chat on the base model,
each answered with a receipt the node signed and charged exactly on the lane."""

from __future__ import annotations

import json
import shutil
import subprocess
from collections.abc import Iterator
from pathlib import Path

import pytest

from node.chain.contracts import EMPTY_LINEAGE_HASH
from node.client.payer import Payer, verify_receipt
from node.toolchain import REPO_ROOT, node_script_env
from tests.api.test_models import BASE_COMPLETION_PRICE, BASE_PROMPT_PRICE, COMPLETION_PRICE, PROMPT_PRICE, base_node
from tests.fixtures.paid_node import PaidNode

pytestmark = pytest.mark.chain
SCRIPT = Path(__file__).with_name("openai_npm.mjs")
LANE = 11


@pytest.fixture(scope="module")
def node(tiny_model: Path, tiny_adapters: object, tmp_path_factory: pytest.TempPathFactory) -> Iterator[PaidNode]:
    yield from base_node(tiny_model, tiny_adapters, tmp_path_factory)


def _run_dapp(node: PaidNode) -> dict[str, object]:
    runtime = shutil.which("node")
    assert runtime, "node (npm's runtime) is needed for this test"
    env = {**node_script_env(), "NODE_URL": node.base_url, "PAYER_KEY": node.payer_keys[0],
           "ADAPTER": str(node.adapter_id), "BASE": "tiny-base", "LANE": str(LANE)}
    done = subprocess.run([runtime, str(SCRIPT)], env=env, cwd=REPO_ROOT, capture_output=True, text=True,
                          timeout=180, check=False)
    assert done.returncode == 0, done.stderr
    return dict(json.loads(done.stdout))


def test_the_openai_npm_client_pays_for_chat_completions_and_streams(node: PaidNode) -> None:
    seen = _run_dapp(node)
    payer = Payer(node.payer_keys[0], node.base_url)
    assert [m["id"] for m in seen["models"]] == ["tiny-base", str(node.adapter_id)]  # type: ignore[index]
    assert all(m["object"] == "model" for m in seen["models"])  # type: ignore[attr-defined]
    assert seen["retrieved"] == "tiny-base" and seen["missing"] == 404
    fees = 0
    for part, prices in (("chat", (PROMPT_PRICE, COMPLETION_PRICE)), ("completion", (BASE_PROMPT_PRICE,
                         BASE_COMPLETION_PRICE)), ("stream", (BASE_PROMPT_PRICE, BASE_COMPLETION_PRICE))):
        answer = seen[part]
        receipt, usage = answer["receipt"], answer["usage"]  # type: ignore[index]
        assert answer["text"], part  # type: ignore[index]
        assert verify_receipt(receipt, payer.info.domain) == payer.info.node
        assert int(receipt["fee"]) == prices[0] * usage["prompt_tokens"] + prices[1] * usage["completion_tokens"]
        assert receipt["completionTokens"] == usage["completion_tokens"]
        fees += int(receipt["fee"])
    assert seen["stream"]["receipt"]["lineageHash"] == "0x" + EMPTY_LINEAGE_HASH.hex()  # type: ignore[index]
    assert int(payer.channel(LANE)["chargedTotal"]) == fees
