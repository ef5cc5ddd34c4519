"""The indexer keeps the mirror true through reorgs, on anvil and on both databases."""

from __future__ import annotations

import pytest
from sqlalchemy import select
from sqlalchemy.orm import Session, sessionmaker

from node.db import queries
from node.db.models import Dataset, RawEvent
from node.db.queries import Escrow
from node.errors import ReorgTooDeep, RpcBehind
from tests.fixtures.indexer import TOKEN, ChainWorld, drain, make_indexer, mirror_dump

pytestmark = pytest.mark.chain


def _uris(factory: sessionmaker[Session]) -> dict[int, str]:
    with factory() as s:
        return {d.dataset_id: d.uri for d in s.scalars(select(Dataset))}


def test_a_dataset_reorged_away_disappears(world: ChainWorld, db_url: str) -> None:
    indexer, factory = make_indexer(world, db_url)
    world.register_dataset(1, "ipfs://kept")
    world.mine(2)
    world.register_dataset(2, "ipfs://reorged")
    drain(indexer)
    assert _uris(factory) == {1: "ipfs://kept", 2: "ipfs://reorged"}

    world.reorg(1)  # the block with the second registration is replaced by an empty one
    steps = drain(indexer)

    assert [p.num_rolled_back for p in steps if p.rolled_back_to is not None] == [1]
    assert _uris(factory) == {1: "ipfs://kept"}
    with factory() as s:
        assert [e.event for e in s.scalars(select(RawEvent))] == ["DatasetRegistered"]


def test_a_transaction_re_included_in_another_block_leaves_one_row(world: ChainWorld, db_url: str) -> None:
    indexer, factory = make_indexer(world, db_url)
    sent = world.register_dataset(1, "ipfs://moved")
    world.mine(1)
    drain(indexer)

    world.reorg(2, [(sent.raw, 1)])  # the same signed tx lands one block later on the new branch
    new_block = int(world.w3.eth.get_transaction_receipt(sent.tx_hash)["blockNumber"])
    drain(indexer)

    assert new_block != sent.block
    with factory() as s:
        rows = list(s.scalars(select(RawEvent).where(RawEvent.tx_hash == sent.tx_hash)))
        datasets = list(s.scalars(select(Dataset)))
    assert [(r.block_number, r.block_hash) for r in rows] == [
        (new_block, world.w3.eth.get_block(new_block)["hash"].to_0x_hex())]
    assert [(d.dataset_id, d.block_number) for d in datasets] == [(1, new_block)]


def test_a_deposit_counts_once_final_so_a_reorg_never_removes_a_spent_one(world: ChainWorld, db_url: str) -> None:
    payer, node = 3, 4
    world.fund(payer, 100 * TOKEN)
    world.deposit(payer, node, 10 * TOKEN)
    world.thaw(payer, node, 2 * TOKEN)
    world.deposit(payer, node, 7 * TOKEN)
    indexer, factory = make_indexer(world, db_url)  # finality_depth 16
    drain(indexer)

    def escrow() -> Escrow:
        with factory() as s:
            return queries.escrow(s, world.addresses[payer], world.addresses[node])
    assert (escrow().balance, escrow().pending_deposits, escrow().spendable) == (17 * TOKEN, 17 * TOKEN, 0)

    world.reorg(1)  # the second deposit is gone: nobody could have spent it
    drain(indexer)
    assert (escrow().balance, escrow().pending_deposits, escrow().spendable) == (10 * TOKEN, 10 * TOKEN, 0)

    world.mine(16)
    drain(indexer)
    assert (escrow().pending_deposits, escrow().pending_until_block, escrow().spendable) == (0, None, 8 * TOKEN)


def test_a_reverted_chain_is_rolled_back_and_rescanned(world: ChainWorld, db_url: str) -> None:
    """evm_revert to a snapshot, then a different history, shorter at first."""
    indexer, factory = make_indexer(world, db_url)
    world.register_dataset(1, "ipfs://before")
    snap = world.chain.rpc("evm_snapshot")
    world.register_dataset(1, "ipfs://undone")
    world.mine(3)
    drain(indexer)
    assert set(_uris(factory).values()) == {"ipfs://before", "ipfs://undone"}

    world.chain.rpc("evm_revert", snap)
    world.register_dataset(2, "ipfs://instead")
    before = mirror_dump(factory)
    with pytest.raises(RpcBehind):  # shorter than the mirror: a lagging node looks the same, so wait
        indexer.run_once()
    assert mirror_dump(factory) == before

    world.mine(4)  # now the chain has the mirror's last block number, with another hash
    drain(indexer)

    assert _uris(factory) == {1: "ipfs://before", 2: "ipfs://instead"}


def test_rows_turn_final_and_a_deeper_reorg_halts_without_rewriting(world: ChainWorld, db_url: str) -> None:
    indexer, factory = make_indexer(world, db_url, finality_depth=4)
    world.register_dataset(1, "ipfs://settled")
    world.mine(10)
    drain(indexer)
    with factory() as s:
        assert [(d.uri, d.is_final) for d in s.scalars(select(Dataset))] == [("ipfs://settled", True)]
    before = mirror_dump(factory)

    world.reorg(8)  # forks below the finalized block (head - 4)
    with pytest.raises(ReorgTooDeep) as err:
        indexer.run_once()

    assert err.value.facts["final_block"] == world.head() - 4
    assert mirror_dump(factory) == before
