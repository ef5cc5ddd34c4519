"""Asking what an address earned, free to anyone, cannot take the node from paying users.

GET /v1/earnings/{node}/{account} replayed the split of every receipt of the account's last 50 epochs
on every call, to say where each epoch's earning came from, on the API's request threads while holding
a pooled database connection. The node's operator and the treasury earn in every epoch, so a stranger
asking for theirs a few dozen times at once made the node read and split tens of thousands of receipts
per call, held the connections, and the holds and charges of paid requests waited for them. Settled
epochs are immutable under their roots: the node now splits each epoch's receipts once, for every payee,
whoever asks. Live node on anvil; the epochs are written into the outbox as the settlement worker
leaves them; the reads come from a process of their own."""

from __future__ import annotations

import re
import secrets
import time
from collections import Counter
from typing import Any

import httpx
import pytest
from eth_utils import to_checksum_address
from sqlalchemy import insert, select
from typer.testing import CliRunner

from node.cli import app
from node.client.payer import Payer
from node.db import queries
from node.db.models import EpochState, Receipt, SettlementEpoch, Voucher
from node.db.session import make_engine, session_factory, transaction
from node.protocol.hexstr import to_hex
from node.protocol.receipt import BASE_ADAPTER_ID, LEAF_TYPES, receipt_of_row
from node.settlement.earnings import MAX_PAGE
from node.settlement.epoch_builder import rewards_tree
from node.settlement.merkle import MerkleTree
from node.settlement.split import BASE_LINEAGE, Lineage, SplitParams, split_fee
from tests.fixtures.flood import fastest_paid_seconds, paid_seconds_during_gets, signed_completions
from tests.fixtures.paid_node import PaidNode

pytestmark = [pytest.mark.chain, pytest.mark.slow]
NUM_EPOCHS = 60  # more than one page (MAX_PAGE)
NUM_RECEIPTS = 300  # per epoch
FIRST_EPOCH = 1_000
NUM_ASKING = 32


def _split(paid_node: PaidNode) -> SplitParams:
    svc = paid_node.local.services
    assert svc is not None and svc.split is not None
    return svc.split


def _copies(receipt: Receipt, voucher: Voucher, epoch_id: int) -> tuple[list[dict[str, Any]], list[dict[str, Any]]]:
    """NUM_RECEIPTS copies of a served receipt and its voucher under fresh hashes, in epoch `epoch_id`; the
    last one of the base model alone (adapter 0: the treasury's and the node's)."""
    vouchers, receipts = [], []
    for i in range(NUM_RECEIPTS):
        voucher_hash = "0x" + secrets.token_hex(32)
        vouchers.append({c.key: getattr(voucher, c.key) for c in Voucher.__table__.columns} | {
            "voucher_hash": voucher_hash, "response": None})
        receipts.append({c.key: getattr(receipt, c.key) for c in Receipt.__table__.columns if c.key != "id"} | {
            "receipt_hash": "0x" + secrets.token_hex(32), "voucher_hash": voucher_hash, "epoch_id": epoch_id,
            "adapter_id": BASE_ADAPTER_ID if i == NUM_RECEIPTS - 1 else receipt.adapter_id})
    return vouchers, receipts


def _epoch_row(node: str, epoch_id: int, cumulative: Counter[str], receipts: MerkleTree) -> SettlementEpoch:
    rewards = rewards_tree(dict(cumulative), node)
    total = sum(cumulative.values())
    return SettlementEpoch(node=node, epoch_id=epoch_id, state=EpochState.FINAL, rewards_root=to_hex(rewards.root),
                           rewards_total=total, receipts_root=to_hex(receipts.root), receipt_count=NUM_RECEIPTS,
                           collected_total=total, trees={"rewards": rewards.to_json(), "receipts": receipts.to_json()},
                           tx_hash="0x" + "22" * 32)


