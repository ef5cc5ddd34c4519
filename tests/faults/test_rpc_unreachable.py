"""The chain RPC cut off (the proxy every process reaches it through answers nothing): the API keeps
serving from its mirror while the mirror is younger than max_mirror_lag_s, then refuses paid work with
503 and /ready says so; when the RPC comes back, the indexer catches up, the API serves again and the
waiting receipts settle. Every invariant holds."""

from __future__ import annotations

import time

import pytest

from tests.e2e.cluster import Cluster
from tests.e2e.traffic import ClientLog, paid_call
from tests.faults.steps import MAX_MIRROR_LAG_S, settled_and_whole, traffic

pytestmark = [pytest.mark.chain, pytest.mark.slow]


def test_the_api_serves_from_its_mirror_until_it_is_stale_then_refuses(
        cluster: Cluster, client_log: ClientLog) -> None:
    cluster.wait_ready()  # a fresh mirror to start from
    payer = cluster.payer(1)
    client = payer.openai(lane=3, max_retries=0)
    model = cluster.world.models[1]
    cluster.rpc_proxy.is_cut = True
    cut_at = time.monotonic()
    try:
        served, i = 0, 0
        while True:
            outcome = client_log.add(paid_call(client, payer.address, 3, model, i))
            i += 1
            if not outcome.is_served:
                break
            served += 1
            assert time.monotonic() - cut_at < MAX_MIRROR_LAG_S + 5, "still serving long past the staleness bound"
            time.sleep(0.5)
        refused_after = time.monotonic() - cut_at
        assert (outcome.status, outcome.error) == (503, "mirror_unavailable"), outcome
        assert served >= 1 and refused_after > MAX_MIRROR_LAG_S - 3  # served from the mirror for a while
        ready = cluster.ready()
        assert ready.status_code == 503 and ready.json()["mirror"] is False and ready.json()["database"] is True
        assert cluster.rpc_proxy.counts["cut"] > 0
    finally:
        cluster.rpc_proxy.is_cut = False
    cluster.wait_ready()
    assert client_log.add(paid_call(client, payer.address, 3, model, i)).is_served
    traffic(cluster, client_log, per_lane=1)
    settled_and_whole(cluster, client_log)
