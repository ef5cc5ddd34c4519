"""Attack 8: the node charges against a chain that is gone (issue #17), and deposits that are not final.

A mirror written from one chain must never fund paid work on another: `loranode dev` restarted on the
same data folder starts a fresh anvil (same chain id 31337, the contracts redeployed at the same
deterministic addresses), or a running node's chain goes away and comes back empty, and the node
must refuse paid work at once, with the reason, charging and signing nothing. And a deposit funds paid
work only once it is final (a reorg can remove one that is not): before, 402 saying when it counts.
"""

from __future__ import annotations

import json
import time
from pathlib import Path

import httpx
import pytest
from sqlalchemy import func, select

from node.catalog import MIRROR_TTL_S
from node.client.payer import Payer
from node.db import queries
from node.db.models import Receipt, Voucher
from node.db.session import make_engine, session_factory
from node.devkit.local_node import FIRST_USER, LocalNode
from tests.fixtures.paid_node import build_paid_node

pytestmark = pytest.mark.chain

PRICES = {"prompt_token_price": 10**9, "completion_token_price": 2 * 10**9, "default_max_tokens": 8}


def _paid_request(base_url: str, payer_key: str, adapter_id: int, lane: int) -> httpx.Response:
    payer = Payer(payer_key, base_url)
    body = json.dumps({"model": str(adapter_id), "prompt": "the sea is", "max_tokens": 2}).encode()
    header = payer.payment_header(body, lane)
    return httpx.post(f"{base_url}/v1/completions", content=body, timeout=60,
                      headers={"Content-Type": "application/json", "X-Payment": header})


def _num_charged(local: LocalNode) -> tuple[int, int]:
    factory = session_factory(make_engine(local.settings.resolved_database_url(), pooled=False))
    with factory() as session:
        return (session.scalar(select(func.count()).select_from(Voucher)) or 0,
                session.scalar(select(func.count()).select_from(Receipt)) or 0)


def test_a_dev_node_restarted_on_a_fresh_chain_refuses_paid_work_at_once(
        tiny_model: Path, tiny_adapters: object, tmp_path: Path, db_url: str) -> None:
    data_dir = tmp_path / "node"
    first = LocalNode.start_chain(data_dir, database_url=db_url, **PRICES)
    try:
        paid = build_paid_node(first, tiny_model, tiny_adapters.paths["sea-r8"], tmp_path)  # type: ignore[attr-defined]
        assert _paid_request(paid.base_url, paid.payer_keys[0], paid.adapter_id, 0).status_code == 200
    finally:
        first.stop()
    second = LocalNode.start_chain(data_dir, database_url=db_url, **PRICES)  # a fresh anvil, same chain id
    try:
        assert second.deployment.settlement == first.deployment.settlement
        url = second.serve(tiny_model)
        before = _num_charged(second)
        resp = _paid_request(url, paid.payer_keys[1], paid.adapter_id, 0)
        assert resp.status_code == 503, resp.text
        error = resp.json()["error"]
        assert error["code"] == "mirror_unavailable" and "another chain" in error["message"], error
        assert _num_charged(second) == before  # nothing charged, nothing signed
        ready = httpx.get(f"{url}/ready")
        assert ready.status_code == 503 and ready.json()["mirror"] is False
        assert "genesis" in ready.json()["reason"], ready.json()
    finally:
        second.stop()



NOTICE_S = 15.0  # the indexer's next steps on a loaded box; before, paid work went on for max_mirror_lag_s (120 s)


def _wait_not_ready(base_url: str, timeout_s: float) -> dict[str, object]:
    deadline = time.monotonic() + timeout_s
    while True:
        ready = httpx.get(f"{base_url}/ready")
        if ready.status_code == 503 or time.monotonic() > deadline:
            return {"status": ready.status_code, **ready.json()}
        time.sleep(0.02)


