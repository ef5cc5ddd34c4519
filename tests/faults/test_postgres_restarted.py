"""The node's PostgreSQL (a private server) stopped as by a crash, then started again: while it is down
the API answers paid requests and /ready with 503 and charges nothing; after, the same vouchers are
served, no receipt is lost, indexer, worker and beat carry on, and every invariant holds."""

from __future__ import annotations

import json

import pytest

from tests.e2e.cluster import Cluster
from tests.e2e.servers import PrivatePostgres
from tests.e2e.traffic import ClientLog, send_raw
from tests.faults.steps import LANES, settled_and_whole, traffic

pytestmark = [pytest.mark.chain, pytest.mark.slow]


def test_the_api_answers_503_while_postgres_is_down_and_loses_no_receipt(
        cluster: Cluster, postgres: PrivatePostgres, client_log: ClientLog) -> None:
    traffic(cluster, client_log, per_lane=1)
    before = settled_and_whole(cluster, client_log)
    payers = [cluster.payer(i) for i in range(3)]
    signed = []
    for p, lane in LANES:  # vouchers signed while the node could still quote
        body = json.dumps({"model": cluster.world.models[lane], "prompt": f"the sea {p}", "max_tokens": 4}).encode()
        signed.append((body, payers[p].payment_header(body, lane), payers[p].address, lane))

    postgres.stop("immediate")
    try:
        down = [client_log.add(send_raw(cluster.base_url, *request)) for request in signed]
        assert {(o.status, o.error) for o in down} == {(503, "database_unavailable")}
        ready = cluster.ready()
        assert ready.status_code == 503 and ready.json()["database"] is False
    finally:
        postgres.start()

    # the indexer retries with a backoff (up to 5 s): until its next step the mirror is as old as the
    # outage, and the API may still refuse paid work as stale
    cluster.wait_mirror(cluster.w3.eth.block_number)
    cluster.wait_ready()
    up = [client_log.add(send_raw(cluster.base_url, *request)) for request in signed]  # the same vouchers
    assert all(o.is_served and len(o.receipts) == 1 for o in up), [(o.status, o.error) for o in up]
    traffic(cluster, client_log, per_lane=1)
    after = settled_and_whole(cluster, client_log)
    assert after.num_receipts == before.num_receipts + len(signed) + len(LANES)
