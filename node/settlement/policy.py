"""When the settlement worker closes an epoch, and how large a settle may be.

An epoch closes when there are receipts not in any epoch and the oldest is `max_age_s` old, or they add
up to `max_value`, or the soonest-expiring voucher among them expires within `expiry_margin_s`. A voucher
counts only if it is still valid `land_within_s` after the build (chain time).
"""

from __future__ import annotations

from dataclasses import dataclass
from datetime import UTC

from node.settlement.latency import SettleLatency
from node.settlement.outbox import Pending


@dataclass(frozen=True)
class EpochPolicy:
    max_age_s: float = 3_600.0
    max_value: int | None = None
    expiry_margin_s: float = 120.0
    land_within_s: float = SettleLatency().build_to_land_s  # a voucher must outlive the build by this
    max_lanes: int = 200  # vouchers per settle (~53k gas each): far below a 30M-gas block

    def is_due(self, pending: Pending, now: float) -> bool:
        """Whether the receipts waiting (`pending`) should be closed into an epoch at `now` (unix seconds)."""
        if pending.num_receipts == 0 or pending.oldest_at is None or pending.earliest_deadline is None:
            return False
        age = now - pending.oldest_at.astimezone(UTC).timestamp()
        by_value = self.max_value is not None and pending.total_fee >= self.max_value
        return age >= self.max_age_s or by_value or pending.earliest_deadline <= now + self.expiry_margin_s
