"""A client that names a model in a crafted form (the base model's name in another case or with spaces
around it, an adapter id in other digits or with a sign, zero padding or the base model's hash) gets a
404 (adapter_not_found), before any voucher is looked at: never a server error, never the base model at
its prices nor an adapter under another name, never a charge. Live node on anvil."""

from __future__ import annotations

import json
from urllib.parse import quote

import httpx
import pytest

from node.client.payer import Payer
from node.lora.content_hash import base_model_id
from tests.fixtures.paid_node import PaidNode

pytestmark = pytest.mark.chain


def _crafted(node: PaidNode) -> list[str]:
    base, digits = node.local.settings.resolved_served_model_name(), str(node.adapter_id)
    base_hash = "0x" + base_model_id(node.local.settings.model_path).hex()
    other_digits = ["".join(chr(zero + int(d)) for d in digits) for zero in (0x0660, 0xFF10)]  # Arabic, fullwidth
    return [base.upper(), f" {base}", f"{base} ", f"{base}\n", f"{base}\u200b", base_hash, "0", "adapter-0",
            "\u00b2", "adapter-\u00b2", *other_digits, f"+{digits}", f"-{digits}", f"{digits}.0", f"1_{digits}",
            f" {digits}", f"Adapter-{digits}", f"adapter-{digits} ", f"adapter--{digits}", f"{digits}\u0660"]


@pytest.mark.parametrize("path", ["/v1/quote/completions", "/v1/completions"])
def test_a_model_named_in_a_crafted_form_is_404_and_charges_nothing(paid_node: PaidNode, path: str) -> None:
    payer = Payer(paid_node.payer_keys[1], paid_node.base_url)
    lane = 140
    before = payer.channel(lane)["chargedTotal"]
    for name in _crafted(paid_node):
        body = json.dumps({"model": name, "prompt": "the sea", "max_tokens": 2}).encode()
        headers = {"Content-Type": "application/json"}
        if path == "/v1/completions":
            headers["X-Payment"] = payer.payment_header(body, lane)
        resp = httpx.post(paid_node.base_url + path, content=body, headers=headers, timeout=60)
        assert resp.status_code == 404, (name, resp.status_code, resp.text[:300])
        assert resp.json()["error"]["code"] == "adapter_not_found", (name, resp.text[:300])
    assert payer.channel(lane)["chargedTotal"] == before


def test_a_model_looked_up_by_a_crafted_name_is_404(paid_node: PaidNode) -> None:
    for name in _crafted(paid_node):
        resp = httpx.get(f"{paid_node.base_url}/v1/models/{quote(name, safe='')}", timeout=30)
        assert resp.status_code == 404, (name, resp.status_code, resp.text[:300])
