"""The node signs receipts only for adapter registrations that can no longer change.

Adapter ids are sequential. A registration the node serves while it is short of final can be dropped
by a reorg, and the next registration then takes its id: the settlement splits the fees of receipts
signed for the first adapter by the newcomer's owner share and lineage (the newcomer's owner and
datasets are paid what the first adapter earned; reproduced on anvil with `anvil_reorg`). So the
node serves, lists and charges for an adapter only once its registration is final. A live node whose
finality depth is far away, then the chain mined past it. Real anvil, contracts, indexer, engine."""

from __future__ import annotations

import json
import os
from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest

from node.client.payer import Payer
from node.devkit.local_node import LocalNode
from node.lora.content_hash import adapter_weights_sha256, base_model_id, dataset_content_hash
from tests.fixtures.database import POSTGRES_ENV
from tests.fixtures.paid_node import ADAPTER_OWNER, CONTRIBUTORS, PAYERS, TOKEN, _fresh_postgres

pytestmark = pytest.mark.chain
FINALITY_DEPTH = 1_000


@pytest.fixture(scope="module")
def unfinal(tiny_model: Path, tiny_adapters: object, tmp_path_factory: pytest.TempPathFactory
            ) -> Iterator[tuple[LocalNode, int]]:
    """A node with one adapter registered and indexed but `FINALITY_DEPTH` blocks short of final."""
    data_dir = tmp_path_factory.mktemp("unfinal")
    db_url = os.environ.get(POSTGRES_ENV)
    local = LocalNode.start_chain(data_dir, database_url=_fresh_postgres(db_url) if db_url else None,
                                  finality_depth=FINALITY_DEPTH, prompt_token_price=10**9,
                                  completion_token_price=2 * 10**9, default_max_tokens=4)
    try:
        text = data_dir / "dataset.txt"
        text.write_text("the sea is calm and blue. " * 4)
        contributor = local.contracts(CONTRIBUTORS[0])
        dataset_id = contributor.datasets.register(dataset_content_hash(text), text.as_uri(),
                                                   contributor.client.address)
        adapter = tiny_adapters.paths["sea-r8"]  # type: ignore[attr-defined]
        adapter_id = local.contracts(ADAPTER_OWNER).adapters.register(
            base_model_id(tiny_model), adapter_weights_sha256(adapter), adapter.as_uri(), [dataset_id], [10_000], 1_000)
        payer = local.contracts(PAYERS[0])
        payer.token.mint(payer.client.address, 10 * TOKEN)
        payer.escrow.deposit(local.contracts(0).client.address, 10 * TOKEN, payer.token)
        local.wait_for_mirror(final=False)
        local.serve(tiny_model)
        yield local, adapter_id
    finally:
        local.stop()


def _ask(local: LocalNode, adapter_id: int, lane: int) -> httpx.Response:
    payer = Payer(local.anvil.keys[PAYERS[0]], local.base_url)
    body = json.dumps({"model": str(adapter_id), "prompt": "the sea", "max_tokens": 2}).encode()
    return httpx.post(f"{local.base_url}/v1/completions", content=body, timeout=60,
                      headers={"X-Payment": payer.payment_header(body, lane), "Content-Type": "application/json"})


def _charged(local: LocalNode, lane: int) -> int:
    return int(Payer(local.anvil.keys[PAYERS[0]], local.base_url).channel(lane)["chargedTotal"])


def test_an_adapter_short_of_final_is_neither_listed_nor_served_nor_charged(unfinal: tuple[LocalNode, int]) -> None:
    local, adapter_id = unfinal
    resp = _ask(local, adapter_id, 0)
    assert resp.status_code == 404, resp.text
    assert resp.json()["error"]["code"] == "adapter_not_found" and "not final" in resp.json()["error"]["message"]
    assert _charged(local, 0) == 0
    assert _adapters_listed(local) == []


def test_the_same_adapter_is_served_once_its_registration_is_final(unfinal: tuple[LocalNode, int]) -> None:
    local, adapter_id = unfinal
    local.anvil.rpc("anvil_mine", hex(FINALITY_DEPTH))
    local.wait_for_mirror(final=False)  # the head, and with it the registration FINALITY_DEPTH deep
    resp = _ask(local, adapter_id, 1)
    assert resp.status_code == 200, resp.text
    assert _charged(local, 1) == int(resp.json()["receipt"]["fee"])
    assert _adapters_listed(local) == [str(adapter_id)]


def _adapters_listed(local: LocalNode) -> list[str]:
    """The adapters GET /v1/models lists (the base model, listed first, has no parent)."""
    return [m["id"] for m in httpx.get(f"{local.base_url}/v1/models").json()["data"] if m["parent"]]
