"""The `settle` call of an outbox row: its calldata, and whether the chain already holds it."""

from __future__ import annotations

from node.chain.contracts import Settlement, SignedVoucher
from node.chain.eip712 import Voucher
from node.db.models import SettlementEpoch
from node.settlement.epoch_builder import PaidVoucher


def _hex(value: str) -> bytes:
    return bytes.fromhex(value.removeprefix("0x"))


def signed_vouchers(batch: dict[str, list[object]]) -> list[SignedVoucher]:
    out = []
    for raw in batch["vouchers"]:
        v = PaidVoucher.from_json(raw)  # type: ignore[arg-type]
        voucher = Voucher(v.payer, v.node, v.lane, v.cumulative, _hex(v.request_hash), v.deadline)
        out.append(SignedVoucher(voucher, _hex(v.signature)))
    return out


def settle_calldata(settlement: Settlement, row: SettlementEpoch) -> str:
    """abi-encoded `settle(epochId, vouchers, amounts, rewardsRoot, rewardsTotal, receiptsRoot, receiptCount)`."""
    assert row.batch is not None and row.rewards_root and row.receipts_root
    vouchers = [v.as_abi() for v in signed_vouchers(row.batch)]
    amounts = [int(a) for a in row.batch["amounts"]]  # type: ignore[call-overload]
    args = [row.epoch_id, vouchers, amounts, _hex(row.rewards_root), row.rewards_total, _hex(row.receipts_root),
            row.receipt_count]
    return str(settlement.contract.encode_abi("settle", args=args))


def epoch_matches(settlement: Settlement, node: str, row: SettlementEpoch) -> bool:
    """The chain holds epoch `row.epoch_id` of `node` with exactly this row's roots and totals."""
    if settlement.last_epoch(node) < row.epoch_id:
        return False
    info = settlement.epoch(node, row.epoch_id)
    return ("0x" + info.rewards_root.hex() == row.rewards_root and "0x" + info.receipts_root.hex() == row.receipts_root
            and info.rewards_total == row.rewards_total and info.receipt_count == row.receipt_count)
