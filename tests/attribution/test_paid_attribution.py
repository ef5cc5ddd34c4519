"""Method 2 end to end on a live node (anvil, indexed mirror, the engine, the OpenAI client): the
receipt commits to evidence-blended weights, GET /v1/receipts/{id} shows the spans to the payer, and
`loranode attribution verify` agrees with the node and catches tampered or lying receipts (anyone
checks what needs no output text; the payer, with its key, everything).

The engine's answer is made to be in a dataset: a first adapter's greedy answer is written into a
new dataset, and a second adapter with the same weights file (so the same answer) is registered with
that dataset in its lineage."""

from __future__ import annotations

import json
import os
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import httpx
import pytest
from eth_hash.auto import keccak
from typer.testing import CliRunner

from node.api.receipt_issuer import dataset_refs
from node.chain.contracts import lineage_hash
from node.cli import app
from node.client.payer import Payer, verify_receipt
from node.devkit.corpus import TEXT
from node.devkit.local_node import LocalNode
from node.lora.content_hash import adapter_weights_sha256, base_model_id, dataset_content_hash
from node.protocol.receipt import SignedReceipt, receipt_digest, sign_receipt
from tests.fixtures.database import POSTGRES_ENV
from tests.fixtures.paid_node import (
    ADAPTER_OWNER,
    CONTRIBUTORS,
    LINEAGE_WEIGHTS,
    PaidNode,
    _fresh_postgres,
    build_paid_node,
)

pytestmark = pytest.mark.chain
runner = CliRunner()
PROMPT = "the sea is"
COPIED_WEIGHTS = (5_000, 5_000)


@dataclass(frozen=True)
class AttributedNode:
    paid: PaidNode
    copied_adapter: int  # its lineage: (the dataset holding its answer, an unrelated one) at 50/50 %
    copied_datasets: tuple[int, int]
    answer: str
    env: dict[str, str]


def _complete(node: PaidNode, adapter_id: int, lane: int) -> tuple[str, dict]:  # type: ignore[type-arg]
    client = Payer(node.payer_keys[0], node.base_url).openai(lane=lane)
    out = client.completions.create(model=str(adapter_id), prompt=PROMPT, max_tokens=40, temperature=0)
    return out.choices[0].text, out.model_extra["receipt"]


def _wait_for_indexes(node: PaidNode, adapter_id: int) -> None:
    services = node.local.services
    assert services is not None and services.generation.issuer.attributor is not None
    view = services.catalog.resolve(str(adapter_id)).lineage
    assert services.generation.issuer.attributor.wait(dataset_refs(view), timeout_s=120)


@pytest.fixture(scope="module")
def attributed(tiny_model: Path, tiny_adapters: object, tmp_path_factory: pytest.TempPathFactory
               ) -> Iterator[AttributedNode]:
    data_dir = tmp_path_factory.mktemp("attributed-node")
    db_url = os.environ.get(POSTGRES_ENV)
    local = LocalNode.start_chain(data_dir, database_url=_fresh_postgres(db_url) if db_url else None,
                                  prompt_token_price=10**9, completion_token_price=2 * 10**9, default_max_tokens=16)
    try:
        adapter = tiny_adapters.paths["sea-r8"]  # type: ignore[attr-defined]
        paid = build_paid_node(local, tiny_model, adapter, data_dir, attribution_method=2)
        _wait_for_indexes(paid, paid.adapter_id)
        answer, _ = _complete(paid, paid.adapter_id, lane=90)
        holder, other = data_dir / "holds-the-answer.txt", data_dir / "unrelated.txt"
        holder.write_text(TEXT[:400] + "\n" + answer + "\n" + TEXT[400:800])
        other.write_text(TEXT[800:])
        ids = []
        for who, path in zip(CONTRIBUTORS, (holder, other), strict=True):
            c = local.contracts(who)
            ids.append(c.datasets.register(dataset_content_hash(path), path.as_uri(), c.client.address))
        copied = local.contracts(ADAPTER_OWNER).adapters.register(
            base_model_id(tiny_model), adapter_weights_sha256(adapter), adapter.as_uri(), ids, list(COPIED_WEIGHTS),
            2_000)
        local.wait_for_mirror()
        _wait_for_indexes(paid, copied)
        env = {"LORANODE_RPC_URL": local.anvil.rpc_url, "LORANODE_DEPLOYMENT_FILE": str(local.settings.deployment_file),
               "LORANODE_MODEL_PATH": str(tiny_model)}
        yield AttributedNode(paid, copied, (ids[0], ids[1]), answer, env)
    finally:
        local.stop()


