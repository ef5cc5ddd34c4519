"""`loranode api` SIGKILLed in the middle of a streamed answer, then started again: the dropped stream
is not charged, the client's retry (the same bytes, the same voucher) is served and charged once, and
every invariant holds."""

from __future__ import annotations

import json

import httpx
import pytest
from sqlalchemy import select

from node.db.models import Lane, Voucher
from node.protocol.voucher import decode_payment_header
from tests.e2e.cluster import Cluster
from tests.e2e.traffic import ClientLog, Outcome, send_raw
from tests.faults.steps import settled_and_whole, traffic

pytestmark = [pytest.mark.chain, pytest.mark.slow]
LANE = 40  # a lane of its own


def _lane(cluster: Cluster, payer: str) -> Lane | None:
    with cluster.factory() as session:
        return session.get(Lane, (payer.lower(), cluster.node.lower(), LANE))


def test_the_api_killed_mid_stream_charges_nothing_and_the_retry_is_served_once(
        cluster: Cluster, client_log: ClientLog) -> None:
    traffic(cluster, client_log, per_lane=1)
    payer = cluster.payer(0)
    body = json.dumps({"model": cluster.world.models[0], "prompt": "the sea is", "max_tokens": 48, "stream": True,
                       "stop": ["@@never@@"]}).encode()
    header = payer.payment_header(body, LANE)
    with httpx.stream("POST", f"{cluster.base_url}/v1/completions", content=body, timeout=60,
                      headers={"X-Payment": header, "Content-Type": "application/json"}) as resp:
        assert resp.status_code == 200
        lines = resp.iter_lines()
        assert next(lines).startswith("data: ")  # the answer is under way
        cluster.procs["api"].kill()
        with pytest.raises(httpx.HTTPError):
            list(lines)
    client_log.add(Outcome(payer.address, LANE, cluster.world.models[0], True, 0, (), "api killed"))

    cluster.start("api")
    cluster.wait_ready()
    lane = _lane(cluster, payer.address)
    assert lane is not None and lane.charged_total == 0  # the dropped stream charged nothing
    with cluster.factory() as session:
        assert session.scalars(select(Voucher).where(Voucher.payer == payer.address.lower())
                               .where(Voucher.lane == LANE)).all() == []
    retry = client_log.add(send_raw(cluster.base_url, body, header, payer.address, LANE))
    assert retry.is_served and len(retry.receipts) == 1, retry
    again = client_log.add(send_raw(cluster.base_url, body, header, payer.address, LANE))
    assert again.receipts == retry.receipts  # an idempotent replay: the same receipt, no second charge
    fee = int(retry.receipts[0]["fee"])
    assert _lane(cluster, payer.address).charged_total == fee  # type: ignore[union-attr]
    assert decode_payment_header(header).cumulative >= fee

    traffic(cluster, client_log, per_lane=1)  # every other lane is served by the new process too
    settled_and_whole(cluster, client_log)
