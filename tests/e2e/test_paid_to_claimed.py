"""One node under concurrent paid traffic, end to end: three dApps on three lanes each, four adapters,
plain and streamed chat and completions through the official openai client, epochs settling on chain
while the requests keep coming, then every payee claiming. Processes: `loranode api`, `indexer`,
`worker` and `beat` on PostgreSQL, with Redis as the broker and anvil as the chain."""

from __future__ import annotations

import logging
from pathlib import Path

import pytest
from sqlalchemy import func, select

from node.db.models import EpochState, Receipt, SettlementEpoch
from tests.e2e.cluster import running_cluster
from tests.e2e.invariants import check_invariants, claim_everything
from tests.e2e.traffic import ClientLog, Traffic
from tests.fixtures.models import TinyAdapters

pytestmark = [pytest.mark.chain, pytest.mark.slow]
log = logging.getLogger(__name__)


def test_paid_traffic_settles_while_it_flows_and_every_payee_claims(
        tiny_model: Path, tiny_adapters: TinyAdapters, postgres_url: str, tmp_path: Path) -> None:
    with running_cluster(tmp_path, tiny_model, tiny_adapters.paths, postgres_url) as cluster:
        calls = ClientLog()
        payers = [cluster.payer(i) for i in range(3)]
        lanes = [(p, lane) for p in range(3) for lane in (0, 1, 7)]

        def settled_twice_under_load() -> bool:
            finals = sum(s is EpochState.FINAL for s in cluster.epochs().values())
            return finals >= 2 and len(calls.outcomes) >= 80

        with Traffic(payers, lanes, cluster.world.models, calls):
            cluster.wait_for(settled_twice_under_load, "two final epochs and 80 answers under load", 240)
        cluster.check_alive()
        assert calls.statuses() == {200: len(calls.outcomes)}, calls.statuses()
        cluster.wait_settled()
        summary = check_invariants(cluster, calls)
        assert summary.num_lanes == 9 and summary.num_receipts == summary.num_answers == summary.num_served >= 80
        assert summary.num_final_epochs >= 3
        with cluster.factory() as session:
            first_final = session.scalar(select(func.min(SettlementEpoch.finalized_at)))
            last_receipt = session.scalar(select(func.max(Receipt.created_at)))
            adapters = set(session.scalars(select(Receipt.adapter_id).distinct()))
        assert first_final < last_receipt, "no epoch was final while requests were still being served"
        assert adapters == set(cluster.world.lineages)
        paid = claim_everything(cluster)
        log.info("e2e: %s; %d payees claimed %d", summary, len(paid), sum(paid.values()))
        assert len(paid) == 2 + 2 + 3  # treasury, node, two adapter owners, three contributors