def _verify(node: AttributedNode, tmp_path: Path, *args: str) -> tuple[int, str]:
    result = runner.invoke(app, ["attribution", "verify", *args, "--node-url", node.paid.base_url,
                                 "--cache-dir", str(tmp_path / "verifier")], env=node.env)
    return result.exit_code, result.output


def test_an_answer_copied_from_a_dataset_gets_its_evidence_in_the_receipt(attributed: AttributedNode) -> None:
    text, receipt = _complete(attributed.paid, attributed.copied_adapter, lane=1)
    assert text == attributed.answer  # the same weights file answers the same
    payer = Payer(attributed.paid.payer_keys[0], attributed.paid.base_url)
    assert verify_receipt(receipt, payer.info.domain) == payer.info.node
    weights = receipt["attribution"]["weightsBps"]
    assert receipt["method"] == 2 and weights[0] > COPIED_WEIGHTS[0] and sum(weights) == 10_000
    assert receipt["lineageHash"] == "0x" + lineage_hash(attributed.copied_datasets, weights).hex()

    shown = payer.receipt(receipt["id"])  # its text is the payer's: the read is signed
    assert shown["output"] == text and shown["method"] == 2
    evidence = {e["datasetId"]: e for e in shown["attribution"]["evidence"]}
    holder, unrelated = (evidence[d] for d in attributed.copied_datasets)
    assert holder["score"] >= 8 and unrelated["score"] == 0
    span = holder["spans"][0]
    assert span["count"] >= 1 and span["text"] and span["text"] in text
    assert shown["attribution"]["rule"] == 1 and shown["attribution"]["weightsBps"] == weights


def test_an_answer_in_no_dataset_keeps_the_lineage_weights(attributed: AttributedNode) -> None:
    _, receipt = _complete(attributed.paid, attributed.paid.adapter_id, lane=2)
    assert receipt["method"] == 2 and receipt["attribution"]["weightsBps"] == list(LINEAGE_WEIGHTS)
    assert receipt["lineageHash"] == "0x" + lineage_hash(attributed.paid.dataset_ids, LINEAGE_WEIGHTS).hex()


def _key_file(tmp_path: Path, key: str) -> str:
    path = tmp_path / "payer.key"
    path.write_text(key + "\n")
    return str(path)


def test_verify_agrees_with_the_node(attributed: AttributedNode, tmp_path: Path) -> None:
    _, receipt = _complete(attributed.paid, attributed.copied_adapter, lane=3)
    code, out = _verify(attributed, tmp_path, receipt["id"], "--key-file",
                        _key_file(tmp_path, attributed.paid.payer_keys[0]))
    assert code == 0, out
    assert out.startswith("truthful") and "method 2" in out


def test_the_base_model_alone_gets_a_method_1_receipt_with_the_empty_lineage_that_verifies(
        attributed: AttributedNode, tmp_path: Path) -> None:
    paid = attributed.paid
    client = Payer(paid.payer_keys[0], paid.base_url).openai(lane=12)
    out = client.completions.create(model=paid.local.settings.resolved_served_model_name(), prompt=PROMPT,
                                    max_tokens=8, temperature=0)
    receipt = out.model_extra["receipt"]
    assert receipt["method"] == 1 and receipt["adapterId"] == "0x" + "00" * 32 and not receipt.get("attribution")
    assert receipt["lineageHash"] == "0x" + lineage_hash([], []).hex()
    code, text = _verify(attributed, tmp_path, receipt["id"], "--key-file", _key_file(tmp_path, paid.payer_keys[0]))
    assert code == 0 and text.startswith("truthful") and "method 1" in text, text


