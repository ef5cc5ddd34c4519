"""A stranger's registry transaction cannot stop the indexer, and with it every paid request.

Anyone may register a dataset or an adapter, with any `uri` bytes: the registries check neither. A NUL
character in that uri reached the mirror's `uri` TEXT column as it was, which PostgreSQL refuses
(`DataError`: text cannot contain NUL). The indexer retries only RPC and connection errors, so one such
registration stopped it at that block for good, on every node mirroring these registries (a restart
reads the same log again): the mirror went stale and the API refused all paid work (503
`mirror_unavailable`), so no payer was served and no payee paid. The decoder now writes a NUL in an
event's string as U+FFFD, as it does for bytes that are not UTF-8. Real anvil, contracts and indexer, on
SQLite and PostgreSQL."""

from __future__ import annotations

import threading

import pytest
from sqlalchemy import select

from node.db import queries
from node.db.models import Adapter, Dataset
from tests.fixtures.indexer import TOKEN, ChainWorld, drain, make_indexer

pytestmark = pytest.mark.chain
NODE, PAYER, STRANGER = 4, 3, 5


def test_a_registration_with_a_nul_in_its_uri_does_not_stop_the_mirror(world: ChainWorld, db_url: str) -> None:
    indexer, factory = make_indexer(world, db_url)
    world.register_dataset(1, "ipfs://honest")
    drain(indexer)

    world.register_dataset(STRANGER, "ipfs://a\x00b")  # the stranger's registration
    world.register_adapter(STRANGER, [1], [10_000], uri="https://x/\x00")
    world.fund(PAYER, 10 * TOKEN)
    world.deposit(PAYER, NODE, 3 * TOKEN)  # an honest payer's deposit, after it
    world.mine(20)  # final
    drain(indexer)

    with factory() as s:
        assert {d.dataset_id: d.uri for d in s.scalars(select(Dataset))} == {1: "ipfs://honest", 2: "ipfs://a\ufffdb"}
        assert [a.uri for a in s.scalars(select(Adapter))] == ["https://x/\ufffd"]
        escrow = queries.escrow(s, world.addresses[PAYER], world.addresses[NODE])
        assert escrow is not None and escrow.balance == 3 * TOKEN


def test_the_indexer_keeps_running_past_such_a_registration(world: ChainWorld, db_url: str) -> None:
    """What the operator sees: `run_forever` (what `loranode indexer` runs) goes on following the chain."""
    indexer, factory = make_indexer(world, db_url, poll_interval_s=0.05)
    world.register_dataset(STRANGER, "\x00")
    stop = threading.Event()
    thread = threading.Thread(target=indexer.run_forever, args=(stop,), daemon=True)
    thread.start()
    try:
        world.register_dataset(1, "ipfs://after")
        world.mine(20)
        for _ in range(600):  # a minute at least, on a loaded box
            with factory() as s:
                if s.scalar(select(Dataset.uri).where(Dataset.dataset_id == 2)) is not None:
                    break
            assert thread.is_alive(), "the indexer stopped"
            stop.wait(0.1)
        with factory() as s:
            assert s.scalar(select(Dataset.uri).where(Dataset.dataset_id == 2)) == "ipfs://after"
            head = queries.mirror_head(s)
            assert head is not None and head.stalled_reason is None
    finally:
        stop.set()
        thread.join(timeout=30)
