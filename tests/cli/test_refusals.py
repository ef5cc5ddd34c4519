"""`loranode request` against a live paid node: a refusal shows the node's code and message as it sent
them, in its category (a request the node cannot serve is not a payment error), with the next step;
and a funded payer is served up to the model's whole room."""

from __future__ import annotations

from pathlib import Path

import httpx
import pytest
from typer.testing import CliRunner

from node.cli import app
from tests.fixtures.paid_node import PaidNode

pytestmark = pytest.mark.chain
runner = CliRunner()
PROMPT = "the sea"


def _request(node: PaidNode, key: str, tmp_path: Path, *args: str) -> tuple[int, str]:
    key_file = tmp_path / "payer.key"
    key_file.write_text(key)
    result = runner.invoke(app, ["request", PROMPT, "--node-url", node.base_url, "--key-file", str(key_file), *args])
    assert result.exception is None or isinstance(result.exception, SystemExit), repr(result.exception)
    assert "Traceback" not in result.output
    return result.exit_code, result.output


def _room(node: PaidNode) -> int:
    """The most max_tokens the node takes for PROMPT: its context less the prompt's tokens."""
    quote = httpx.post(f"{node.base_url}/v1/quote/completions",
                       json={"model": str(node.adapter_id), "prompt": PROMPT, "max_tokens": 1}).json()
    return int(httpx.get(f"{node.base_url}/v1/node").json()["maxModelLen"]) - int(quote["promptTokens"])


def test_an_unknown_adapter_is_the_nodes_404_word_for_word(paid_node: PaidNode, tmp_path: Path) -> None:
    code, out = _request(paid_node, paid_node.payer_keys[0], tmp_path, "--adapter", "4242")
    assert code == 2, out
    assert "error (adapter_not_found; the node refused the request: 404): adapter 4242 is not registered" in out
    assert "payment" not in out.splitlines()[0]
    assert f"GET {paid_node.base_url}/v1/models lists the adapters it serves" in out


def test_max_tokens_past_the_context_is_the_nodes_400(paid_node: PaidNode, tmp_path: Path) -> None:
    too_many = _room(paid_node) + 1
    code, out = _request(paid_node, paid_node.payer_keys[0], tmp_path, "--adapter", str(paid_node.adapter_id),
                         "--max-tokens", str(too_many))
    assert code == 2, out
    assert "error (invalid_request; the node refused the request: 400): max_tokens" in out
    assert f"max_tokens {too_many} + " in out and "exceed the context" in out and "payment" not in out


def test_an_unfunded_payer_gets_a_clear_402_with_what_to_do(paid_node: PaidNode, tmp_path: Path) -> None:
    code, out = _request(paid_node, paid_node.poor_payer_key, tmp_path, "--adapter", str(paid_node.adapter_id))
    assert code == 2, out
    assert "error (insufficient_escrow; the node refused the payment: 402): not enough escrow for this request" in out
    assert "spendable=" in out and "max_fee=" in out  # the facts, not dropped as markup
    assert "loranode escrow deposit" in out


def test_a_funded_payer_is_served_up_to_the_models_whole_room(paid_node: PaidNode, tmp_path: Path) -> None:
    code, out = _request(paid_node, paid_node.payer_keys[0], tmp_path, "--adapter", str(paid_node.adapter_id),
                         "--max-tokens", str(_room(paid_node)), "--lane", "61")
    assert code == 0, out
    assert "the node, verified" in out


def test_the_old_model_spelling_still_names_the_adapter(paid_node: PaidNode, tmp_path: Path) -> None:
    code, out = _request(paid_node, paid_node.payer_keys[0], tmp_path, "--model", str(paid_node.adapter_id),
                         "--max-tokens", "2", "--lane", "62")
    assert code == 0 and "the node, verified" in out, out
