"""One node for the whole fault package, faults applied one after another, on a PRIVATE PostgreSQL
(initdb + pg_ctl in a temporary folder) and a private Redis, so a test may stop either and start it
again without touching the shared servers. Every paid call of the package goes into one ClientLog,
and after each fault the invariants are checked over everything that happened so far."""

from __future__ import annotations

from collections.abc import Iterator

import pytest

from tests.e2e.cluster import Cluster, running_cluster
from tests.e2e.invariants import Summary, check_invariants
from tests.e2e.servers import PrivatePostgres
from tests.e2e.traffic import ClientLog, burst
from tests.fixtures.models import TinyAdapters

LANES = [(payer, lane) for payer in range(3) for lane in (0, 1)]
MAX_MIRROR_LAG_S = 10.0  # the API refuses paid work once the mirror is this old (the RPC test waits it out)


@pytest.fixture(scope="package")
def postgres() -> Iterator[PrivatePostgres]:
    pg = PrivatePostgres().init()
    try:
        yield pg
    finally:
        pg.destroy()


@pytest.fixture(scope="package")
def cluster(postgres: PrivatePostgres, tiny_model: object, tiny_adapters: TinyAdapters,
            tmp_path_factory: pytest.TempPathFactory) -> Iterator[Cluster]:
    root = tmp_path_factory.mktemp("faults")
    with running_cluster(root, tiny_model, tiny_adapters.paths, postgres.url,  # type: ignore[arg-type]
                         max_mirror_lag_s=MAX_MIRROR_LAG_S) as node:
        yield node


@pytest.fixture(scope="package")
def client_log() -> ClientLog:
    return ClientLog()


def traffic(cluster: Cluster, log: ClientLog, per_lane: int = 2) -> None:
    """A burst of paid calls on every lane of LANES; each must be answered."""
    before = len(log.outcomes)
    burst([cluster.payer(i) for i in range(3)], LANES, cluster.world.models, log, per_lane)
    new = log.outcomes[before:]
    assert all(o.is_served for o in new), [(o.status, o.error) for o in new if not o.is_served]


def settled_and_whole(cluster: Cluster, log: ClientLog) -> Summary:
    """Every process alive, every receipt in a final epoch, and every invariant over the whole log."""
    cluster.check_alive()
    cluster.wait_settled()
    return check_invariants(cluster, log)
