"""The invariants a node must keep whatever happened to it, checked from three independent views: what
the clients were handed (the ClientLog), what the node recorded (its database), and what the chain holds.

    check_invariants(cluster, log)  every complete answer carried exactly one receipt, a refusal none;
                                    the database holds exactly the receipts clients were handed (none
                                    lost, none without a response), each as the client saw it, signed
                                    by the node; no lane is left held; each lane's charged total = the
                                    sum of its receipts' fees = the last total its client saw = what
                                    the chain collected; the rewards leaves add up to what was collected
                                    and equal the split recomputed from the registered lineages
    claim_everything(cluster)       a relayer claims for every payee from the API's published tree;
                                    each payee's token balance grows by exactly its leaf (less what it
                                    had claimed), and the node's pot is left empty
"""

from __future__ import annotations

from collections import Counter
from dataclasses import dataclass
from typing import Any

import httpx
from sqlalchemy import select
from web3 import Web3

from node.client.payer import verify_receipt
from node.db.loss import LossReason
from node.db.models import EpochState, Lane, Loss, Receipt, SettlementEpoch, Voucher
from node.settlement.claims import claim_all
from node.settlement.split import split_fee
from tests.e2e.cluster import OPERATOR, RELAYER, TOKEN, Cluster
from tests.e2e.traffic import ClientLog, Outcome

LaneKey = tuple[str, int]  # (payer lower-case, lane)
# Losses of answers the node served but did not charge (no receipt), and of charges settlement could not collect.
UNCHARGED = {LossReason.DELIVERED_UNCHARGED.value, LossReason.NODE_FAULT.value}


@dataclass(frozen=True)
class Summary:
    num_calls: int
    num_served: int  # calls answered in full (200), a replay of a stored answer counted again
    num_answers: int  # distinct receipts handed with complete answers: a replay is not a second answer
    num_receipts: int
    num_lanes: int
    num_final_epochs: int
    collected: int


# What a receipt signs and the lane total it was handed with: the same however the client got it (the
# answer, its idempotent replay, or GET /v1/receipts/{id} once the voucher is settled).
SIGNED = ("id", "voucherHash", "adapterId", "registryBlock", "lineageHash", "promptTokens", "completionTokens",
          "fee", "outputHash", "method", "signature", "node", "chargedTotal")


def _client_receipts(outcomes: list[Outcome]) -> dict[str, tuple[dict[str, Any], LaneKey]]:
    """Receipt id -> (the receipt as handed to the client, its lane); every time a receipt is handed
    out again, its signed fields and charged total are the same."""
    seen: dict[str, tuple[dict[str, Any], LaneKey]] = {}
    for o in outcomes:
        if o.is_served:
            assert len(o.receipts) == 1, f"a complete answer with {len(o.receipts)} receipts: {o}"
        elif o.status != 0:
            assert not o.receipts, f"a refusal carried a receipt: {o}"
        else:
            assert len(o.receipts) <= 1, f"a broken stream with several receipts: {o}"
        for r in o.receipts:
            lane = (o.payer.lower(), o.lane)
            signed = {k: r.get(k) for k in SIGNED}
            if r["id"] in seen:
                assert seen[r["id"]] == (signed, lane), f"receipt {r['id']} handed out twice, differently"
            seen[r["id"]] = (signed, lane)
    return seen


def _check_lanes(cluster: Cluster, lanes: list[Lane], db: dict[str, tuple[Receipt, Voucher]],
                 seen: dict[str, tuple[dict[str, Any], LaneKey]], lost: Counter[LaneKey], settled: bool) -> int:
    fees: Counter[LaneKey] = Counter()
    for r, v in db.values():
        fees[(v.payer, v.lane)] += r.fee
    last_seen: dict[LaneKey, int] = {}
    for receipt, lane in seen.values():
        last_seen[lane] = max(last_seen.get(lane, 0), int(receipt["chargedTotal"]))
    hung_up = {(v.payer, v.lane) for r, v in db.values() if r.receipt_hash not in seen}
    settlement = cluster.contracts(OPERATOR).settlement
    for lane in lanes:
        key = (lane.payer, lane.lane)
        assert lane.reserved_voucher_hash is None, f"lane {key} is still held by {lane.reserved_voucher_hash}"
        assert lane.charged_total == fees[key], (key, lane.charged_total, fees[key])
        # a hang-up's charge is the lane's last the node made but no client saw
        assert lane.charged_total == last_seen.get(key, 0) or key in hung_up, (key, lane.charged_total, last_seen)
        if settled:
            on_chain = settlement.collected(Web3.to_checksum_address(lane.payer), cluster.node, lane.lane)
            assert on_chain + lost[key] == lane.charged_total, \
                f"lane {key}: collected {on_chain} + lost {lost[key]} != charged {lane.charged_total}"
    assert set(fees) <= {(lane.payer, lane.lane) for lane in lanes}
    return sum(lane.charged_total for lane in lanes)


def _expected_leaves(cluster: Cluster, receipts: list[Receipt]) -> dict[str, int]:
    total: Counter[str] = Counter()
    for r in receipts:
        total.update(split_fee(r.fee, cluster.world.params, cluster.world.lineages[r.adapter_id]))
    return {Web3.to_checksum_address(a): v for a, v in total.items() if v}


