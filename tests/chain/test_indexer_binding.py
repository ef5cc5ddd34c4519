"""The mirror is bound to one chain and says when it cannot be trusted: the indexer halts on another
chain (and a restarted one refuses it too), notes an unreachable head at its first failed read, and a
mirror far behind the head is not trusted until it catches up. The API reads these off the cursor."""

from __future__ import annotations

import threading
import time
from datetime import UTC, datetime

import pytest
from sqlalchemy.orm import Session, sessionmaker

from node.chain.anvil import Anvil
from node.chain.indexer import Indexer
from node.db import queries
from node.db.queries import MirrorHead
from node.errors import ChainMismatch, ReorgTooDeep
from tests.fixtures.indexer import TOKEN, ChainWorld, drain, make_indexer, make_world

pytestmark = pytest.mark.chain


def _head(factory: sessionmaker[Session]) -> MirrorHead:
    with factory() as session:
        head = queries.mirror_head(session)
    assert head is not None
    return head


def _problem(factory: sessionmaker[Session]) -> str | None:
    return _head(factory).problem(datetime.now(UTC), max_lag_s=120.0, max_lag_blocks=32)


def test_a_chain_replaced_under_a_running_indexer_halts_it_and_says_why(db_url: str) -> None:
    chain = Anvil().start()
    try:
        world = make_world(chain)
        world.fund(3, 10 * TOKEN)
        world.deposit(3, 4, TOKEN)
        indexer, factory = make_indexer(world, db_url)
        drain(indexer)
        assert _problem(factory) is None
    finally:
        chain.stop()
    time.sleep(1.1)  # anvil's genesis is its start second: two started in one second are one chain so far
    with Anvil(port=chain.port) as fresh:  # the same URL, chain id and (after deploy) addresses
        assert make_world(fresh).dep.escrow == world.dep.escrow
        with pytest.raises(ChainMismatch, match="genesis"):
            indexer.run_once()
        problem = _problem(factory)
        assert problem is not None and "another chain" in problem and "fresh database" in problem
        with pytest.raises(ChainMismatch):  # a restarted indexer refuses too
            make_indexer(world, db_url)[0].run_once()


def test_an_unreachable_chain_makes_the_mirror_untrusted_at_the_first_failed_step(db_url: str) -> None:
    chain = Anvil().start()
    try:
        world = make_world(chain)
        indexer, factory = make_indexer(world, db_url, max_attempts=3, backoff_s=0.5, poll_interval_s=0.01)
        drain(indexer)
        assert _problem(factory) is None
    finally:
        chain.stop()
    problem = _follow_until_problem(indexer, factory, timeout_s=0.4)  # before the step's retries are over
    assert problem is not None and "cannot follow the chain" in problem and "rpc_unreachable" in problem


def test_a_mirror_far_behind_the_head_is_not_trusted_until_it_catches_up(world: ChainWorld, db_url: str) -> None:
    world.mine(60)
    indexer, factory = make_indexer(world, db_url, initial_range=4, max_range=4)
    indexer.run_once()
    problem = _problem(factory)
    assert problem is not None and "blocks behind the chain head" in problem
    drain(indexer)
    assert _problem(factory) is None


def _follow_until_problem(indexer: Indexer, factory: sessionmaker[Session], timeout_s: float = 5.0) -> str | None:
    stop = threading.Event()
    thread = threading.Thread(target=indexer.run_forever, args=(stop,), daemon=True)
    thread.start()
    deadline = time.monotonic() + timeout_s
    while _problem(factory) is None and time.monotonic() < deadline:
        time.sleep(0.01)
    stop.set()
    thread.join(timeout=10)
    return _problem(factory)


def test_a_chain_with_the_same_genesis_but_without_the_mirrors_blocks_is_not_trusted(
        world: ChainWorld, db_url: str) -> None:
    snapshot = world.chain.rpc("evm_snapshot")
    world.fund(3, 10 * TOKEN)
    world.deposit(3, 4, TOKEN)
    world.mine(20)
    indexer, factory = make_indexer(world, db_url, max_attempts=1, poll_interval_s=0.01)
    drain(indexer)
    world.chain.rpc("evm_revert", snapshot)  # the chain restarts from before the deposit
    problem = _follow_until_problem(indexer, factory)
    assert problem is not None and "rpc_behind" in problem  # it may be a lagging RPC: wait, refuse paid work
    world.mine(40)  # the chain now has the mirror's blocks, with other hashes: it is another chain
    with pytest.raises(ReorgTooDeep):
        drain(indexer)
    problem = _problem(factory)
    assert problem is not None and "reorg_too_deep" in problem and "another chain" in problem
