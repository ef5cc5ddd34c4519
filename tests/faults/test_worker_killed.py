"""The settlement worker SIGKILLed at each gap between the outbox's durable steps, one epoch per gap:
the worker started after it continues the epoch, which settles exactly once (one settle transaction
per epoch), and every invariant holds after each.

The points run latest first, and the worker started after each death is the one that dies at the
next point: continuing an epoch from a later state never passes an earlier point again, so every
epoch is killed exactly once, and the cluster starts one worker per point instead of two.

Two things each point waits for rather than leaves to timing (both failed under load):
- each epoch holds one whole burst: a dying worker closes an epoch when told, once the burst is
  answered. Closing by age (1 s here) split a burst that took longer into two epochs, and the worker
  armed for the next point died on the second while continuing the first: nothing settled any more.
- the chain holds still from the close to the death: the settle's block is the last, so the worker
  finds it mined, not final. With a block a second, a worker that polled late found it final, went
  from SUBMITTED straight to FINAL, and never reached the `confirmed` point.
The mirror (the indexer) moves an epoch whose settle it sees on chain to CONFIRMED by itself, so a
worker killed after its settle was mined leaves its state or CONFIRMED.
"""

from __future__ import annotations

import signal

import pytest

from node.db.models import EpochState
from node.settlement.celery_app import CLOSE_TASK, make_celery
from tests.e2e.cluster import OPERATOR, Cluster
from tests.e2e.processes import NodeProcess
from tests.e2e.traffic import ClientLog
from tests.faults.steps import settled_and_whole, traffic

pytestmark = [pytest.mark.chain, pytest.mark.slow]

# kill point (see tests/faults/dying_worker.py), the outbox state it leaves, is the settle on chain
POINTS = [("confirmed", EpochState.CONFIRMED, True), ("submitted", EpochState.SUBMITTED, True),
          ("broadcast", EpochState.BUILT, True), ("signed", EpochState.BUILT, False),
          ("built", EpochState.BUILT, False), ("opened", EpochState.OPEN, False)]
DYING_MAX_AGE_S = 1_800.0  # a dying worker's epoch_max_age_s (the default): it closes an epoch when told


def _dying_worker(cluster: Cluster, point: str | None) -> NodeProcess:
    if point is None:
        return cluster.start("worker")
    return cluster.start("worker", ("-m", "tests.faults.dying_worker", point), epoch_max_age_s=DYING_MAX_AGE_S)


def _close_epoch(cluster: Cluster) -> None:
    """Ask the worker (its close_epoch task) to close an epoch of every receipt waiting."""
    make_celery(cluster.settings).send_task(CLOSE_TASK, args=(cluster.node,))


def test_a_worker_killed_at_every_settlement_state_is_continued_by_the_next(
        cluster: Cluster, client_log: ClientLog) -> None:
    cluster.wait_settled()
    cluster.procs["worker"].stop()
    worker = _dying_worker(cluster, POINTS[0][0])
    settlement = cluster.contracts(OPERATOR).settlement
    for i, (point, left_at, on_chain) in enumerate(POINTS):
        epoch_id = max(cluster.epochs(), default=0) + 1
        traffic(cluster, client_log, per_lane=1)
        with cluster.miner.paused():
            _close_epoch(cluster)
            assert worker.wait_exit(120) == -signal.SIGKILL, worker.log_tail()
            state = cluster.epochs()[epoch_id]
            assert state is left_at or (on_chain and state is EpochState.CONFIRMED), (point, state)
            assert settlement.last_epoch(cluster.node) == epoch_id - (0 if on_chain else 1), point
        worker = _dying_worker(cluster, POINTS[i + 1][0] if i + 1 < len(POINTS) else None)
        summary = settled_and_whole(cluster, client_log)
        assert summary.num_final_epochs == epoch_id, point
