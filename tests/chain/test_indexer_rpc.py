"""A misbehaving RPC (ranges refused, stalls, dropped connections) slows the indexer down but loses
nothing and never stops it."""

from __future__ import annotations

import threading
import time
from pathlib import Path

import pytest
from sqlalchemy import select

from node.chain.rpc import Rpc
from node.db.models import IndexerCursor
from tests.fixtures.flaky_rpc import FlakyRpc
from tests.fixtures.indexer import TOKEN, ChainWorld, drain, make_indexer, mirror_dump

pytestmark = pytest.mark.chain


def _activity(world: ChainWorld) -> None:
    world.fund(3, 100 * TOKEN)
    for i in range(12):
        world.register_dataset(1 + i % 3, f"ipfs://d{i}")
        world.deposit(3, 4, TOKEN)
        world.mine(2)
    world.register_adapter(2, [1, 2], [4_000, 6_000])


def test_rpc_failures_are_retried_with_smaller_ranges_and_lose_nothing(
        world: ChainWorld, db_url: str, flaky_rpc: type[FlakyRpc], tmp_path: Path) -> None:
    _activity(world)
    reference, ref_factory = make_indexer(world, f"sqlite:///{tmp_path / 'reference.db'}")
    drain(reference)

    proxy = flaky_rpc(world.chain.rpc_url, max_log_range=4, stall_every=9, drop_every=7, stall_s=0.5).start()
    indexer, factory = make_indexer(world, db_url, rpc=Rpc(proxy.url, timeout_s=0.2), initial_range=64,
                                    max_attempts=2, poll_interval_s=0.05, max_backoff_s=0.2)
    stop, crashed = threading.Event(), []

    def follow() -> None:
        try:
            indexer.run_forever(stop)
        except BaseException as e:  # the test fails on any escape
            crashed.append(e)
    thread = threading.Thread(target=follow)
    thread.start()
    head, deadline = world.head(), time.monotonic() + 60
    while time.monotonic() < deadline:
        with factory() as s:
            cur = s.scalars(select(IndexerCursor)).first()
        if cur is not None and cur.last_block >= head:
            break
        time.sleep(0.1)
    stop.set()
    thread.join(timeout=10)

    assert crashed == [] and not thread.is_alive()
    assert proxy.counts["refused_range"] > 0 and proxy.counts["dropped"] > 0 and proxy.counts["stalled"] > 0
    # it learned the provider's limit from the first refusal instead of hammering it
    assert proxy.counts["refused_range"] == 1 and indexer.range_cap == 4
    got, want = mirror_dump(factory), mirror_dump(ref_factory)
    assert {k: v for k, v in got.items() if k != "chain_blocks"} == {
        k: v for k, v in want.items() if k != "chain_blocks"}


def test_a_log_query_answered_by_a_lagging_node_loses_no_event(
        world: ChainWorld, db_url: str, flaky_rpc: type[FlakyRpc], tmp_path: Path) -> None:
    """A load-balanced RPC whose nodes are not all at the head: a node behind answers eth_getLogs with no
    logs for the blocks it lacks (as if they had none), while the headers come from a node that has them.
    The indexer moved its cursor past those blocks and never read their events again: a payer's thaw
    missed this way let the node serve against money the payer was about to withdraw. The log query now
    carries the range's last header in the same request: a node that lacks it is behind, and is asked again."""
    _activity(world)
    world.thaw(3, 4, 5 * TOKEN)
    world.mine(2)
    reference, ref_factory = make_indexer(world, f"sqlite:///{tmp_path / 'reference.db'}")
    drain(reference)

    proxy = flaky_rpc(world.chain.rpc_url, behind_every=2, behind_by=1_000).start()
    indexer, factory = make_indexer(world, db_url, rpc=Rpc(proxy.url), initial_range=4_096, backoff_s=0.0)
    drain(indexer)
    assert proxy.counts["behind"] > 0
    assert mirror_dump(factory) == mirror_dump(ref_factory)
