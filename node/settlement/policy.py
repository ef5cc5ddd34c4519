"""When the settlement worker closes an epoch, how large a settle may be, and which lanes pay for theirs.

An epoch closes when there are receipts not in any epoch and the oldest is `max_age_s` old, or they add
up to `max_value`, or the soonest-expiring voucher among them expires within `expiry_margin_s`. A voucher
counts only if it is still valid `land_within_s` after the build starts (chain time), the build's own
time (`build_s`) included.

The node pays a settle's gas in ETH and collects fees in the token. With the token's worth in ETH set
(`token_per_eth`), only lanes whose waiting fees cover their own voucher's gas at the chain's gas price
count (`GasFloor.lane`): a lane below it waits, nothing lost (vouchers are cumulative: the lane's next
voucher covers it too), until it is worth collecting; and an epoch closes only once what it would collect
also covers the settle's own gas (`GasFloor.base`), so the node never pays more gas than it collects.
The worker asks the gas price once a tick, and checks it again before an epoch's first send: an epoch the
price has risen past since it closed is dissolved and waits (node/settlement/service.py). Once sent, its
settle's fee bumps stop at what the epoch collects (`gas_budget_wei`): past that it waits for the price.
"""

from __future__ import annotations

from dataclasses import dataclass
from datetime import UTC

from node.settlement.latency import SettleLatency
from node.settlement.outbox import Pending

SETTLE_BASE_GAS = 200_000  # a settle of one voucher is 250k gas (bench/results/contract_gas.json) ...
LANE_GAS = 53_000  # ... and each voucher more about 53k: its signature, a cold `collected` slot, a transfer
ETH = 10**18  # wei


@dataclass(frozen=True)
class GasFloor:
    """What gas costs in token units at one gas price: a lane's voucher, and a settle before its vouchers."""

    lane: int = 0
    base: int = 0

    def covers(self, pending: Pending) -> bool:
        """Whether the waiting lanes' fees pay for the settle that would collect them."""
        return pending.total_fee >= self.base + self.lane * pending.num_lanes


@dataclass(frozen=True)
class EpochPolicy:
    max_age_s: float = 3_600.0
    max_value: int | None = None
    expiry_margin_s: float = 120.0
    land_within_s: float = SettleLatency().build_to_land_s  # a voucher must outlive the build's start by this
    build_s: float = SettleLatency().build_s  # the part of it the build itself may take
    max_lanes: int = 200  # vouchers per settle (~53k gas each): far below a 30M-gas block
    token_per_eth: int | None = None  # token units one ETH is worth; None: every lane is worth its gas

    def gas_floor(self, gas_price_wei: int) -> GasFloor:
        """Token units a lane's fees must reach to pay for its gas at `gas_price_wei` (rounded up)."""
        if self.token_per_eth is None:
            return GasFloor()
        per_gas = gas_price_wei * self.token_per_eth
        return GasFloor(lane=-(-LANE_GAS * per_gas // ETH), base=-(-SETTLE_BASE_GAS * per_gas // ETH))

    def gas_budget_wei(self, collected: int) -> int | None:
        """The most wei of gas a settle collecting `collected` token units may cost (None: no bound but the
        TxManager's `max_fee_cap`, as without `token_per_eth` the token's worth in ETH is unknown)."""
        return None if self.token_per_eth is None else collected * ETH // self.token_per_eth

    def is_due(self, pending: Pending, now: float, floor: GasFloor = GasFloor(),
               chain_now: float | None = None) -> bool:
        """Whether the receipts waiting (`pending`: of the lanes worth their gas) should be closed into an
        epoch at `now` (unix seconds): never before they pay for the settle's gas. A deadline is the chain's
        time: judged by `chain_now` (the latest block's) where it is ahead of `now` (a worker's clock that runs
        behind the chain's would keep an epoch open past its vouchers' expiry)."""
        if pending.num_receipts == 0 or pending.oldest_at is None or pending.earliest_deadline is None:
            return False
        if not floor.covers(pending):
            return False
        age = now - pending.oldest_at.astimezone(UTC).timestamp()
        by_value = self.max_value is not None and pending.total_fee >= self.max_value
        expires_by = max(now, chain_now if chain_now is not None else now) + self.expiry_margin_s
        return age >= self.max_age_s or by_value or pending.earliest_deadline <= expires_by
