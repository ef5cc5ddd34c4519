"""An indexer killed (SIGKILL) mid-backfill resumes to exactly the state of an uninterrupted run."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
from sqlalchemy import select

from node.db.models import IndexerCursor
from tests.fixtures.indexer import TOKEN, ChainWorld, drain, make_indexer, mirror_dump

pytestmark = pytest.mark.chain
REPO = Path(__file__).resolve().parents[2]

# A separate process that follows the chain in two-block steps until it is killed.
RUNNER = """
import json, sys, threading
from node.chain.indexer import IndexedContracts, Indexer, IndexerConfig
from node.db.session import make_engine, session_factory
rpc, db, contracts, start = sys.argv[1], sys.argv[2], json.loads(sys.argv[3]), int(sys.argv[4])
cfg = IndexerConfig(chain_id=31337, confirmations=0, finality_depth=16, start_block=start,
                    initial_range=2, max_range=2, poll_interval_s=0.05)
indexer = Indexer(cfg, rpc, session_factory(make_engine(db)), IndexedContracts(**contracts))
indexer.run_forever(threading.Event())
"""


def _activity(world: ChainWorld) -> None:
    world.fund(5, 1_000 * TOKEN)
    for i in range(20):
        world.register_dataset(1 + i % 4, f"ipfs://set{i}")
        world.deposit(5, 6 + i % 2, (i + 1) * TOKEN)
        if i % 5 == 4:
            world.thaw(5, 6, i * TOKEN)
            world.register_adapter(2, [i, i + 1], [5_000, 5_000])
    world.mine(20)


def _cursor(factory: object) -> int:
    with factory() as s:  # type: ignore[operator]
        cur = s.scalars(select(IndexerCursor)).first()
        return -1 if cur is None else int(cur.last_block)


@pytest.mark.slow
def test_killed_mid_backfill_resumes_to_the_same_state(world: ChainWorld, db_url: str,
                                                       tmp_path: Path) -> None:
    _activity(world)
    head = world.head()
    reference, ref_factory = make_indexer(world, f"sqlite:///{tmp_path / 'reference.db'}")
    drain(reference)

    indexer, factory = make_indexer(world, db_url)  # migrates the database the runner writes
    contracts = json.dumps(world.contracts.__dict__)
    env = {**os.environ, "PYTHONPATH": str(REPO)}
    proc = subprocess.Popen([sys.executable, "-c", RUNNER, world.chain.rpc_url, db_url, contracts,
                             str(world.dep.from_block)], env=env, cwd=REPO)
    try:
        deadline = time.monotonic() + 60
        while _cursor(factory) < head // 2 and time.monotonic() < deadline and proc.poll() is None:
            time.sleep(0.02)
        proc.send_signal(signal.SIGKILL)
    finally:
        proc.wait(timeout=10)
    killed_at = _cursor(factory)
    assert head // 2 <= killed_at < head, "the runner must be killed mid-backfill"

    drain(indexer)

    got, want = mirror_dump(factory), mirror_dump(ref_factory)
    final = want["cursor"][0]["final"]
    # every unfinalized block hash is kept; below that, which range ends were stored differs
    assert [b for b in got.pop("chain_blocks") if b["number"] > final] == [
        b for b in want.pop("chain_blocks") if b["number"] > final]
    assert got == want
    assert len(got["raw_events"]) == 20 * 2 + 4 * 2  # no event lost, none twice