@pytest.fixture(scope="module")
def history(paid_node: PaidNode) -> tuple[float, dict[str, int]]:
    """NUM_EPOCHS settled epochs of NUM_RECEIPTS receipts each, every payee earning in each, as the worker
    would leave them (FINAL, trees published). (a paid request's time before, each payee's total earning)."""
    payer = Payer(paid_node.payer_keys[0], paid_node.base_url)
    calm = fastest_paid_seconds(paid_node, signed_completions(paid_node, payer, 1_000))
    params = _split(paid_node)
    factory = session_factory(make_engine(paid_node.local.settings.resolved_database_url(), pooled=False))
    with transaction(factory) as session:
        receipt = session.scalars(select(Receipt).order_by(Receipt.id)).first()
        assert receipt is not None
        voucher = session.get(Voucher, receipt.voucher_hash)
        view = queries.adapter_lineage(session, receipt.adapter_id, at_block=receipt.registry_block)
        assert voucher is not None and view is not None
        lineage = Lineage(view.owner, view.owner_share_bps, tuple((d.payout, d.weight_bps) for d in view.datasets))
        adapter = Counter({a: (NUM_RECEIPTS - 1) * v for a, v in split_fee(receipt.fee, params, lineage).items()})
        per_epoch = adapter + split_fee(receipt.fee, params, BASE_LINEAGE)  # `+` keeps only positive amounts
        receipts = MerkleTree.of([receipt_of_row(receipt).leaf()], LEAF_TYPES)
        cumulative: Counter[str] = Counter()
        for epoch_id in range(FIRST_EPOCH, FIRST_EPOCH + NUM_EPOCHS):
            cumulative.update(per_epoch)
            session.add(_epoch_row(receipt.node, epoch_id, cumulative, receipts))
            session.flush()
            vouchers, rows = _copies(receipt, voucher, epoch_id)
            session.execute(insert(Voucher), vouchers)
            session.execute(insert(Receipt), rows)
    return calm, {a.lower(): v for a, v in cumulative.items()}


def _earnings(node: PaidNode, account: str) -> dict[str, Any]:
    resp = httpx.get(f"{node.base_url}/v1/earnings/{_split(node).node}/{account}", timeout=120)
    assert resp.status_code == 200, resp.text
    return resp.json()  # type: ignore[no-any-return]


def test_every_epoch_s_earning_is_explained_to_the_wei(paid_node: PaidNode, history: tuple[float, dict[str, int]]
                                                       ) -> None:
    _, earned = history
    for account in (_split(paid_node).node, _split(paid_node).treasury):
        doc = _earnings(paid_node, account)
        assert doc["earned"] == str(earned[account.lower()])
        assert [e["epochId"] for e in doc["epochs"]] == list(range(FIRST_EPOCH + NUM_EPOCHS - MAX_PAGE,
                                                                   FIRST_EPOCH + NUM_EPOCHS)), "the newest page"
        assert doc["next"] == FIRST_EPOCH + NUM_EPOCHS - MAX_PAGE
        for entry in doc["epochs"]:
            assert sum(int(s["amount"]) for s in entry["sources"]) == int(entry["earned"])
            assert "unexplained" not in {s["source"] for s in entry["sources"]}


def test_a_flood_of_earnings_does_not_hold_up_paid_requests(paid_node: PaidNode,
                                                           history: tuple[float, dict[str, int]]) -> None:
    calm, _ = history
    _paid_request_keeps_pace_with_a_flood(paid_node, calm, first_lane=1_010, num_epochs=NUM_EPOCHS)


def _paid_request_keeps_pace_with_a_flood(paid_node: PaidNode, calm: float, first_lane: int, num_epochs: int) -> None:
    """NUM_ASKING strangers ask for the node's and the treasury's earnings while paid requests (one lane each
    from `first_lane`) are sent: the fastest of them is at most 5 s slower than `calm`, with no flood."""
    params = _split(paid_node)
    urls = [f"{paid_node.base_url}/v1/earnings/{params.node}/{who}" for who in (params.node, params.treasury)]
    headers = signed_completions(paid_node, Payer(paid_node.payer_keys[0], paid_node.base_url), first_lane)
    flooded = paid_seconds_during_gets(paid_node, headers, urls, NUM_ASKING)
    print(f"{num_epochs} epochs: paid request alone {calm:.3f} s, during the earnings {flooded:.3f} s")
    assert flooded < calm + 5.0, f"a paid request took {flooded:.2f} s during a flood of earnings " \
                                 f"({calm:.2f} s without)"


LONG_HISTORY = 3_000  # more published epochs, their rewards trees alone (no receipt: nothing to replay)


def _answer_bytes(node: PaidNode, account: str) -> int:
    """The size of the answer, asked twice (the second, printed, with every tree already read)."""
    for _ in range(2):
        started = time.monotonic()
        resp = httpx.get(f"{node.base_url}/v1/earnings/{_split(node).node}/{account}", timeout=600)
        assert resp.status_code == 200, resp.text
    print(f"{len(resp.content)} bytes in {time.monotonic() - started:.3f} s")
    return len(resp.content)


