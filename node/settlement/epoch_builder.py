"""One epoch's settlement, computed from plain values (no database, no chain).

Given the epoch's receipts (each with the voucher that paid it), the adapters' lineages, the split
parameters and the node's cumulative amounts after the previous epoch, `build_epoch` gives:
- per lane: the amount to collect (the sum of the lane's fees in this epoch) and the voucher to
  collect it with (the lane's highest-cumulative voucher in this epoch that is still valid when the
  settle lands, which covers everything collected before plus this amount, because a node only
  accepts `cumulative >= chargedTotal + maxFee`; `collectible` first drops what no such voucher covers);
- the rewards tree: every payee's CUMULATIVE amount over all epochs so far, leaves `(address, uint256)`;
- the receipts tree over this epoch's receipts (leaves = the EIP-712 Receipt fields, in id order);
- `rewards_total = previous_total + collected`, and the invariant sum(leaves) == rewards_total.
"""

from __future__ import annotations

from collections import Counter
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

from eth_utils import to_checksum_address

from node.protocol.hexstr import to_hex
from node.protocol.receipt import LEAF_TYPES, Receipt
from node.protocol.voucher import SignedVoucher
from node.settlement.merkle import MerkleTree
from node.settlement.split import Lineage, SplitParams, split_receipts

REWARD_LEAF_TYPES = ("address", "uint256")


@dataclass(frozen=True)
class EpochReceipt:
    """A receipt of the epoch (its row id and signed fields) with the voucher that paid it."""

    receipt_id: int
    receipt: Receipt
    voucher: SignedVoucher
    weights_bps: tuple[int, ...] | None = None  # method 2: this receipt's dataset weights (lineage order)
    charged_total: int = 0  # the lane's charged total once this receipt was charged

    @property
    def lane_key(self) -> tuple[str, int]:
        return self.voucher.payer.lower(), self.voucher.lane

    @property
    def adapter_id(self) -> int:
        return self.receipt.adapter_number

    @property
    def registry_block(self) -> int:
        return self.receipt.registry_block

    @property
    def fee(self) -> int:
        return self.receipt.fee

    @property
    def voucher_hash(self) -> str:
        return to_hex(self.receipt.voucher_hash)

    @property
    def lineage_hash(self) -> str:
        return to_hex(self.receipt.lineage_hash)


@dataclass(frozen=True)
class LaneCharge:
    payer: str
    lane: int
    amount: int
    voucher: SignedVoucher


@dataclass(frozen=True)
class EpochBuild:
    lanes: tuple[LaneCharge, ...]
    collected: int
    rewards_total: int
    cumulative: dict[str, int]  # checksummed payee -> cumulative amount over all epochs
    rewards: MerkleTree
    receipts: MerkleTree

    @property
    def receipt_count(self) -> int:
        return len(self.receipts)


def collectible(receipts: Sequence[EpochReceipt], valid_until: int) -> tuple[list[EpochReceipt], list[EpochReceipt]]:
    """(covered, uncovered): per lane, the best voucher still valid at `valid_until` (the highest
    cumulative with `deadline >= valid_until`) covers every receipt whose lane total after it is at
    most that cumulative (receipts on a lane are strictly ordered, vouchers cumulative); the rest of the
    lane, or all of it when no voucher stays valid, is uncovered."""
    best: dict[tuple[str, int], int] = {}
    for r in receipts:
        if r.voucher.deadline >= valid_until:
            best[r.lane_key] = max(best.get(r.lane_key, 0), r.voucher.cumulative)
    covered: list[EpochReceipt] = []
    uncovered: list[EpochReceipt] = []
    for r in receipts:
        is_covered = r.lane_key in best and r.charged_total <= best[r.lane_key]
        (covered if is_covered else uncovered).append(r)
    return covered, uncovered


def lane_charges(receipts: Sequence[EpochReceipt], valid_until: int = 0) -> tuple[LaneCharge, ...]:
    """Per (payer, lane): the sum of fees and the highest-cumulative voucher valid at `valid_until`
    (any voucher when none is); zero amounts dropped."""
    amounts: Counter[tuple[str, int]] = Counter()
    best: dict[tuple[str, int], SignedVoucher] = {}
    for r in receipts:
        key = r.lane_key
        amounts[key] += r.fee
        rank = (r.voucher.deadline >= valid_until, r.voucher.cumulative)
        if key not in best or rank > (best[key].deadline >= valid_until, best[key].cumulative):
            best[key] = r.voucher
    return tuple(LaneCharge(payer, lane, amounts[(payer, lane)], best[(payer, lane)])
                 for payer, lane in sorted(best) if amounts[(payer, lane)] > 0)


def rewards_tree(cumulative: Mapping[str, int], node: str) -> MerkleTree:
    """The cumulative rewards tree; a node with nothing earned yet publishes one zero leaf for itself."""
    leaves = [[account, amount] for account, amount in sorted(cumulative.items())] or [[node, 0]]
    return MerkleTree.of(leaves, REWARD_LEAF_TYPES)


def build_epoch(receipts: Sequence[EpochReceipt], lineages: Mapping[int, Lineage], params: SplitParams,
                previous: Mapping[str, int], previous_total: int, valid_until: int = 0) -> EpochBuild:
    """The epoch over `receipts` on top of `previous` (the last epoch's cumulative amounts keyed by
    checksummed address, as `cumulative_of` reads them: a key in another case would be a second leaf
    for the same payee)."""
    if not receipts:
        raise ValueError("an epoch needs at least one receipt")
    lanes = lane_charges(receipts, valid_until)
    collected = sum(c.amount for c in lanes)
    payees = {str(adapter_id): lineage for adapter_id, lineage in lineages.items()}
    keys = []
    for r in receipts:
        key = str(r.adapter_id)
        if r.weights_bps is not None:  # its own weights: one payee set per distinct weighting
            key = f"{r.adapter_id}:{','.join(map(str, r.weights_bps))}"
            if key not in payees:
                payees[key] = lineages[r.adapter_id].with_weights(r.weights_bps)
        keys.append((r.fee, key))
    shares = split_receipts(keys, payees, params)
    cumulative: Counter[str] = Counter(previous)  # checksummed already (`cumulative_of`): not hashed again
    for account, amount in shares.items():
        cumulative[to_checksum_address(account)] += amount
    rewards_total = previous_total + collected
    assert sum(cumulative.values()) == rewards_total, "the split must add up to what is collected"
    receipts_tree = MerkleTree.of([r.receipt.leaf() for r in receipts], LEAF_TYPES)
    return EpochBuild(lanes, collected, rewards_total, dict(cumulative), rewards_tree(cumulative, params.node),
                      receipts_tree)


def cumulative_of(rewards_dump: Mapping[str, Any] | None) -> dict[str, int]:
    """The payees' cumulative amounts from a published rewards tree (`standard-v1` dump)."""
    if not rewards_dump:
        return {}
    out = {to_checksum_address(v["value"][0]): int(v["value"][1]) for v in rewards_dump["values"]}
    return {a: v for a, v in out.items() if v}
