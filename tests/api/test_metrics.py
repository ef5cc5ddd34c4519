"""/metrics tells the truth: paid traffic against a live node moves every metric docs/metrics.md lists,
as the table's last column says (the docs' table is the list this test checks)."""

from __future__ import annotations

import json
import os
import re
import threading
import time
from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest
from prometheus_client.parser import text_string_to_metric_families

from node.api.metric_sources import BacklogReader
from node.client.payer import Payer
from node.devkit.local_node import LocalNode
from node.lora.content_hash import adapter_weights_sha256, base_model_id, dataset_content_hash
from tests.fixtures.database import POSTGRES_ENV
from tests.fixtures.paid_node import ADAPTER_OWNER, CONTRIBUTORS, PaidNode, _fresh_postgres, build_paid_node

pytestmark = pytest.mark.chain
DOC = Path(__file__).parents[2] / "docs" / "metrics.md"
ROW = re.compile(r"^\| `(loranode_\w+)` \| (counter|gauge|histogram) \|[^|]*\|([^|]+)\|$")


def documented() -> dict[str, tuple[str, str]]:
    """metric -> (type, when it moves), from the docs' table."""
    rows = (ROW.match(line.strip()) for line in DOC.read_text().splitlines())
    return {m[1]: (m[2], m[3].strip()) for m in rows if m}


def scrape(url: str) -> dict[str, float]:
    """Each documented metric's value summed over its series (a histogram: its count)."""
    totals: dict[str, float] = {}
    for family in text_string_to_metric_families(httpx.get(f"{url}/metrics", timeout=10).text):
        for sample in family.samples:
            name = sample.name.removesuffix("_count") if family.type == "histogram" else sample.name
            if family.type == "histogram" and not sample.name.endswith("_count"):
                continue
            totals[name] = totals.get(name, 0.0) + sample.value
    return totals


@pytest.fixture(scope="module")
def two_adapter_node(tiny_model: Path, tiny_adapters: object, tmp_path_factory: pytest.TempPathFactory
                     ) -> Iterator[tuple[PaidNode, int]]:
    """One engine sequence and one device slot at a time: a second request queues, a second adapter evicts."""
    data_dir = tmp_path_factory.mktemp("metrics-node")
    db_url = os.environ.get(POSTGRES_ENV)
    local = LocalNode.start_chain(data_dir, database_url=_fresh_postgres(db_url) if db_url else None,
                                  prompt_token_price=10**9, completion_token_price=2 * 10**9,
                                  default_max_tokens=16)
    try:
        other = tiny_adapters.paths["count-r4"]  # type: ignore[attr-defined]
        text = data_dir / "other.txt"
        text.write_text("counting one two three " * 4)
        dataset = local.contracts(CONTRIBUTORS[0]).datasets.register(dataset_content_hash(text), text.as_uri(),
                                                                     local.contracts(CONTRIBUTORS[0]).client.address)
        second = local.contracts(ADAPTER_OWNER).adapters.register(
            base_model_id(tiny_model), adapter_weights_sha256(other), other.as_uri(), [dataset], [10_000], 1_000)
        node = build_paid_node(local, tiny_model, tiny_adapters.paths["sea-r8"], data_dir,  # type: ignore[attr-defined]
                               max_in_flight=6, max_num_seqs=1, max_adapter_slots=1)
        yield node, second
    finally:
        local.stop()


def _body(model: int, n: int, stream: bool, prompt: str = "the sea") -> bytes:
    return json.dumps({"model": str(model), "prompt": prompt, "max_tokens": n, "min_tokens": n,
                       "stream": stream}).encode()


def _post(node: PaidNode, payer: Payer, lane: int, body: bytes) -> httpx.Response:
    header = payer.payment_header(body, lane)
    return httpx.post(f"{node.base_url}/v1/completions", content=body, timeout=60,
                      headers={"Content-Type": "application/json", "X-PAYMENT": header})


def _streams_while_scraping(node: PaidNode, payer: Payer, seen: dict[str, float]) -> None:
    """Two long streams at once (the second queues behind the first); the scrapes meanwhile keep the
    largest value each metric showed."""
    done = threading.Barrier(3)

    def stream(lane: int) -> None:
        try:
            assert _post(node, payer, lane, _body(node.adapter_id, 120, True)).status_code == 200
        finally:
            done.wait()

    for lane in (11, 12):
        threading.Thread(target=stream, args=(lane,), daemon=True).start()
    deadline = time.monotonic() + 60
    while done.n_waiting < 2 and time.monotonic() < deadline:
        for name, value in scrape(node.base_url).items():
            seen[name] = max(seen.get(name, value), value)
    done.wait(timeout=60)


