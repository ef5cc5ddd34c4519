"""The operator's hand on adapters, against a live node: pin, unpin, preload and evict on the admin
port (never the public one), with the admin token from a file; and `loranode adapter ...` calling it."""

from __future__ import annotations

import json
import threading
import time
from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest
import uvicorn
from prometheus_client.parser import text_string_to_metric_families
from typer.testing import CliRunner

from node.api.admin import create_admin_app, read_admin_token
from node.chain.anvil import free_port
from node.cli import app
from node.client.payer import Payer
from node.devkit.local_node import LocalNode
from node.lora.content_hash import adapter_weights_sha256, base_model_id, dataset_content_hash
from tests.fixtures.paid_node import ADAPTER_OWNER, CONTRIBUTORS, PaidNode, build_paid_node

pytestmark = pytest.mark.chain
TOKEN = "an-admin-token-of-32-characters!"


def _register(local: LocalNode, tiny_model: Path, folder: Path, data_dir: Path) -> int:
    text = data_dir / f"{folder.name}.txt"
    text.write_text(f"{folder.name} " * 20)
    who = local.contracts(CONTRIBUTORS[0])
    dataset = who.datasets.register(dataset_content_hash(text), text.as_uri(), who.client.address)
    return local.contracts(ADAPTER_OWNER).adapters.register(
        base_model_id(tiny_model), adapter_weights_sha256(folder), folder.as_uri(), [dataset], [10_000], 1_000)


@pytest.fixture(scope="module")
def admin_node(tiny_model: Path, tiny_adapters: object, tmp_path_factory: pytest.TempPathFactory
               ) -> Iterator[tuple[PaidNode, list[int], str, Path]]:
    """Three adapters and two device slots; the admin app on a loopback port of its own."""
    data_dir = tmp_path_factory.mktemp("admin-node")
    local = LocalNode.start_chain(data_dir, prompt_token_price=10**9, completion_token_price=2 * 10**9,
                                  default_max_tokens=4)
    server = None
    try:
        paths = tiny_adapters.paths  # type: ignore[attr-defined]
        others = [_register(local, tiny_model, paths[n], data_dir) for n in ("count-r4", "stars-attn-r2")]
        node = build_paid_node(local, tiny_model, paths["sea-r8"], data_dir, max_adapter_slots=2)
        token_file = data_dir / "admin_token"
        token_file.write_text(TOKEN + "\n")
        port = free_port()
        admin = create_admin_app(local.services, read_admin_token(token_file))  # type: ignore[arg-type]
        server = uvicorn.Server(uvicorn.Config(admin, host="127.0.0.1", port=port, log_level="warning",
                                               lifespan="off"))
        threading.Thread(target=server.run, daemon=True).start()
        while not server.started:
            time.sleep(0.05)
        yield node, [node.adapter_id, *others], f"http://127.0.0.1:{port}", token_file
    finally:
        if server is not None:
            server.should_exit = True
        local.stop()


def _ask(node: PaidNode, model: int, lane: int) -> None:
    payer = Payer(node.payer_keys[0], node.base_url)
    body = json.dumps({"model": str(model), "prompt": "the sea", "max_tokens": 2}).encode()
    resp = httpx.post(f"{node.base_url}/v1/completions", content=body, timeout=60,
                      headers={"Content-Type": "application/json", "X-PAYMENT": payer.payment_header(body, lane)})
    assert resp.status_code == 200, resp.text


def _device(node: PaidNode) -> dict[str, float]:
    text = httpx.get(f"{node.base_url}/metrics", timeout=10).text
    out = {}
    for family in text_string_to_metric_families(text):
        if family.name.startswith("loranode_adapter_tier_"):
            for s in family.samples:
                if s.labels.get("tier") == "device" and not s.name.endswith("_created"):
                    out[s.name.removeprefix("loranode_adapter_tier_")] = s.value
    return out