def test_a_running_node_whose_chain_goes_away_then_comes_back_empty_refuses_paid_work(
        tiny_model: Path, tiny_adapters: object, tmp_path: Path, db_url: str) -> None:
    local = LocalNode.start_chain(tmp_path / "node", database_url=db_url, **PRICES)
    try:
        paid = build_paid_node(local, tiny_model, tiny_adapters.paths["sea-r8"], tmp_path)  # type: ignore[attr-defined]
        assert _paid_request(paid.base_url, paid.payer_keys[0], paid.adapter_id, 0).status_code == 200
        before = _num_charged(local)
        local.anvil.stop()  # the chain's RPC is gone: the indexer's next head read fails
        gone = _wait_not_ready(paid.base_url, timeout_s=NOTICE_S)
        assert gone["status"] == 503 and "cannot follow the chain" in str(gone["reason"]), gone
        time.sleep(MIRROR_TTL_S)  # the longest a request may be admitted on the verdict before
        resp = _paid_request(paid.base_url, paid.payer_keys[0], paid.adapter_id, 1)
        assert resp.status_code == 503 and "cannot follow the chain" in resp.json()["error"]["message"]
        local.anvil.start()  # an empty chain on the same URL, with the same chain id
        replaced = _wait_not_ready(paid.base_url, timeout_s=NOTICE_S)
        deadline = time.monotonic() + NOTICE_S
        while "another chain" not in str(replaced.get("reason")) and time.monotonic() < deadline:
            replaced = _wait_not_ready(paid.base_url, timeout_s=0.1)
        assert replaced["status"] == 503 and "genesis" in str(replaced["reason"]), replaced
        time.sleep(MIRROR_TTL_S)
        resp = _paid_request(paid.base_url, paid.payer_keys[0], paid.adapter_id, 2)
        assert resp.status_code == 503 and "another chain" in resp.json()["error"]["message"], resp.text
        assert _num_charged(local) == before
    finally:
        local.stop()


def _wait_indexed(local: LocalNode, block: int) -> queries.MirrorHead:
    factory = session_factory(make_engine(local.settings.resolved_database_url(), pooled=False))
    deadline = time.monotonic() + 30
    while time.monotonic() < deadline:
        with factory() as session:
            head = queries.mirror_head(session)
        if head is not None and head.last_block >= block:
            return head
        time.sleep(0.05)
    raise AssertionError(f"the mirror did not reach block {block}")


def test_a_deposit_funds_paid_work_only_once_it_is_final(
        tiny_model: Path, tiny_adapters: object, tmp_path: Path, db_url: str) -> None:
    depth = 30  # blocks; the dev chain mines one a second, so a fresh deposit stays not final for a while
    local = LocalNode.start_chain(tmp_path / "node", database_url=db_url, finality_depth=depth, **PRICES)
    try:
        paid = build_paid_node(local, tiny_model, tiny_adapters.paths["sea-r8"], tmp_path)  # type: ignore[attr-defined]
        newcomer = local.contracts(FIRST_USER + 6)
        newcomer.token.mint(newcomer.client.address, 10**21)
        mined = newcomer.escrow.deposit(local.contracts(0).client.address, 10**21, newcomer.token)
        deposit_block = int(mined["blockNumber"])  # not the head: the dev chain mines on while this runs
        head = _wait_indexed(local, deposit_block)
        assert head.final_block < deposit_block  # mirrored (0 confirmations) but not final
        key, before = local.anvil.keys[FIRST_USER + 6], _num_charged(local)
        resp = _paid_request(paid.base_url, key, paid.adapter_id, 0)
        assert resp.status_code == 402, resp.text
        error = resp.json()["error"]
        assert error["code"] == "deposit_not_final" and "not final yet" in error["message"], error
        assert f"block {deposit_block + depth}" in error["message"], error  # when it will count
        assert _num_charged(local) == before
        local.wait_for_mirror()  # the dev chain mines `depth` blocks: the deposit is final
        resp = _paid_request(paid.base_url, key, paid.adapter_id, 0)
        assert resp.status_code == 200, resp.text
        assert int(resp.json()["receipt"]["fee"]) > 0
    finally:
        local.stop()
