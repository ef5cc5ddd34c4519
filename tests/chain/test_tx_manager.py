"""The transaction manager on a real anvil: durable intents, fee bumps, restarts and reorgs."""

from __future__ import annotations

import threading
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import replace

import pytest
from web3 import Web3

from node.chain.anvil import Anvil
from node.chain.tx_manager import FeePolicy, TxManager, TxRecord, TxState

pytestmark = pytest.mark.chain


class MemoryTxStore:
    """A TxStore kept in a dict (the SQL store is tested in tests/db)."""

    def __init__(self) -> None:
        self.records: dict[str, TxRecord] = {}
        self.saves = 0
        self._lock = threading.Lock()

    def load(self, key: str) -> TxRecord | None:
        return self.records.get(key)

    def save(self, record: TxRecord) -> None:
        self.records[record.key] = record
        self.saves += 1

    def max_nonce(self, sender: str) -> int | None:
        nonces = [r.nonce for r in self.records.values() if r.sender == sender
                  and not (r.state is TxState.FAILED and r.mined_hash is None)]
        return max(nonces) if nonces else None

    @contextmanager
    def writer_lock(self, sender: str) -> Iterator[None]:
        with self._lock:
            yield

    def open_keys(self, sender: str) -> list[str]:
        open_ = [r for r in self.records.values() if r.sender == sender and r.state in (TxState.PENDING, TxState.MINED)]
        return [r.key for r in sorted(open_, key=lambda r: r.nonce)]


class FakeClock:
    def __init__(self) -> None:
        self.now = 1_000.0

    def __call__(self) -> float:
        return self.now


RECIPIENT = "0x000000000000000000000000000000000000bEEF"


@pytest.fixture
def w3(fresh_anvil: Anvil) -> Web3:
    return Web3(Web3.HTTPProvider(fresh_anvil.rpc_url))


def _manager(w3: Web3, anvil: Anvil, store: MemoryTxStore, clock: FakeClock | None = None,
             **policy: int) -> TxManager:
    return TxManager(w3, anvil.keys[0], store, FeePolicy(**policy), clock=clock or FakeClock())


def test_send_confirms_then_finalises_once(w3: Web3, fresh_anvil: Anvil) -> None:
    store = MemoryTxStore()
    tm = _manager(w3, fresh_anvil, store, confirmations=3)
    record = tm.send("pay:1", RECIPIENT, "0x", value=123)
    assert tm.poll("pay:1").state is TxState.MINED
    fresh_anvil.rpc("anvil_mine", 2)
    final = tm.poll("pay:1")
    assert final.state is TxState.FINAL and final.mined_hash == record.latest.tx_hash
    assert tm.send("pay:1", RECIPIENT, "0x", value=123) == final  # the same intent is never sent again
    assert w3.eth.get_balance(RECIPIENT) == 123


def test_nonces_are_distinct_and_follow_the_chain(w3: Web3, fresh_anvil: Anvil) -> None:
    store = MemoryTxStore()
    tm = _manager(w3, fresh_anvil, store)
    nonces = [tm.send(f"pay:{i}", RECIPIENT, "0x", value=1).nonce for i in range(3)]
    assert nonces == [0, 1, 2]
    restarted = _manager(w3, fresh_anvil, store)  # a new process with the same database
    assert restarted.send("pay:3", RECIPIENT, "0x", value=1).nonce == 3


def test_a_stuck_transaction_is_bumped_and_mined_once(w3: Web3, fresh_anvil: Anvil) -> None:
    fresh_anvil.rpc("evm_setAutomine", False)
    clock = FakeClock()
    store = MemoryTxStore()
    tm = _manager(w3, fresh_anvil, store, clock, bump_after_s=30, priority_fee=1, bump_percent=50)
    first = tm.send("settle:1", RECIPIENT, "0x", value=7)
    # the base fee jumps above what the first attempt offers: it cannot be mined
    fresh_anvil.rpc("anvil_setNextBlockBaseFeePerGas", hex(first.latest.max_fee_per_gas * 4))
    fresh_anvil.rpc("evm_mine")
    assert tm.poll("settle:1").state is TxState.PENDING
    bumps = 0
    while True:
        clock.now += 31
        record = tm.poll("settle:1")
        bumps += 1
        if record.latest.max_fee_per_gas > first.latest.max_fee_per_gas * 8:
            break
    assert len(record.attempts) >= 2 and {a.tx_hash for a in record.attempts}.__len__() == len(record.attempts)
    fresh_anvil.rpc("evm_mine")
    fresh_anvil.rpc("evm_mine")
    done = tm.poll("settle:1")
    assert done.state in (TxState.MINED, TxState.FINAL)
    assert done.mined_hash in {a.tx_hash for a in record.attempts[1:]}
    assert w3.eth.get_balance(RECIPIENT) == 7  # paid once, whatever attempt landed
    assert w3.eth.get_transaction_count(tm.sender) == 1


def test_fee_bumps_stop_at_the_cap(w3: Web3, fresh_anvil: Anvil) -> None:
    fresh_anvil.rpc("evm_setAutomine", False)
    clock = FakeClock()
    tm = _manager(w3, fresh_anvil, MemoryTxStore(), clock, priority_fee=1, max_fee_cap=5 * 10**9)
    tm.send("capped", RECIPIENT, "0x", value=1)
    for _ in range(40):
        clock.now += 31
        record = tm.poll("capped")
    assert record.latest.max_fee_per_gas <= 5 * 10**9
    assert len(record.attempts) < 40


