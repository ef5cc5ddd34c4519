"""A settle whose receipt the RPC hides is not taken as final before it is.

An RPC node that lags (or a provider that lies) answers eth_getTransactionReceipt with nothing for a
settle that is mined, while the account's nonce count, from a node at the head, says its nonce is used:
the TxManager gave the intent up ("nonce used by another transaction"). The epoch's roots were on chain,
so the follow step marked it FINAL at once, one block deep. A reorg then dropped the settle: the intent,
given up, was never sent again, the database said FINAL, the chain had no epoch; the node's next close
refused to run ("the chain forgot epochs we settled") and the epoch's payees were never paid. Now an
epoch found on chain after its intent failed is CONFIRMED until the indexer sees it final with our roots;
one the chain forgets meanwhile fails, and is rebuilt and sent again. Real anvil (`anvil_reorg`),
contracts, indexer, ledger and settlement; the RPC is the proxy of tests/fixtures/flaky_rpc.py."""

from __future__ import annotations

import pytest
from web3 import Web3

from node.chain.contracts import Contracts
from node.chain.tx_manager import FeePolicy, TxManager, TxState
from node.chain.tx_store import SqlTxStore
from node.db.models import EpochState
from node.settlement.outbox import intent_key
from node.settlement.policy import EpochPolicy
from node.settlement.service import SettlementService
from tests.adversarial.settlement_steps import LONG, payer, tick_until
from tests.fixtures.flaky_rpc import FlakyRpc
from tests.fixtures.settlement import OPERATOR, SettlementWorld

pytestmark = [pytest.mark.chain, pytest.mark.slow]
FEE = 10**15


def _given_up(world: SettlementWorld, proxy: FlakyRpc) -> tuple[SettlementService, int]:
    """A service whose epoch 1 settle is mined, and given up while the RPC hid its receipt for one tick with
    the settle two blocks deep (the TxManager waits that long: tests/chain/test_tx_hidden_receipt.py);
    the settle's block."""
    w3 = Web3(Web3.HTTPProvider(proxy.url))
    key = world.key(OPERATOR)
    tx = TxManager(w3, key, SqlTxStore(world.factory), FeePolicy(confirmations=2))
    service = SettlementService(world.factory, Contracts.connect(w3, world.deployment, key), tx,
                                EpochPolicy(max_age_s=0))
    world.pay(0, 0, world.adapter_ids[0], FEE, validity_s=LONG)
    before = world.w3.eth.block_number
    assert service.tick() is EpochState.BUILT
    assert service.tick() is EpochState.SUBMITTED  # anvil mines it at once
    settle_block = world.w3.eth.block_number
    assert settle_block > before
    world.mine()  # the settle is `confirmations` deep: a receipt still hidden now gives the intent up

    proxy.hides_transactions = True  # the node that answers receipts lags
    state = service.tick()
    proxy.hides_transactions = False
    assert proxy.counts["hidden"] > 0
    assert tx.store.load(intent_key(tx.sender, 1)).state is TxState.FAILED  # type: ignore[union-attr]
    assert state is not EpochState.FINAL, "two blocks deep, seen through a node that hides its receipt"
    return service, settle_block


def test_a_settle_given_up_while_its_receipt_was_hidden_is_final_once_the_indexer_sees_it_final(
        settlement_world: SettlementWorld, flaky_rpc: type[FlakyRpc]) -> None:
    world = settlement_world
    service, _ = _given_up(world, flaky_rpc(world.anvil.rpc_url).start())
    tick_until(world, service, 1, EpochState.FINAL)
    assert world.contracts(OPERATOR).settlement.collected(payer(world, 0), world.node, 0) == FEE


def test_a_settle_given_up_while_its_receipt_was_hidden_is_sent_again_after_a_reorg(
        settlement_world: SettlementWorld, flaky_rpc: type[FlakyRpc]) -> None:
    world = settlement_world
    service, settle_block = _given_up(world, flaky_rpc(world.anvil.rpc_url).start())

    world.anvil.rpc("anvil_reorg", world.w3.eth.block_number - settle_block + 1, [])  # the settle is dropped
    world.sync()
    assert world.contracts(OPERATOR).settlement.last_epoch(world.node) == 0
    tick_until(world, service, 1, EpochState.FINAL)
    settlement = world.contracts(OPERATOR).settlement
    assert settlement.last_epoch(world.node) == 1
    assert settlement.collected(payer(world, 0), world.node, 0) == FEE