def _check_rewards(cluster: Cluster, receipts: list[Receipt], collected: int) -> int:
    settlement = cluster.contracts(OPERATOR).settlement
    with cluster.factory() as session:
        finals = session.scalars(select(SettlementEpoch).where(SettlementEpoch.node == cluster.node.lower(),
                                                               SettlementEpoch.state == EpochState.FINAL)
                                 .order_by(SettlementEpoch.epoch_id)).all()
    assert settlement.last_epoch(cluster.node) == len(finals) == (finals[-1].epoch_id if finals else 0)
    assert cluster.operator_nonce() - cluster.base_nonce == len(finals), "a settle sent other than once per epoch"
    assert settlement.rewards_total(cluster.node) == collected
    if not finals:
        return 0
    leaves = {Web3.to_checksum_address(v["value"][0]): int(v["value"][1])
              for v in finals[-1].trees["rewards"]["values"]}
    assert sum(leaves.values()) == collected, "the claimable leaves do not add up to what was collected"
    assert {a: v for a, v in leaves.items() if v} == _expected_leaves(cluster, receipts)
    token = cluster.contracts(OPERATOR).token
    assert token.balance_of(settlement.address) == collected - settlement.paid_out(cluster.node)
    deposited = len(cluster.world.payer_keys) * 1_000 * TOKEN
    assert token.balance_of(cluster.deployment.escrow) == deposited - collected, "escrow paid out other than collected"
    return len(finals)


def _check_economics(outcomes: list[Outcome], db: dict[str, tuple[Receipt, Voucher]], unanswered: set[str],
                     losses: list[Loss], vouchers: list[Voucher]) -> None:
    """Every accepted voucher is charged once (a receipt) or is an uncharged loss, never both, never neither;
    a charge no client saw is a hang-up's, and there are no more of those than calls that broke."""
    charged = {v.voucher_hash for _, v in db.values()}
    uncharged = [loss.voucher_hash for loss in losses if loss.reason in UNCHARGED]
    assert len(uncharged) == len(set(uncharged)), "one voucher recorded as lost twice"
    assert not charged & set(uncharged), "a voucher both charged and recorded as an uncharged loss"
    neither = {v.voucher_hash for v in vouchers} - charged - set(uncharged)
    assert not neither, f"{len(neither)} accepted vouchers are neither charged nor a recorded loss"
    broken = sum(o.status == 0 for o in outcomes)
    assert len(unanswered) <= broken, f"{len(unanswered)} receipts no client was handed, but {broken} broken calls"
    for receipt_id in unanswered:
        response = db[receipt_id][1].response
        assert response is None or response["choices"][0]["finish_reason"] == "abort", \
            f"receipt {receipt_id} of a complete answer was never handed to its client"


def check_invariants(cluster: Cluster, log: ClientLog, *, settled: bool = True) -> Summary:
    """Everything above; `settled=False` skips the chain side (receipts may still wait for an epoch)."""
    outcomes = log.outcomes
    seen = _client_receipts(outcomes)
    node = cluster.node.lower()
    with cluster.factory() as session:
        rows = session.execute(select(Receipt, Voucher).join(Voucher, Voucher.voucher_hash == Receipt.voucher_hash)
                               .where(Receipt.node == node)).all()
        lanes = list(session.scalars(select(Lane).where(Lane.node == node)))
        losses = list(session.scalars(select(Loss).where(Loss.node == node)))
        vouchers = list(session.scalars(select(Voucher).where(Voucher.node == node)))
    db = {r.receipt_hash: (r, v) for r, v in rows}
    missing, unanswered = set(seen) - set(db), set(db) - set(seen)
    assert not missing, f"{len(missing)} receipts handed to clients are not in the database: {sorted(missing)[:3]}"
    _check_economics(outcomes, db, unanswered, losses, vouchers)
    lost: Counter[LaneKey] = Counter()
    for loss in losses:
        if loss.reason not in UNCHARGED and loss.recovered_epoch_id is None:  # a recovered loss was collected
            lost[(loss.payer, loss.lane)] += loss.amount
    domain = cluster.payer(0).info.domain
    for receipt_id, (r, v) in db.items():
        client, lane = seen[receipt_id]
        assert (v.payer, v.lane) == lane, f"receipt {receipt_id} charged to lane {(v.payer, v.lane)}, not {lane}"
        assert int(client["fee"]) == r.fee and client["voucherHash"] == r.voucher_hash
        assert client["signature"] == r.signature
        assert verify_receipt(client, domain).lower() == node
    collected = _check_lanes(cluster, lanes, db, seen, lost, settled)
    num_final = _check_rewards(cluster, [r for r, _ in db.values()], collected) if settled else 0
    answers = {o.receipts[0]["id"] for o in outcomes if o.is_served}
    return Summary(len(outcomes), sum(o.is_served for o in outcomes), len(answers), len(db), len(lanes), num_final,
                   collected)


def claim_everything(cluster: Cluster) -> dict[str, int]:
    """A relayer claims for every payee from the API; each balance grows by exactly what was due."""
    doc = httpx.get(f"{cluster.base_url}/v1/epochs/{cluster.node}/latest", timeout=30).json()
    leaves = {Web3.to_checksum_address(v["value"][0]): int(v["value"][1]) for v in doc["rewards"]["values"]}
    c = cluster.contracts(OPERATOR)
    before = {a: c.token.balance_of(a) for a in leaves}
    claimed_before = {a: c.settlement.claimed(cluster.node, a) for a in leaves}
    paid = claim_all(cluster.contracts(RELAYER), cluster.node, cluster.base_url).paid
    for account, leaf in leaves.items():
        due = leaf - claimed_before[account]
        assert c.token.balance_of(account) - before[account] == due == paid.get(account, 0), account
        assert c.settlement.claimed(cluster.node, account) == leaf
    assert c.settlement.paid_out(cluster.node) == c.settlement.rewards_total(cluster.node)
    assert c.token.balance_of(c.settlement.address) == 0, "the node's pot still holds tokens after every claim"
    return paid
