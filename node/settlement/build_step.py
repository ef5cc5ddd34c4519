"""OPEN -> BUILT: an epoch's receipts become its lanes, its split and its trees.

Only receipts that a voucher still valid when the settle lands covers are collected (chain time at the
build's start plus `land_within_s`, which counts `build_s` for the build itself); the others become
losses. The build is timed: one that took longer than `build_s` (a rewards tree grown past what the
allowance was set for) is rolled back and redone with the time it took as its allowance, so the horizon
still holds from the moment it is done; it logs a warning to raise `epoch_build_allowance_s`. An epoch
left with nothing to collect is dissolved. A lane the chain refuses later (node/settlement/submit_step.py)
leaves through `without_lane`, which rebuilds the rest.
"""

from __future__ import annotations

import logging
import math
import time
from collections.abc import Callable
from datetime import UTC, datetime

from sqlalchemy.orm import Session, sessionmaker

from node.chain.contracts import Settlement
from node.db.loss import LossReason
from node.db.models import EpochState, SettlementEpoch
from node.settlement import collection, outbox
from node.settlement.amendment import check_follows_chain
from node.settlement.epoch_builder import build_epoch, cumulative_of
from node.settlement.outbox import attempt_of
from node.settlement.refusal import LaneRefusal
from node.settlement.split import SplitParams

log = logging.getLogger(__name__)
REDO_LIMIT = 3  # builds of one epoch in a row before the last one stands, however long it took


class _Overran(Exception):
    """The build took longer than its allowance: its transaction is rolled back."""

    def __init__(self, took_s: float) -> None:
        super().__init__(took_s)
        self.took_s = took_s


class BuildStep:
    def __init__(self, factory: sessionmaker[Session], settlement: Settlement, node: str, params: SplitParams,
                 land_within_s: float, build_s: float = 0.0, timer: Callable[[], float] = time.monotonic) -> None:
        self.factory = factory
        self.settlement = settlement
        self.node = node
        self.params = params
        self.land_within_s = land_within_s  # from the build's start to the settle landing, build_s included
        self.build_s = build_s
        self.timer = timer

    def build(self, epoch_id: int) -> EpochState | None:
        """Build the epoch from its receipts that a voucher valid when the settle lands still covers; the
        others become losses. An epoch left with nothing to collect is dissolved (None). A build that took
        longer than `build_s` is redone with the time it took in the horizon."""
        allowance_s = self.build_s
        for attempt in range(1, REDO_LIMIT + 1):
            try:
                return self._build(epoch_id, allowance_s, last=attempt == REDO_LIMIT)
            except _Overran as overran:
                log.warning("epoch %d of %s took %.1f s to build, more than the %.1f s counted in its vouchers' "
                            "horizon: built again with %.1f s (raise epoch_build_allowance_s, or accepted "
                            "vouchers of the least validity may expire before their settle lands)", epoch_id,
                            self.node, overran.took_s, allowance_s, overran.took_s)
                allowance_s = overran.took_s
        raise AssertionError("the last build stands")

    def _build(self, epoch_id: int, allowance_s: float, last: bool) -> EpochState | None:
        started = self.timer()
        valid_until = self.chain_time() + math.ceil(self.land_within_s - self.build_s + allowance_s)
        with self.factory() as session, session.begin():
            row = outbox.epoch_row(session, self.node, epoch_id)
            assert row is not None and row.state is EpochState.OPEN
            covered, uncovered = collection.collectible(session, self.node, epoch_id, valid_until)
            collection.lose(session, self.node, epoch_id, uncovered, LossReason.VOUCHER_EXPIRED,
                            f"no voucher valid at {valid_until}")
            if not covered:
                outbox.dissolve(session, self.node, epoch_id)
                log.warning("epoch %d of %s dissolved: nothing left to collect", epoch_id, self.node)
                return None
            prev = outbox.epoch_row(session, self.node, epoch_id - 1)
            check_follows_chain(self.settlement, self.node, prev)  # never on a vetoed tree
            previous = cumulative_of(prev.trees["rewards"]) if prev and prev.trees else {}
            previous_total = (prev.rewards_total or 0) if prev else 0
            lineages, payouts = outbox.payees(session, covered)
            build = build_epoch(covered, lineages, self.params, previous, previous_total, valid_until)
            row.rewards_root, row.rewards_total = "0x" + build.rewards.root.hex(), build.rewards_total
            row.receipts_root, row.receipt_count = "0x" + build.receipts.root.hex(), build.receipt_count
            row.collected_total = build.collected
            row.trees = {"rewards": build.rewards.to_json(), "receipts": build.receipts.to_json()}
            row.batch = {"vouchers": [c.voucher.to_json() for c in build.lanes],
                         "amounts": [str(c.amount) for c in build.lanes], "attempt": attempt_of(row),
                         "payouts": payouts}
            row.state, row.built_at = EpochState.BUILT, datetime.now(UTC)
            session.flush()  # the trees written: the slow part is done
            took_s = self.timer() - started
            if took_s > allowance_s and not last:
                raise _Overran(took_s)  # rolled back, losses included
        log.info("epoch %d built: %d lanes, collected %d, rewards total %d", epoch_id, len(build.lanes),
                 build.collected, build.rewards_total)
        return EpochState.BUILT

    def without_lane(self, epoch_id: int, lane: LaneRefusal) -> SettlementEpoch | None:
        """The refused lane's receipts become losses; the epoch rebuilt without them (None: dissolved)."""
        with self.factory() as session, session.begin():
            row = outbox.epoch_row(session, self.node, epoch_id)
            assert row is not None
            receipts = [r for r in outbox.epoch_receipts(session, self.node, epoch_id)
                        if r.lane_key == (lane.payer, lane.lane)]
            collection.lose(session, self.node, epoch_id, receipts, lane.reason, lane.detail)
            row.state, row.batch, row.trees = EpochState.OPEN, {"attempt": attempt_of(row)}, None
        if self.build(epoch_id) is None:
            return None
        with self.factory() as session:
            rebuilt = outbox.epoch_row(session, self.node, epoch_id)
        assert rebuilt is not None
        return rebuilt

    def chain_time(self) -> int:
        """The latest block's timestamp: what the contract compares voucher deadlines with."""
        w3 = self.settlement.client.w3
        return int(w3.eth.get_block("latest")["timestamp"])
