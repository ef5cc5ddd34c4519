"""Fees earned by an adapter go to that adapter's payees, even across a reorg.

Adapter ids are sequential: a reorg that drops a registration lets the next registration take its id.
The API serves only final registrations (tests/adversarial/test_adapter_finality.py); behind it,
settlement compares each receipt's signed lineageHash with the adapter it would split by, and a
receipt signed for another lineage is a recorded loss, never paid to the newcomer's owner and
datasets. The receipt is written through the Ledger, as the settlement fixtures do. Real anvil
(`anvil_reorg`), contracts, indexer, ledger and settlement service."""

from __future__ import annotations

import pytest
from eth_hash.auto import keccak
from web3 import Web3

from node.db.loss import LossReason, losses
from node.db.models import EpochState
from node.settlement.publication import published_epoch
from tests.fixtures.settlement import CONTRIBUTORS, OWNERS, SettlementWorld, address

pytestmark = pytest.mark.chain
FEE = 10_000_000


def _register_call(world: SettlementWorld, owner: int, dataset_ids: list[int], weights: list[int]) -> dict[str, str]:
    c = world.contracts(owner)
    data = c.adapters.contract.encode_abi("register", [b"\1" * 32, keccak(b"newcomer"), "file:///n", dataset_ids,
                                                       weights, 9_000])
    return {"from": c.client.address, "to": c.adapters.address, "data": data, "gas": hex(1_000_000)}


def _settle(world: SettlementWorld) -> EpochState | None:
    service = world.service()
    epoch_id = service.close_epoch()
    assert epoch_id is not None
    state = None
    for _ in range(30):
        state = service.step()
        world.mine()
        world.sync()
        if state in (EpochState.FINAL, EpochState.FAILED):
            break
    return state


def test_a_reorg_that_gives_an_adapter_id_to_another_adapter_pays_the_newcomer_nothing(
        settlement_world: SettlementWorld) -> None:
    world = settlement_world
    honest = world.contracts(OWNERS[0])
    datasets = world.dataset_ids[world.adapter_ids[0]]
    before = world.w3.eth.block_number
    adapter_id = honest.adapters.register(b"\1" * 32, keccak(b"honest"), "file:///h", datasets, [5_000, 5_000], 1_000)
    world.sync()
    world.lineage_hashes[adapter_id] = honest.adapters.get(adapter_id).lineage_hash
    world.pay(0, 7, adapter_id, FEE)  # served and signed for the honest adapter

    # the registration is reorged out; in its block, a newcomer's adapter is registered and gets its id
    third_dataset = world.dataset_ids[world.adapter_ids[1]][1]
    newcomer = OWNERS[1]
    world.anvil.rpc("anvil_reorg", world.w3.eth.block_number - before,
                    [[_register_call(world, newcomer, [third_dataset], [10_000]), 0]])
    world.sync()
    taken = world.contracts(newcomer).adapters.get(adapter_id)
    assert taken.owner == address(world.key(newcomer)) and taken.lineage_hash != world.lineage_hashes[adapter_id]

    state = _settle(world)
    newcomer_payees = {address(world.key(newcomer)), address(world.key(CONTRIBUTORS[2]))}
    with world.factory() as session:
        row = published_epoch(session, world.node)
        leaves = {} if row is None else {Web3.to_checksum_address(v["value"][0]): int(v["value"][1])
                                         for v in row.trees["rewards"]["values"]}
    assert {a: leaves.get(a, 0) for a in newcomer_payees} == dict.fromkeys(newcomer_payees, 0), (state, leaves)
    with world.factory() as session:
        assert [x.reason for x in losses(session, world.node)] == [LossReason.LINEAGE_MISMATCH]
