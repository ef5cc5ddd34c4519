"""The transaction manager does not give up an intent whose receipt a lagging RPC node hides.

The account's nonce count (from a node at the head) said the intent's nonce was used while
eth_getTransactionReceipt (from a node behind) answered nothing for every attempt: `poll` marked it FAILED
at once ("nonce used by another transaction"), though it was mined; its caller then had to find out on
its own (node/settlement/follow_step.py). Now a used nonce without a receipt waits until it is
`confirmations` blocks deep before the intent is given up: the receipt a lagging node hid is found
meanwhile, and a nonce another transaction really took still fails. Real anvil; the RPC is the proxy of
tests/fixtures/flaky_rpc.py."""

from __future__ import annotations

import pytest
from web3 import Web3

from node.chain.anvil import Anvil
from node.chain.tx_manager import FeePolicy, TxManager, TxState
from tests.chain.test_tx_manager import RECIPIENT, FakeClock, MemoryTxStore
from tests.fixtures.flaky_rpc import FlakyRpc

pytestmark = pytest.mark.chain


def test_an_intent_whose_receipt_is_hidden_for_a_block_is_not_given_up(fresh_anvil: Anvil,
                                                                       flaky_rpc: type[FlakyRpc]) -> None:
    proxy = flaky_rpc(fresh_anvil.rpc_url).start()
    tm = TxManager(Web3(Web3.HTTPProvider(proxy.url)), fresh_anvil.keys[0], MemoryTxStore(),
                   FeePolicy(confirmations=2), clock=FakeClock())
    sent = tm.send("pay:1", RECIPIENT, "0x", value=5)  # anvil mines it at once
    proxy.hides_transactions = True  # the node that answers receipts lags
    hidden = tm.poll("pay:1")
    proxy.hides_transactions = False
    assert proxy.counts["hidden"] > 0
    assert hidden.state is TxState.PENDING, f"given up: {hidden.error}"
    assert tm.poll("pay:1").state is TxState.MINED
    fresh_anvil.rpc("anvil_mine", 1)
    final = tm.poll("pay:1")
    assert final.state is TxState.FINAL and final.mined_hash == sent.latest.tx_hash


def test_a_nonce_another_transaction_took_still_fails_once_it_is_deep(fresh_anvil: Anvil) -> None:
    w3 = Web3(Web3.HTTPProvider(fresh_anvil.rpc_url))
    fresh_anvil.rpc("evm_setAutomine", False)
    tm = TxManager(w3, fresh_anvil.keys[0], MemoryTxStore(), FeePolicy(confirmations=2), clock=FakeClock())
    sent = tm.send("pay:1", RECIPIENT, "0x", value=5)
    w3.eth.send_transaction({"from": tm.sender, "to": tm.sender, "value": 0, "nonce": sent.nonce, "gas": 21_000,
                             "maxFeePerGas": 10 * sent.latest.max_fee_per_gas,
                             "maxPriorityFeePerGas": 10 * sent.latest.max_fee_per_gas})  # replaces it in the pool
    fresh_anvil.rpc("evm_mine")
    assert tm.poll("pay:1").state is TxState.PENDING  # one block deep: a lagging node may still show its receipt
    fresh_anvil.rpc("evm_mine")
    failed = tm.poll("pay:1")
    assert failed.state is TxState.FAILED and failed.error == f"nonce {sent.nonce} used by another transaction"
    assert w3.eth.get_balance(RECIPIENT) == 0
