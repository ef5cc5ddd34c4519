"""A payee's `loranode claim` front-run by a third party's claim for it ends with the payee paid, not an error.

Anyone may claim for anyone. A claim for the same payee sent ahead of ours with a higher tip pays the payee
and ours then reverts on chain (NothingToClaim): `claim` raised "transaction reverted", so the payee (or
the relayer's script running `claim` for many payees) was told the claim failed although everything due
was paid, and a script stopped there. `claim` now reads what the chain has paid that payee and answers
0 (this call paid nothing) when another claim paid it all. Real anvil, contracts, indexer and worker."""

from __future__ import annotations

import threading
from pathlib import Path

import pytest

from node.db.models import EpochState
from node.settlement.claims import claim, load_rewards
from node.settlement.policy import EpochPolicy
from node.settlement.publication import export_epoch
from tests.adversarial.settlement_steps import LONG, tick_until
from tests.fixtures.settlement import CONTRIBUTORS, RELAYER, SettlementWorld, address

pytestmark = pytest.mark.chain


def _mine_once_both_are_pending(world: SettlementWorld, stop: threading.Event) -> None:
    while not stop.is_set():
        status = world.anvil.rpc("txpool_status")
        assert isinstance(status, dict)
        if int(status["pending"], 16) >= 2:
            world.mine()
            return
        stop.wait(0.05)


def test_a_claim_front_run_for_the_same_payee_reports_it_paid(settlement_world: SettlementWorld,
                                                              tmp_path: Path) -> None:
    world = settlement_world
    world.pay(0, 0, world.adapter_ids[0], 9_000_007, validity_s=LONG)
    tick_until(world, world.service(EpochPolicy(max_age_s=0)), 1, EpochState.FINAL)
    export = export_epoch(world.factory, world.node, tmp_path / "epoch.json")
    payee = world.contracts(CONTRIBUTORS[0])
    due, proof = load_rewards(payee, world.node, export).entry(payee.client.address) or (0, [])
    assert due > 0
    before = payee.token.balance_of(payee.client.address)

    world.anvil.rpc("evm_setAutomine", False)
    stop = threading.Event()
    miner = threading.Thread(target=_mine_once_both_are_pending, args=(world, stop), daemon=True)
    miner.start()
    try:
        relayer = world.contracts(RELAYER).settlement
        data = relayer.contract.encode_abi("claim", args=[world.node, 1, payee.client.address, due, proof])
        world.w3.eth.send_transaction({"from": address(world.key(RELAYER)), "to": relayer.address, "gas": 300_000,
                                       "data": data, "maxPriorityFeePerGas": 500 * 10**9,
                                       "maxFeePerGas": 1_000 * 10**9})  # ahead of the payee's own claim
        paid = claim(payee, world.node, payee.client.address, export)
    finally:
        stop.set()
        world.anvil.rpc("evm_setAutomine", True)
        miner.join(timeout=30)

    assert paid == 0  # this call paid nothing: the relayer's did
    assert payee.token.balance_of(payee.client.address) - before == due
    assert payee.settlement.claimed(world.node, payee.client.address) == due
