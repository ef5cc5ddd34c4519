"""Which lane of a `settle` batch the chain refuses, and why.

The preflight (an eth_call of `settle`) names the first lane that would revert: by its index for the
voucher checks, by its payer and amount when the escrow is short (`InsufficientBalance` comes from the
escrow, which knows no index). That lane moves to a recorded loss and the batch is rebuilt without it;
an error that names no lane (out of order, vetoed, totals) is the epoch's, not a payer's.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

from node.db.loss import LossReason
from node.errors import ChainError
from node.protocol.voucher import SignedVoucher

BY_INDEX = {
    "VoucherExpired": LossReason.VOUCHER_EXPIRED,
    "InvalidVoucherSignature": LossReason.SETTLE_REFUSED,
    "VoucherNodeMismatch": LossReason.SETTLE_REFUSED,
    "ZeroCollect": LossReason.SETTLE_REFUSED,
    "AmountExceedsVoucher": LossReason.SETTLE_REFUSED,
}


class NotYet:
    """What `before_send` answers while its transactions are not mined: the epoch stays BUILT, tried again
    at the next tick."""


NOT_YET = NotYet()


@dataclass(frozen=True)
class LaneRefusal:
    payer: str
    lane: int
    reason: LossReason
    detail: str


def refused_lane(refusal: ChainError, vouchers: Sequence[SignedVoucher], amounts: Sequence[int]) -> LaneRefusal | None:
    """The lane the refusal names, or None when it names none."""
    name, args = refusal.facts.get("error"), refusal.facts.get("args") or {}
    detail = f"{name} {args}"
    if name in BY_INDEX and 0 <= int(args.get("index", -1)) < len(vouchers):
        v = vouchers[int(args["index"])]
        return LaneRefusal(v.payer.lower(), v.lane, BY_INDEX[name], detail)
    if name == "InsufficientBalance":
        short = str(args["payer"]).lower()
        lanes = [(v, a) for v, a in zip(vouchers, amounts, strict=True) if v.payer.lower() == short]
        if lanes:
            v = next((v for v, a in lanes if a == int(args["amount"])), lanes[0][0])
            return LaneRefusal(v.payer.lower(), v.lane, LossReason.ESCROW_SHORT, detail)
    return None
