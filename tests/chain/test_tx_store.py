"""The SQL TxStore: records survive a new process exactly, nonces continue, one writer at a time."""

from __future__ import annotations

import subprocess
import sys
import threading
import time
from dataclasses import replace

import pytest
from eth_account import Account
from web3 import Web3

from node.chain.anvil import Anvil
from node.chain.tx_manager import FeePolicy, TxAttempt, TxManager, TxRecord, TxState
from node.chain.tx_store import SqlTxStore
from node.db.session import make_engine, session_factory, upgrade
from node.errors import ChainError

SENDER = "0xf39Fd6e51aad88F6F4ce6aB8827279cffFb92266"
TO = "0x000000000000000000000000000000000000bEEF"


def _store(db_url: str) -> SqlTxStore:
    upgrade(db_url)
    return SqlTxStore(session_factory(make_engine(db_url)))


def test_a_record_reads_back_exactly_with_every_attempt(db_url: str) -> None:
    store = _store(db_url)
    attempts = (TxAttempt("0x" + "aa" * 32, 2**200 + 1, 10**9, "0x02f8", 1_700_000_000.25),
                TxAttempt("0x" + "bb" * 32, 2**201, 2 * 10**9, "0x02f9", 1_700_000_031.5))
    record = TxRecord("settle:x:1", SENDER, 7, TO, "0xdeadbeef", 2**255, 210_000, attempts=attempts[:1])
    store.save(record)
    assert store.load("settle:x:1") == record
    mined = replace(record, attempts=attempts, state=TxState.MINED, mined_hash="0x" + "BB" * 32, mined_block=12)
    store.save(mined)
    again = SqlTxStore(session_factory(make_engine(db_url)))  # another process, same database
    assert again.load("settle:x:1") == replace(mined, mined_hash="0x" + "bb" * 32)
    assert again.load("nope") is None
    assert again.max_nonce(SENDER) == 7 and again.max_nonce(TO) is None
    assert again.open_keys(SENDER) == ["settle:x:1"]
    store.save(replace(mined, state=TxState.FINAL))
    assert again.open_keys(SENDER) == []


def test_one_writer_per_key_across_threads(db_url: str) -> None:
    store = _store(db_url)
    inside, overlaps = [], []

    def write(i: int) -> None:
        with store.writer_lock(SENDER):
            if inside:
                overlaps.append(i)
            inside.append(i)
            time.sleep(0.05)
            inside.remove(i)

    threads = [threading.Thread(target=write, args=(i,)) for i in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert overlaps == []


def test_one_writer_per_key_across_processes(db_url: str) -> None:
    store = _store(db_url)
    holder = ("import time,sys; from node.chain.tx_store import SqlTxStore; "
              "from node.db.session import make_engine, session_factory; "
              f"s = SqlTxStore(session_factory(make_engine({db_url!r}))); "
              f"cm = s.writer_lock({SENDER!r}); cm.__enter__(); print('held', flush=True); time.sleep(1.5)")
    proc = subprocess.Popen([sys.executable, "-c", holder], stdout=subprocess.PIPE)
    assert proc.stdout is not None and proc.stdout.readline().strip() == b"held"
    started = time.monotonic()
    with store.writer_lock(SENDER):
        waited = time.monotonic() - started
    proc.wait(timeout=10)
    assert waited > 0.8  # it had to wait for the other process to let go
    with store.writer_lock(TO):  # another key is never blocked
        pass


@pytest.mark.chain
def test_a_restarted_manager_continues_nonces_and_intents_from_sql(db_url: str, fresh_anvil: Anvil) -> None:
    w3 = Web3(Web3.HTTPProvider(fresh_anvil.rpc_url))
    store = _store(db_url)
    tm = TxManager(w3, fresh_anvil.keys[0], store, FeePolicy(confirmations=2))
    first = tm.send("pay:1", TO, "0x", value=5)
    second = tm.send("pay:2", TO, "0x", value=6)
    restarted = TxManager(w3, fresh_anvil.keys[0], SqlTxStore(session_factory(make_engine(db_url))),
                          FeePolicy(confirmations=2))
    assert restarted.send("pay:1", TO, "0x", value=5) == first  # the same intent is never sent twice
    assert (first.nonce, second.nonce, restarted.send("pay:3", TO, "0x", value=7).nonce) == (0, 1, 2)
    fresh_anvil.rpc("anvil_mine", "0x2")
    assert {restarted.poll(k).state for k in ("pay:1", "pay:2", "pay:3")} == {TxState.FINAL}
    assert w3.eth.get_balance(TO) == 18


def test_a_broadcast_the_node_refused_holds_no_nonce(fresh_anvil: Anvil, db_url: str) -> None:
    """The operator's account ran dry: the settle's broadcast is refused ('insufficient funds'). Its intent
    was saved first with nonce 0 and stayed pending, so once the account was topped up the next intent got
    nonce 1 and sat behind a nonce gap for good: no settle ever mined again (and a restart's reconcile
    re-sent the stale one)."""
    w3 = Web3(Web3.HTTPProvider(fresh_anvil.rpc_url))
    dry = Account.create()
    tx = TxManager(w3, dry.key.hex(), _store(db_url))
    with pytest.raises(ChainError, match="broadcast refused"):
        tx.send("settle:1", TO, "0x")
    assert tx.poll("settle:1").state is TxState.FAILED, "refused: it can never mine"
    fresh_anvil.rpc("anvil_setBalance", dry.address, hex(10**18))
    record = tx.send("settle:1:retry", TO, "0x")
    assert record.nonce == 0
    assert tx.wait("settle:1:retry", timeout_s=10, until=TxState.MINED).state in (TxState.MINED, TxState.FINAL)