def test_anyone_else_verifies_all_but_the_text_and_cannot_read_it(attributed: AttributedNode, tmp_path: Path) -> None:
    _, receipt = _complete(attributed.paid, attributed.copied_adapter, lane=8)
    code, out = _verify(attributed, tmp_path, receipt["id"])
    assert code == 0 and out.startswith("consistent") and "evidence was not recomputed" in out, out
    code, out = _verify(attributed, tmp_path, receipt["id"], "--key-file",
                        _key_file(tmp_path, attributed.paid.poor_payer_key))
    assert code == 2 and "403" in out and "only the payer" in out, out


def test_verify_catches_a_tampered_receipt(attributed: AttributedNode, tmp_path: Path) -> None:
    _, receipt = _complete(attributed.paid, attributed.copied_adapter, lane=4)
    shown = httpx.get(f"{attributed.paid.base_url}/v1/receipts/{receipt['id']}").json()
    weights = shown["attribution"]["weightsBps"]
    shown["attribution"]["weightsBps"] = [weights[1], weights[0]]  # weights changed after signing
    path = tmp_path / "tampered.json"
    path.write_text(json.dumps(shown))
    code, out = _verify(attributed, tmp_path, str(path))
    assert code == 1 and "MISMATCH" in out and "not to its lineageHash" in out
    shown["lineageHash"] = "0x" + lineage_hash(attributed.copied_datasets, shown["attribution"]["weightsBps"]).hex()
    path.write_text(json.dumps(shown))  # ... and the hash changed to match: the signature no longer holds
    code, out = _verify(attributed, tmp_path, str(path))
    assert code == 1 and "not by the node" in out, out


def test_verify_catches_a_node_that_signed_other_weights(attributed: AttributedNode, tmp_path: Path) -> None:
    """A node that signs weights the evidence does not give (all to the unrelated dataset) is caught
    even though its receipt is consistent and properly signed."""
    text, receipt = _complete(attributed.paid, attributed.copied_adapter, lane=5)
    services = attributed.paid.local.services
    assert services is not None
    lie = [0, 10_000]
    forged = {**receipt, "attribution": {**receipt["attribution"], "weightsBps": lie},
              "lineageHash": "0x" + lineage_hash(attributed.copied_datasets, lie).hex(), "output": text}
    signed = SignedReceipt.from_json(forged).receipt
    key = services.generation.issuer.operator_key
    forged["signature"] = "0x" + sign_receipt(key, signed, services.payments.domain).hex()
    forged["id"] = "0x" + receipt_digest(signed, services.payments.domain).hex()
    path = tmp_path / "lying.json"
    path.write_text(json.dumps(forged))
    code, out = _verify(attributed, tmp_path, str(path))
    assert code == 1 and "recomputed weights" in out, out
    forged_text = {**forged, "output": text + "!"}
    path.write_text(json.dumps(forged_text))
    code, out = _verify(attributed, tmp_path, str(path))
    assert code == 1 and "does not hash to its outputHash" in out
    assert receipt["outputHash"] == "0x" + keccak(text.encode()).hex()


def test_a_streamed_answer_carries_the_same_evidence_and_verifies(attributed: AttributedNode, tmp_path: Path) -> None:
    client = Payer(attributed.paid.payer_keys[0], attributed.paid.base_url).openai(lane=7)
    chunks = list(client.completions.create(model=str(attributed.copied_adapter), prompt=PROMPT, max_tokens=40,
                                            temperature=0, stream=True))
    text = "".join(c.choices[0].text for c in chunks if c.choices)
    receipt = chunks[-1].model_extra["receipt"]
    assert text == attributed.answer and receipt["outputHash"] == "0x" + keccak(text.encode()).hex()
    weights = receipt["attribution"]["weightsBps"]
    assert receipt["method"] == 2 and weights[0] > COPIED_WEIGHTS[0] and sum(weights) == 10_000
    code, out = _verify(attributed, tmp_path, receipt["id"], "--key-file",
                        _key_file(tmp_path, attributed.paid.payer_keys[0]))
    assert code == 0 and out.startswith("truthful"), out
