"""The chain RPC cut off (the proxy every process reaches it through answers nothing): the indexer's
first failed head read marks the mirror untrusted, so the API refuses paid work with 503 at once (never
for max_mirror_lag_s more) and /ready says why; when the RPC comes back, the indexer catches up, the API
serves again and the waiting receipts settle. Every invariant holds."""

from __future__ import annotations

import time

import pytest

from tests.e2e.cluster import Cluster
from tests.e2e.traffic import ClientLog, paid_call
from tests.faults.steps import MAX_MIRROR_LAG_S, settled_and_whole, traffic

pytestmark = [pytest.mark.chain, pytest.mark.slow]
REFUSED_WITHIN_S = 5.0  # the indexer's poll, its first failed head read, the API's MIRROR_TTL_S, a call


def test_the_api_refuses_paid_work_as_soon_as_the_indexer_cannot_reach_the_chain(
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
            assert time.monotonic() - cut_at < REFUSED_WITHIN_S, f"still serving {served} calls after the cut"
            time.sleep(0.2)
        assert (outcome.status, outcome.error) == (503, "mirror_unavailable"), outcome
        assert time.monotonic() - cut_at < REFUSED_WITHIN_S < MAX_MIRROR_LAG_S
        ready = cluster.ready()
        assert ready.status_code == 503 and ready.json()["mirror"] is False and ready.json()["database"] is True
        assert "cannot follow the chain" in ready.json()["reason"], ready.json()
        assert cluster.rpc_proxy.counts["cut"] > 0
    finally:
        cluster.rpc_proxy.is_cut = False
    cluster.wait_ready()
    assert client_log.add(paid_call(client, payer.address, 3, model, i)).is_served
    traffic(cluster, client_log, per_lane=1)
    settled_and_whole(cluster, client_log)
