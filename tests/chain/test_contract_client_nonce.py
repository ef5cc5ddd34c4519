"""Clients on one key sending at the same moment (API replicas sharing the x402 gas key, or the API's
deposit and refund clients in one process): every transaction lands, each on a nonce of its own. Real
anvil; on SQLite and PostgreSQL where the lock is the database's.

The attack without the lock: both clients read the same pending nonce, sign it, and the second one's
broadcast is refused (or replaces the first): one payer's deposit or refund fails.
"""

from __future__ import annotations

import contextlib
import threading
import time
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from typing import Any

import pytest
from web3 import Web3

from node.chain.anvil import Anvil
from node.chain.contract_client import ContractClient
from node.chain.tx_manager import TxManager, TxState
from node.chain.tx_store import SqlTxStore, key_lock
from node.db.session import make_engine, session_factory, upgrade

pytestmark = pytest.mark.chain
RECIPIENT = "0x000000000000000000000000000000000000bEEF"
NUM_CLIENTS = 3


def _racing(client: ContractClient, barrier: threading.Barrier) -> ContractClient:
    """`client` whose first nonce read waits for the other clients' (as far as their locks let them), so
    without a lock all of them pick the same nonce."""
    read = client.w3.eth.get_transaction_count
    first = [True]

    def count(*args: Any) -> Any:
        n = read(*args)
        if first[0]:
            first[0] = False
            with contextlib.suppress(threading.BrokenBarrierError):  # another client holds the lock: it
                barrier.wait(timeout=1.5)  # reads after this one has broadcast
        return n

    client.w3.eth.get_transaction_count = count  # type: ignore[method-assign]
    return client


def _send_at_once(clients: list[ContractClient]) -> list[Any]:
    w3 = clients[0].w3
    base = int(w3.eth.get_block("latest")["baseFeePerGas"])  # type: ignore[typeddict-item]
    fees = {"maxFeePerGas": 2 * base + 10**9, "maxPriorityFeePerGas": 10**9}

    def transfer(i: int) -> Any:
        return clients[i]._send("transfer", lambda tx: {**tx, "to": RECIPIENT, "value": i + 1, "gas": 21_000,
                                                        **fees})

    with ThreadPoolExecutor(len(clients)) as pool:
        return list(pool.map(transfer, range(len(clients))))


def _assert_all_landed(receipts: list[Any], w3: Web3, sender: str) -> None:
    assert all(r["status"] == 1 for r in receipts)
    assert w3.eth.get_balance(RECIPIENT) == sum(range(1, len(receipts) + 1)), "every transfer paid, once"
    assert w3.eth.get_transaction_count(sender) == len(receipts), "one nonce each"


def _clients(anvil: Anvil, key: str, lock: Callable[[], Any] | None) -> list[ContractClient]:
    barrier = threading.Barrier(NUM_CLIENTS)
    extra = (lambda: {}) if lock is None else (lambda: {"nonce_lock": lock()})
    return [_racing(ContractClient(Web3(Web3.HTTPProvider(anvil.rpc_url)), key, **extra()), barrier)
            for _ in range(NUM_CLIENTS)]


def test_clients_of_one_process_on_one_key_never_share_a_nonce(fresh_anvil: Anvil) -> None:
    clients = _clients(fresh_anvil, fresh_anvil.keys[7], None)
    _assert_all_landed(_send_at_once(clients), clients[0].w3, clients[0].address)


def test_replicas_on_one_key_and_database_never_share_a_nonce(fresh_anvil: Anvil, db_url: str) -> None:
    """Each client has its own database engine (as each replica has), the same database behind them."""
    clients = _clients(fresh_anvil, fresh_anvil.keys[8], lambda: key_lock(make_engine(db_url)))
    _assert_all_landed(_send_at_once(clients), clients[0].w3, clients[0].address)


def test_a_client_and_the_transaction_manager_on_one_key_never_share_a_nonce(fresh_anvil: Anvil,
                                                                             db_url: str) -> None:
    """The worker's TxManager saved its intent's nonce and released the lock before broadcasting it; a
    client on the same key and database (the worker's x402 client) taking the lock in between read the
    same pending nonce, and the intent failed ('nonce 0 used by another transaction')."""
    upgrade(db_url)
    key, engine = fresh_anvil.keys[9], make_engine(db_url)
    w3 = Web3(Web3.HTTPProvider(fresh_anvil.rpc_url))
    manager = TxManager(w3, key, SqlTxStore(session_factory(engine)))
    broadcast, saved = manager._broadcast, threading.Event()

    def slow_broadcast(attempt: Any) -> None:
        saved.set()
        time.sleep(1.0)  # the client's turn comes here if the lock is free
        broadcast(attempt)

    manager._broadcast = slow_broadcast  # type: ignore[method-assign]
    client = ContractClient(Web3(Web3.HTTPProvider(fresh_anvil.rpc_url)), key, nonce_lock=key_lock(engine))
    base = int(w3.eth.get_block("latest")["baseFeePerGas"])  # type: ignore[typeddict-item]
    fees = {"maxFeePerGas": 2 * base + 10**9, "maxPriorityFeePerGas": 10**9}
    with ThreadPoolExecutor(2) as pool:
        sent = pool.submit(manager.send, "settle:1", RECIPIENT, "0x", 1)
        assert saved.wait(10)
        transfer = pool.submit(client._send, "transfer",
                               lambda tx: {**tx, "to": RECIPIENT, "value": 2, "gas": 21_000, **fees})
        record, receipt = sent.result(), transfer.result()
    assert manager.wait("settle:1", timeout_s=10, until=TxState.MINED).state is not TxState.FAILED
    _assert_all_landed([receipt, {"status": 1}], w3, client.address)
    assert record.nonce == 0
