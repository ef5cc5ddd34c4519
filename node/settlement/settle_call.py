"""The `settle` call of an outbox row: its calldata, and whether the chain already holds it."""

from __future__ import annotations

from typing import Any

from web3.exceptions import ContractLogicError

from node.chain.contracts import Settlement
from node.db.models import SettlementEpoch
from node.errors import ChainError
from node.protocol.hexstr import from_hex, to_hex
from node.protocol.voucher import SignedVoucher


def signed_vouchers(batch: dict[str, Any]) -> list[SignedVoucher]:
    return [SignedVoucher.from_json(raw) for raw in batch["vouchers"]]


def _settle_args(row: SettlementEpoch) -> list[Any]:
    assert row.batch is not None and row.rewards_root and row.receipts_root
    vouchers = [v.as_abi() for v in signed_vouchers(row.batch)]
    amounts = [int(a) for a in row.batch["amounts"]]
    return [row.epoch_id, vouchers, amounts, from_hex(row.rewards_root), row.rewards_total, from_hex(row.receipts_root),
            row.receipt_count]


def settle_calldata(settlement: Settlement, row: SettlementEpoch) -> str:
    """abi-encoded `settle(epochId, vouchers, amounts, rewardsRoot, rewardsTotal, receiptsRoot, receiptCount)`."""
    return str(settlement.contract.encode_abi("settle", args=_settle_args(row)))


def preflight(settlement: Settlement, node: str, row: SettlementEpoch) -> ChainError | None:
    """The `settle` as an eth_call from the node: the decoded custom error if it would revert now."""
    try:
        settlement.contract.functions.settle(*_settle_args(row)).call({"from": node})
    except ContractLogicError as exc:
        name, args = settlement.client.decoder.decode(exc.data if isinstance(exc.data, str) else None)
        return ChainError(f"settle would revert: {name}", error=name, args=args, epoch_id=row.epoch_id)
    return None


def epoch_matches(settlement: Settlement, node: str, row: SettlementEpoch) -> bool:
    """The chain holds epoch `row.epoch_id` of `node` with exactly this row's roots and totals."""
    if settlement.last_epoch(node) < row.epoch_id:
        return False
    info = settlement.epoch(node, row.epoch_id)
    return (to_hex(info.rewards_root) == row.rewards_root and to_hex(info.receipts_root) == row.receipts_root
            and info.rewards_total == row.rewards_total and info.receipt_count == row.receipt_count)
