"""The broker (a private Redis) killed while receipts wait to be settled and started again empty: the
API keeps serving and charging meanwhile (it never talks to the broker), settlement stops, then
resumes by itself; worker and beat survive; every invariant holds."""

from __future__ import annotations

import time

import pytest

from tests.e2e.cluster import Cluster
from tests.e2e.traffic import ClientLog
from tests.faults.steps import settled_and_whole, traffic

pytestmark = [pytest.mark.chain, pytest.mark.slow]


def test_settlement_stops_while_redis_is_down_and_resumes_after(cluster: Cluster, client_log: ClientLog) -> None:
    cluster.wait_settled()
    final_before = len(cluster.epochs())
    cluster.redis.kill()
    traffic(cluster, client_log, per_lane=2)  # answered and charged with the broker gone
    time.sleep(3)
    assert cluster.num_unsettled() > 0 and len(cluster.epochs()) == final_before  # nothing ticks the worker
    cluster.check_alive("worker", "beat")
    cluster.redis.start()  # same port, empty queue
    summary = settled_and_whole(cluster, client_log)
    assert summary.num_final_epochs > final_before