@pytest.fixture(scope="module")
def long_history(paid_node: PaidNode, history: tuple[float, dict[str, int]]) -> dict[str, int]:
    """LONG_HISTORY published epochs after `history`'s, the node and the treasury earning 1 in each; the size
    of the answer for each before them."""
    _, earned = history
    params = _split(paid_node)
    short = {who: _answer_bytes(paid_node, who) for who in (params.node, params.treasury)}
    factory = session_factory(make_engine(paid_node.local.settings.resolved_database_url(), pooled=False))
    with transaction(factory) as session:
        latest = session.scalars(select(SettlementEpoch).where(
            SettlementEpoch.epoch_id == FIRST_EPOCH + NUM_EPOCHS - 1)).one()
        receipts = latest.trees["receipts"]
        step = Counter({to_checksum_address(a): 1 for a in (params.node, params.treasury)})
        cumulative = Counter({to_checksum_address(a): v for a, v in earned.items()})
        rows = []
        for epoch_id in range(FIRST_EPOCH + NUM_EPOCHS, FIRST_EPOCH + NUM_EPOCHS + LONG_HISTORY):
            cumulative.update(step)
            rewards = rewards_tree(dict(cumulative), latest.node)
            rows.append({"node": latest.node, "epoch_id": epoch_id, "state": EpochState.FINAL,
                         "rewards_root": to_hex(rewards.root), "rewards_total": sum(cumulative.values()),
                         "receipts_root": latest.receipts_root, "receipt_count": 0, "collected_total": 0,
                         "trees": {"rewards": rewards.to_json(), "receipts": receipts}, "tx_hash": latest.tx_hash})
        session.execute(insert(SettlementEpoch), rows)
    return short


def test_a_long_history_costs_a_call_for_the_treasury_s_earnings_no_more(paid_node: PaidNode,
                                                                          history: tuple[float, dict[str, int]],
                                                                          long_history: dict[str, int]) -> None:
    """The node and the treasury earn in every epoch: each call for theirs read and answered every epoch,
    so strangers asking for them made the node serve its whole history each time, longer every epoch."""
    calm, _ = history
    params, short = _split(paid_node), long_history
    long = {who: _answer_bytes(paid_node, who) for who in (params.node, params.treasury)}  # (reads the new trees)
    print(f"answer bytes with {NUM_EPOCHS} epochs {short}, with {NUM_EPOCHS + LONG_HISTORY} {long}")
    for who in long:
        assert long[who] < 2 * short[who], f"the answer grew from {short[who]} to {long[who]} bytes with the history"
    _paid_request_keeps_pace_with_a_flood(paid_node, calm, first_lane=1_020,
                                          num_epochs=NUM_EPOCHS + LONG_HISTORY)


def test_loranode_earnings_shows_a_page_and_the_command_for_the_one_before(paid_node: PaidNode,
                                                                           long_history: dict[str, int]) -> None:
    """The CLI prints the newest page and how to ask for the earlier ones."""
    treasury, url = _split(paid_node).treasury, paid_node.base_url
    newest = FIRST_EPOCH + NUM_EPOCHS + LONG_HISTORY - 1
    env = {"LORANODE_DATA_DIR": None, "LORANODE_DATABASE_URL": None}
    first = CliRunner().invoke(app, ["earnings", treasury, "--node-url", url], env=env)
    assert first.exit_code == 0 and _epoch_line(newest).search(first.output), first.output
    hint = f"earlier epochs: loranode earnings {to_checksum_address(treasury)} --before {newest - MAX_PAGE + 1}"
    assert hint in first.output and "by source, in these epochs:" in first.output, first.output
    second = CliRunner().invoke(app, ["earnings", treasury, "--node-url", url, "--before", str(newest - MAX_PAGE + 1)],
                                env=env)
    assert second.exit_code == 0 and _epoch_line(newest - MAX_PAGE).search(second.output), second.output
    assert not _epoch_line(newest - MAX_PAGE + 1).search(second.output), second.output


def _epoch_line(epoch_id: int) -> re.Pattern[str]:
    return re.compile(rf"^\s*{epoch_id}\s+final\s+1\s+0\s", re.M)
