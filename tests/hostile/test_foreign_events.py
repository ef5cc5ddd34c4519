"""Chain events from contracts we did not deploy: a second copy of every loranode contract on the same
anvil, used by the same accounts with the same ids and the same event signatures, leaves the mirror
exactly as it was, with an honest RPC and with one that ignores eth_getLogs' address filter."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import pytest
from eth_account import Account
from sqlalchemy.orm import Session, sessionmaker

from node.chain.deploy import deploy_all
from node.chain.rpc import Rpc
from tests.fixtures.indexer import MIRROR_TABLES, TOKEN, ChainWorld, drain, make_indexer, mirror_dump

pytestmark = pytest.mark.chain
TABLES = tuple(model.__tablename__ for model in MIRROR_TABLES)
FAR = 10_000  # a finality depth no row reaches here: only what the events say may differ


class AddressBlindRpc(Rpc):
    """A provider that returns every log with our topics, whoever emitted it."""

    def logs(self, from_block: int, to_block: int, addresses: Sequence[str],
             topics: Sequence[str]) -> list[dict[str, Any]]:
        flt = {"fromBlock": hex(from_block), "toBlock": hex(to_block), "topics": [list(topics)]}
        return list(self.call("eth_getLogs", flt))


def _activity(world: ChainWorld, tag: str) -> None:
    """The same users doing the same things: datasets, an adapter, deposits and a thaw to node 4."""
    world.register_dataset(1, f"ipfs://{tag}/a")
    world.register_dataset(2, f"ipfs://{tag}/b")
    world.register_adapter(1, [1, 2], [5_000, 5_000], uri=f"ipfs://{tag}/adapter")
    world.fund(3, 100 * TOKEN)
    world.deposit(3, 4, 40 * TOKEN)
    world.thaw(3, 4, 5 * TOKEN)


def _tables(factory: sessionmaker[Session]) -> dict[str, list[dict[str, Any]]]:
    dump = mirror_dump(factory)
    return {name: dump[name] for name in TABLES}


def test_a_copy_of_our_contracts_emitting_the_same_events_changes_nothing(world: ChainWorld, db_url: str,
                                                                           tmp_path: Any) -> None:
    _activity(world, "ours")
    indexer, factory = make_indexer(world, db_url, finality_depth=FAR)
    drain(indexer)
    ours = _tables(factory)
    assert len(ours["datasets"]) == 2 and len(ours["escrow_accounts"]) == 1

    deployer = world.keys[5]
    copy = deploy_all(world.w3, deployer, guardian=Account.from_key(deployer).address,
                      treasury=Account.from_key(deployer).address, protocol_bps=100, node_bps=500,
                      thaw_period_s=60, challenge_period_s=60)
    _activity(ChainWorld(world.chain, copy), "impostor")
    world.mine(3)
    drain(indexer)
    assert _tables(factory) == ours

    blind_url = f"sqlite:///{tmp_path / 'blind.db'}"
    blind, blind_factory = make_indexer(world, blind_url, finality_depth=FAR,
                                         rpc=AddressBlindRpc(world.chain.rpc_url))
    drain(blind)
    assert _tables(blind_factory) == ours
