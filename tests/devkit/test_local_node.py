"""The dev node with its indexer in a process of its own (`loranode indexer`, as a deployment runs it)."""

from __future__ import annotations

from pathlib import Path

from eth_utils import keccak
from sqlalchemy import select

from node.db.models import Dataset
from node.db.session import make_engine, session_factory
from node.devkit.local_node import FIRST_USER, LocalNode


def test_an_indexer_process_mirrors_the_chain_and_stops_with_the_node(tmp_path: Path) -> None:
    node = LocalNode.start_chain(tmp_path / "node", indexer_process=True)
    try:
        (indexer,) = node._procs
        c = node.contracts(FIRST_USER)
        dataset_id = c.datasets.register(keccak(b"a dataset"), "file:///d", c.client.address)
        node.wait_for_mirror(timeout_s=60)
        with session_factory(make_engine(node.settings.resolved_database_url(), pooled=False))() as session:
            assert session.scalars(select(Dataset.dataset_id)).all() == [dataset_id]
        assert not any(t.name == "local-indexer" for t in node._threads)  # not a thread of this process
    finally:
        node.stop()
    assert indexer.poll() is not None