def _lose_one(node: PaidNode, payer: Payer) -> None:
    """A stream whose charge cannot be committed once its tokens left: its hold is gone under it (as a
    takeover would), so the node records a loss (tests/adversarial/test_paid_path.py does the same)."""
    from sqlalchemy import update

    from node.db.models import Lane

    lane, body = 13, _body(node.adapter_id, 400, True)
    header = payer.payment_header(body, lane)
    with httpx.stream("POST", f"{node.base_url}/v1/completions", content=body, timeout=60,
                      headers={"Content-Type": "application/json", "X-PAYMENT": header}) as resp:
        lines = resp.iter_lines()
        assert next(line for line in lines if line.startswith("data: {"))
        with node.local.services.db.begin() as session:  # type: ignore[union-attr]
            session.execute(update(Lane).where(Lane.payer == payer.address.lower(), Lane.lane == lane)
                            .values(reserved=0, reserved_voucher_hash=None, reserved_at=None))
        assert any('"error"' in line for line in lines)


def _unmoved(name: str, when: str, before: dict[str, float], after: dict[str, float],
             seen: dict[str, float]) -> str | None:
    """Why a documented metric did not move as docs/metrics.md says it moves `when`; None if it did."""
    if name not in after:
        return f"{name}: not emitted"
    if when in ("during a request", "queued request"):
        return f"{name}: never above 0 while requests ran" if seen.get(name, 0) <= 0 else None
    if when == "engine start":
        is_moved = after[name] > 0
    elif when == "indexer step":  # the node's indexer steps every second: its last step is recent
        is_moved = after[name] >= 0 and not (name.endswith("_age_seconds") and after[name] > 30)
    elif when in ("settlement", "failed settlement", "KV pool full"):  # driven by the tests docs/metrics.md names
        is_moved = after[name] >= 0
    else:
        return None if after[name] > before.get(name, 0) else f"{name}: {before.get(name)} -> {after[name]}"
    return None if is_moved else f"{name}: {after[name]}"


def test_paid_traffic_moves_every_documented_metric(two_adapter_node: tuple[PaidNode, int]) -> None:
    node, second = two_adapter_node
    payer = Payer(node.payer_keys[0], node.base_url)
    before = scrape(node.base_url)
    seen: dict[str, float] = {}
    assert _post(node, payer, 10, _body(node.adapter_id, 4, False)).status_code == 200
    for lane in (15, 16):  # the second finds the first's prompt blocks in the prefix cache
        assert _post(node, payer, lane, _body(node.adapter_id, 2, False, prompt="the sea " * 24)).status_code == 200
    _streams_while_scraping(node, payer, seen)
    assert _post(node, payer, 14, _body(second, 4, False)).status_code == 200  # evicts the first from its slot
    _lose_one(node, payer)
    deadline = time.monotonic() + 2 * BacklogReader.max_age_s  # the backlog's figures may be that old
    while True:
        after = scrape(node.base_url)
        unmoved = [why for name, (_kind, when) in documented().items()
                   if (why := _unmoved(name, when, before, after, seen)) is not None]
        if not unmoved or time.monotonic() > deadline:
            break
        time.sleep(1)
    assert not unmoved, unmoved
    assert len(documented()) == DOC.read_text().count("\n| `loranode_") , "a row the test cannot read"


def _tier(url: str, metric: str, tier: str) -> float:
    text = httpx.get(f"{url}/metrics", timeout=10).text
    family = next(f for f in text_string_to_metric_families(text) if f.name == metric)
    return next(s.value for s in family.samples if s.labels.get("tier") == tier)


def test_a_request_whose_adapter_is_in_its_slot_is_a_device_hit(two_adapter_node: tuple[PaidNode, int]) -> None:
    node, _ = two_adapter_node
    payer = Payer(node.payer_keys[1], node.base_url)
    assert _post(node, payer, 20, _body(node.adapter_id, 2, False)).status_code == 200
    hits = _tier(node.base_url, "loranode_adapter_tier_hits", "device")
    misses = _tier(node.base_url, "loranode_adapter_tier_misses", "device")
    assert _post(node, payer, 21, _body(node.adapter_id, 2, False)).status_code == 200
    assert _tier(node.base_url, "loranode_adapter_tier_hits", "device") == hits + 1
    assert _tier(node.base_url, "loranode_adapter_tier_misses", "device") == misses
    assert _tier(node.base_url, "loranode_adapter_tier_bytes", "device") > 0
