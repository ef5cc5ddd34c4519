"""One node for the whole fault package, faults applied one after another, on a PRIVATE PostgreSQL
(initdb + pg_ctl in a temporary folder) and a private Redis, so a test may stop either and start it
again without touching the shared servers. Every paid call of the package goes into one ClientLog,
and after each fault the invariants are checked over everything that happened so far."""

from __future__ import annotations

import logging
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.e2e.cluster import Cluster, running_cluster
from tests.e2e.servers import PrivatePostgres
from tests.e2e.traffic import ClientLog
from tests.faults.steps import MAX_MIRROR_LAG_S
from tests.fixtures.models import TinyAdapters

log = logging.getLogger(__name__)


@pytest.fixture(scope="package")
def postgres() -> Iterator[PrivatePostgres]:
    started = time.monotonic()
    pg = PrivatePostgres().init()
    log.info("private postgres up in %.1fs", time.monotonic() - started)
    try:
        yield pg
    finally:
        pg.destroy()


@pytest.fixture(scope="package")
def cluster(postgres: PrivatePostgres, tiny_model: Path, tiny_adapters: TinyAdapters,
            tmp_path_factory: pytest.TempPathFactory) -> Iterator[Cluster]:
    root = tmp_path_factory.mktemp("faults")
    with running_cluster(root, tiny_model, tiny_adapters.paths, postgres.url,
                         max_mirror_lag_s=MAX_MIRROR_LAG_S) as node:
        yield node


@pytest.fixture(scope="package")
def client_log() -> ClientLog:
    """Every paid call of the package, for the invariants after each fault."""
    return ClientLog()