def _admin(url: str, model: int, action: str, token: str | None = TOKEN) -> httpx.Response:
    headers = {"Authorization": f"Bearer {token}"} if token is not None else {}
    return httpx.post(f"{url}/admin/adapters/{model}/{action}", headers=headers, timeout=150)


def test_a_wrong_or_missing_token_is_refused_and_the_public_port_has_no_admin(admin_node) -> None:  # type: ignore[no-untyped-def]
    node, (a, *_), url, _ = admin_node
    for token in (None, "x" * 32, TOKEN[:-1]):
        resp = _admin(url, a, "preload", token)
        assert resp.status_code == 401 and resp.json()["error"]["code"] == "admin_unauthorized"
    public = httpx.post(f"{node.base_url}/admin/adapters/{a}/preload", headers={"Authorization": f"Bearer {TOKEN}"})
    assert public.status_code == 404
    assert _admin(url, a, "reload").status_code == 400
    assert _admin(url, 4242, "preload").status_code == 404


def test_preload_makes_the_next_request_a_device_hit_and_evict_frees_it(admin_node) -> None:  # type: ignore[no-untyped-def]
    node, (_, b, _), url, _ = admin_node
    assert _admin(url, b, "preload").status_code == 200
    before = _device(node)
    _ask(node, b, 1)
    after = _device(node)
    assert after["hits_total"] == before["hits_total"] + 1 and after["misses_total"] == before["misses_total"]
    assert _admin(url, b, "evict").status_code == 200
    assert _device(node)["bytes"] < after["bytes"]  # its slot is free
    _ask(node, b, 2)
    assert _device(node)["misses_total"] == after["misses_total"] + 1  # it had to be copied in again


def test_a_pinned_adapter_is_never_evicted(admin_node) -> None:  # type: ignore[no-untyped-def]
    node, (a, b, c), url, _ = admin_node
    assert _admin(url, a, "pin").status_code == 200
    assert _admin(url, b, "pin").status_code == 429  # a second pin would leave no slot for traffic
    evictions = _device(node)["evictions_total"]
    for lane, model in enumerate((b, c, b, c), start=10):  # two adapters through the one other slot
        _ask(node, model, lane)
    assert _device(node)["evictions_total"] >= evictions + 3
    hits = _device(node)["hits_total"]
    _ask(node, a, 20)
    assert _device(node)["hits_total"] == hits + 1  # still in its slot
    assert _admin(url, a, "unpin").status_code == 200
    _ask(node, b, 21)
    _ask(node, c, 22)  # now a, the least recently used idle adapter, makes room
    misses = _device(node)["misses_total"]
    _ask(node, a, 23)
    assert _device(node)["misses_total"] == misses + 1


def test_the_cli_calls_the_admin_port_with_the_token_file(admin_node, tmp_path: Path) -> None:  # type: ignore[no-untyped-def]
    _, (a, *_), url, token_file = admin_node
    runner = CliRunner()
    result = runner.invoke(app, ["adapter", "preload", str(a), "--admin-url", url, "--token-file", str(token_file)])
    assert result.exit_code == 0 and f"adapter {a}: preload done" in result.output, result.output
    wrong = tmp_path / "wrong"
    wrong.write_text("y" * 32)
    result = runner.invoke(app, ["adapter", "evict", str(a), "--admin-url", url, "--token-file", str(wrong)])
    assert result.exit_code != 0 and "admin" in result.output.lower()


def test_an_unknown_adapter_through_the_cli_points_at_the_public_apis_models(admin_node) -> None:  # type: ignore[no-untyped-def]
    _, _, url, token_file = admin_node
    result = CliRunner().invoke(app, ["adapter", "pin", "4242", "--admin-url", url, "--token-file", str(token_file)])
    assert result.exit_code == 2, result.output
    assert "adapter_not_found" in result.output and "4242" in result.output
    # the admin port has no /v1/models, and `adapter pin` has no --adapter option
    assert f"{url}/v1/models" not in result.output and "--adapter" not in result.output
    assert "GET <the node's API>/v1/models lists the adapters it serves" in result.output