def test_killed_before_broadcast_is_rebroadcast_on_poll(w3: Web3, fresh_anvil: Anvil) -> None:
    store = MemoryTxStore()
    tm = _manager(w3, fresh_anvil, store)
    # what a crash leaves: the record saved, the broadcast never made
    record = TxRecord(key="settle:9", sender=tm.sender, nonce=0, to=RECIPIENT, data="0x", value=5, gas=21_000)
    record = replace(record, attempts=(tm._sign(record, 10**10, 10**9),))
    store.save(record)
    restarted = _manager(w3, fresh_anvil, store)
    restarted.poll("settle:9")  # re-broadcasts
    # anvil's automine answers the send before the block is in (it can lag under load): wait for it
    w3.eth.wait_for_transaction_receipt(record.latest.tx_hash, timeout=30)  # type: ignore[arg-type]
    assert restarted.poll("settle:9").state in (TxState.MINED, TxState.FINAL)
    assert w3.eth.get_balance(RECIPIENT) == 5


def test_a_reorged_out_transaction_is_sent_again(w3: Web3, fresh_anvil: Anvil) -> None:
    store = MemoryTxStore()
    tm = _manager(w3, fresh_anvil, store, confirmations=5)
    snapshot = fresh_anvil.rpc("evm_snapshot")
    tm.send("settle:2", RECIPIENT, "0x", value=9)
    assert tm.poll("settle:2").state is TxState.MINED
    fresh_anvil.rpc("evm_revert", snapshot)  # the block that held it is gone
    fresh_anvil.rpc("evm_setAutomine", False)
    assert w3.eth.get_balance(RECIPIENT) == 0
    assert tm.poll("settle:2").state is TxState.PENDING  # noticed, re-broadcast
    fresh_anvil.rpc("anvil_mine", 5)
    assert tm.poll("settle:2").state is TxState.FINAL
    assert w3.eth.get_balance(RECIPIENT) == 9


def test_bumps_stop_at_what_the_intent_is_worth(w3: Web3, fresh_anvil: Anvil) -> None:
    """With `max_cost_wei`, no attempt's max fee prices the gas the call uses (its estimate) past it."""
    fresh_anvil.rpc("evm_setAutomine", False)
    clock = FakeClock()
    tm = _manager(w3, fresh_anvil, MemoryTxStore(), clock, priority_fee=1)
    worth = 21_000 * 5 * 10**9  # a transfer's gas at 5 gwei
    sent = tm.send("worth", RECIPIENT, "0x", value=1, max_cost_wei=worth)
    fresh_anvil.rpc("anvil_setNextBlockBaseFeePerGas", hex(50 * 10**9))  # ten times what it is worth
    fresh_anvil.rpc("evm_mine")
    for _ in range(40):
        clock.now += 31
        record = tm.poll("worth", max_cost_wei=worth)
    assert max(a.max_fee_per_gas for a in record.attempts) * 21_000 <= worth
    assert record.state is TxState.PENDING and sent.gas > 21_000  # the margin is not counted as gas it uses


def test_small_bumps_are_refused() -> None:
    with pytest.raises(ValueError, match="at least 10"):
        FeePolicy(bump_percent=5)


def test_a_stuck_transaction_with_no_tip_is_still_bumped(w3: Web3, fresh_anvil: Anvil) -> None:
    """A chain whose eth_maxPriorityFeePerGas is 0 (Arbitrum's is): 0 raised by 15 % is still 0, and a
    settle stuck under a base-fee spike was never replaced, so nobody was paid until the fees fell."""
    fresh_anvil.rpc("evm_setAutomine", False)
    clock = FakeClock()
    tm = _manager(w3, fresh_anvil, MemoryTxStore(), clock, priority_fee=0, bump_percent=50)
    first = tm.send("settle:0", RECIPIENT, "0x", value=3)
    fresh_anvil.rpc("anvil_setNextBlockBaseFeePerGas", hex(first.latest.max_fee_per_gas * 2))
    fresh_anvil.rpc("evm_mine")
    for _ in range(3):
        clock.now += 31
        record = tm.poll("settle:0")
    assert len(record.attempts) == 4 and record.latest.max_fee_per_gas > first.latest.max_fee_per_gas * 2
    fresh_anvil.rpc("anvil_mine", 2)
    assert tm.poll("settle:0").state is TxState.FINAL
    assert w3.eth.get_balance(RECIPIENT) == 3


def test_cancelling_an_intent_whose_nonce_is_mined_signs_nothing(w3: Web3, fresh_anvil: Anvil) -> None:
    """A worker that died after its settle was broadcast finds the intent still pending in its store though
    the chain mined it: cancelling it (an orphan, or a stale settle) must not sign and send a no-op for a
    nonce that is gone (it failed with "nonce too low" after a new attempt was stored and broadcast)."""
    store = MemoryTxStore()
    tm = _manager(w3, fresh_anvil, store)
    sent = tm.send("settle:1", RECIPIENT, "0x", value=5)  # automine: mined, the store still says pending
    assert store.records["settle:1"].state is TxState.PENDING
    cancelled = tm.cancel("settle:1")
    assert cancelled is not None and cancelled.attempts == sent.attempts
    assert not any(a.is_cancel for a in store.records["settle:1"].attempts)
    assert tm.poll("settle:1").state is TxState.MINED and w3.eth.get_balance(RECIPIENT) == 5
