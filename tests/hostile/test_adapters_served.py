"""Adapters that lie, registered on chain and requested through the live paid API: each request is
refused with its typed error (422) and charged nothing, and the node keeps serving the honest adapter."""

from __future__ import annotations

import hashlib
import json
import shutil
from pathlib import Path

import httpx
import pytest
from safetensors.torch import load_file, save_file

from node.client.payer import Payer
from node.lora.content_hash import adapter_weights_sha256, base_model_id
from tests.fixtures.paid_node import ADAPTER_OWNER, LINEAGE_WEIGHTS, OWNER_SHARE_BPS, PaidNode

pytestmark = pytest.mark.chain
WEIGHTS, CONFIG = "adapter_model.safetensors", "adapter_config.json"


def _nan_weights(folder: Path) -> None:
    tensors = load_file(folder / WEIGHTS)
    name = next(k for k in tensors if k.endswith("lora_B.weight"))
    tensors[name][0, 0] = float("nan")
    save_file(tensors, folder / WEIGHTS)


def _lying_rank(folder: Path) -> None:
    config = json.loads((folder / CONFIG).read_text())
    config["r"] = 2 * config["r"]
    (folder / CONFIG).write_text(json.dumps(config))


def _register(node: PaidNode, tiny_model: Path, folder: Path, sha: bytes | None = None) -> int:
    owner = node.local.contracts(ADAPTER_OWNER)
    adapter_id = owner.adapters.register(base_model_id(tiny_model), sha or adapter_weights_sha256(folder),
                                         folder.as_uri(), list(node.dataset_ids), list(LINEAGE_WEIGHTS),
                                         OWNER_SHARE_BPS)
    node.local.wait_for_mirror()
    return int(adapter_id)


@pytest.mark.parametrize("lie, code", [(_nan_weights, "adapter_format"), (_lying_rank, "adapter_format"),
                                       (None, "adapter_integrity")])
def test_a_lying_adapter_fails_alone_and_charges_nothing(paid_node: PaidNode, tiny_model: Path, tmp_path: Path,
                                                         lie: object, code: str) -> None:
    folder = tmp_path / "liar"
    shutil.copytree(paid_node.adapter_path, folder)
    if lie is None:  # registered with a hash its bytes do not have (one this node has never seen either:
        # the honest adapter's hash would be served from the node's content-addressed cache, correctly)
        adapter_id = _register(paid_node, tiny_model, folder, hashlib.sha256(b"other bytes").digest())
    else:
        lie(folder)  # type: ignore[operator]
        adapter_id = _register(paid_node, tiny_model, folder)
    payer = Payer(paid_node.payer_keys[0], paid_node.base_url)
    lane = 300 + adapter_id

    body = json.dumps({"model": str(adapter_id), "prompt": "the sea", "max_tokens": 4}).encode()
    resp = httpx.post(f"{paid_node.base_url}/v1/completions", content=body, timeout=60,
                      headers={"Content-Type": "application/json", "X-Payment": payer.payment_header(body, lane)})
    assert resp.status_code == 422 and resp.json()["error"]["code"] == code, resp.text[:300]
    assert payer.channel(lane)["chargedTotal"] == "0"

    honest = payer.openai(lane=lane).completions.create(model=str(paid_node.adapter_id), prompt="the sea",
                                                        max_tokens=4)
    assert honest.choices[0].text and int(payer.channel(lane)["chargedTotal"]) == int(honest.model_extra[
        "receipt"]["fee"])
