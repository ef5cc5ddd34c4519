"""The node's worst-case settle latency, and the limits it puts on vouchers, epochs and the escrow.

One formula, written once. A receipt's money lands on chain at the latest after

    notice_s  = beat_s                 a tick sees its epoch due at most one beat late
    build_s   = build_allowance_s      the build itself: its rewards tree holds every payee ever paid (200k
                                       payees: 11.4 s to read, add, build and dump, dev box at load 4);
                                       the chain's clock runs meanwhile. A build that overruns it is redone
                                       with the horizon it measured (node/settlement/build_step.py)
    queue_s   = mine_s + beat_s        an epoch already built (never more than one) waits for its
                                       predecessor to be mined and a tick to send it, then ours closes
    send_s    = mine_s + beat_s        ours is built; its predecessor (just sent) is mined, a tick sends ours
    sweep_s   = 2 (mine_s + beat_s)    x402 only: before its settle, an epoch with x402 lanes waits for the
                                       guard's claim already in flight (sent at the end of a tick), then
                                       for its own claim and sweep, each mined and seen by a tick
                                       (node/settlement/x402_sweep.py); 0 on a node without x402
    land_s    = mine_s + reorg_s       ours is mined, fee bumps included, and mined again after a reorg

    worst_case_s = notice_s + queue_s + build_s + send_s + sweep_s + land_s     (from "due" to "on chain")
    build_to_land_s = build_s + send_s + sweep_s + land_s           (the voucher horizon, from the build's start)

Every lane of an epoch waits for its sweep, so sweep_s counts for lane vouchers too, not only x402's.

where beat_s is `settlement_interval_s`, build_allowance_s is `epoch_build_allowance_s`, mine_s is
`settle_max_mine_s` (broadcast to mined, fee bumps included), and reorg_s = `confirmations` x
`block_time_s` (the depth of reorg the node hedges against).

What follows from it, with hold_s = `reservation_ttl_s` (the API checks a voucher and the escrow when
it places a hold, and charges up to a hold's life later: only then is there a receipt to settle):
- an epoch closes while its soonest voucher still has `expiry_margin_s >= worst_case_s` to live;
- the API accepts a voucher only with `min_voucher_validity_s >= hold_s + worst_case_s` left;
- the escrow's `thawPeriod` must exceed `mirror_lag_s + hold_s + epoch_max_age_s + worst_case_s`: a payer
  whose thaw the mirror did not show yet (`max_mirror_lag_s` + `max_mirror_lag_blocks` x `block_time_s`, as
  stale as the API still serves paid work on) when its hold was placed cannot withdraw before the node has
  collected its charge.
"""

from __future__ import annotations

from dataclasses import dataclass

from node.errors import ConfigError


@dataclass(frozen=True)
class SettleLatency:
    beat_s: float = 15.0
    mine_s: float = 120.0
    reorg_s: float = 24.0
    max_age_s: float = 3_600.0
    has_x402: bool = False
    build_s: float = 30.0  # building and writing an epoch, at most (`epoch_build_allowance_s`)
    hold_s: float = 600.0  # from a voucher's and the escrow's checks (the hold) to its charge, at most
    mirror_lag_s: float = 0.0  # how long a thaw on chain may go unseen by the mirror the holds read

    @property
    def sweep_s(self) -> float:
        """x402: a guard claim in flight, then the epoch's own claim and sweep, before its settle is sent."""
        return 2 * (self.mine_s + self.beat_s) if self.has_x402 else 0.0

    @property
    def build_to_land_s(self) -> float:
        """From the start of an epoch's build to its settle landing: the horizon its vouchers must outlive
        (the build's own time included: the chain's clock runs while it builds)."""
        return self.build_s + (self.mine_s + self.beat_s) + self.sweep_s + (self.mine_s + self.reorg_s)

    @property
    def worst_case_s(self) -> float:
        """From an epoch being due (by age, value or a voucher's expiry) to its settle landing."""
        return self.beat_s + (self.mine_s + self.beat_s) + self.build_to_land_s

    @property
    def min_voucher_validity_s(self) -> float:
        """The least time a new voucher needs left: its request's hold, then the worst case from its charge."""
        return self.hold_s + self.worst_case_s

    @property
    def min_thaw_period_s(self) -> float:
        """The shortest escrow thaw period under which no charge can be withdrawn before it is collected
        (a hold may read the escrow before the mirror shows a thaw started up to `mirror_lag_s` earlier)."""
        return self.mirror_lag_s + self.hold_s + self.max_age_s + self.worst_case_s

    def check_thaw_period(self, thaw_period_s: int) -> None:
        """Refuse an escrow whose payers could withdraw what they were charged before it is collected."""
        if thaw_period_s <= self.min_thaw_period_s:
            raise ConfigError("the escrow's thaw period is too short for this node's settle latency: a payer "
                              "could withdraw what it was charged before the node collects it",
                              thaw_period_s=thaw_period_s, required_above_s=self.min_thaw_period_s,
                              epoch_max_age_s=self.max_age_s, worst_case_settle_s=self.worst_case_s)

    def check_voucher_horizon(self, min_voucher_validity_s: float, expiry_margin_s: float) -> None:
        """Refuse a voucher validity shorter than a hold's life plus the worst case, or an epoch expiry
        margin shorter than the worst case: an accepted voucher could expire before its epoch's settle
        lands (the node unpaid)."""
        if min_voucher_validity_s < self.min_voucher_validity_s or expiry_margin_s < self.worst_case_s:
            raise ConfigError("min_voucher_validity_s must be at least reservation_ttl_s plus the worst-case settle "
                              "latency, and epoch_expiry_margin_s at least the worst-case settle latency, or an "
                              "accepted voucher may expire before its epoch settles",
                              min_voucher_validity_s=min_voucher_validity_s, epoch_expiry_margin_s=expiry_margin_s,
                              worst_case_settle_s=self.worst_case_s, hold_s=self.hold_s, x402_sweep_s=self.sweep_s,
                              build_s=self.build_s)
