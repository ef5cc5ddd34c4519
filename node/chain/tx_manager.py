"""A transaction manager that never pays twice: durable intents, one nonce each, fee bumps, reorgs.

Each transaction is an *intent* with a caller-chosen key (e.g. "settle:<node>:<epoch>"). `send`
assigns the nonce, signs, and persists the record through the `TxStore` port BEFORE broadcasting (all
under the store's writer lock, which `ContractClient`s on the same key take too),
so a process killed at any point finds the intent again and `poll` carries it on:
- not known to the chain (killed before broadcast, or dropped): the signed bytes are re-broadcast;
- pending past `bump_after_s`: re-signed with the SAME nonce and fees raised by `bump_percent`
  (at least the 10 % nodes require for a replacement), never above `max_fee_cap`, nor above what prices
  its gas at the intent's worth to its caller when it names one (`max_cost_wei`: a settle's collection);
- mined: MINED, then FINAL after `confirmations` blocks; a reverted one is FAILED;
- mined then reorged out: back to PENDING and re-broadcast (same nonce, same bytes);
- its nonce used but no attempt's receipt found: FAILED ("used by another transaction") once that nonce is
  `confirmations` blocks deep; until then it waits (an RPC node behind the head hides receipts);
- refused by the node at its first broadcast (the account cannot pay the gas, ...): FAILED at once, and
  its nonce goes to the next intent (`TxStore.max_nonce`);
- cancelled (`cancel`): its nonce re-signed as a no-op (0 to itself) at higher fees; once that lands the
  intent is FAILED ("cancelled"), and every later bump or re-broadcast is of the no-op.
Any of the attempts may be the one that lands; they share a nonce, so at most one ever does.
"""

from __future__ import annotations

import enum
import logging
import time
from collections.abc import Callable, Iterator
from contextlib import AbstractContextManager
from dataclasses import dataclass, field, replace
from typing import Any, Protocol

from eth_account import Account
from eth_typing import HexStr
from web3 import Web3
from web3.exceptions import ContractLogicError, TransactionNotFound, Web3RPCError

from node.errors import ChainError

log = logging.getLogger(__name__)


_UNDERPRICED = ("underpriced", "less than block base fee", "fee too low", "max fee per gas less than")


class TxState(enum.StrEnum):
    PENDING = "pending"
    MINED = "mined"
    FINAL = "final"
    FAILED = "failed"


@dataclass(frozen=True)
class TxAttempt:
    tx_hash: str
    max_fee_per_gas: int
    max_priority_fee_per_gas: int
    raw: str  # the signed bytes, 0x-hex, so a restart can re-broadcast exactly what was signed
    sent_at: float  # wall-clock seconds
    is_cancel: bool = False  # a no-op on the intent's nonce (`TxManager.cancel`), not the intent's call


@dataclass(frozen=True)
class TxRecord:
    key: str
    sender: str
    nonce: int
    to: str
    data: str
    value: int
    gas: int
    state: TxState = TxState.PENDING
    attempts: tuple[TxAttempt, ...] = ()
    mined_hash: str | None = None
    mined_block: int | None = None
    error: str | None = None

    @property
    def latest(self) -> TxAttempt:
        return self.attempts[-1]


class TxStore(Protocol):
    """Durable records of intents. `save` must be durable when it returns."""

    def load(self, key: str) -> TxRecord | None: ...

    def save(self, record: TxRecord) -> None: ...

    def max_nonce(self, sender: str) -> int | None:
        """The highest nonce of `sender`'s intents that may reach the chain or did: a FAILED intent the
        chain never saw (no `mined_hash`: refused at broadcast, or its nonce taken by another
        transaction, which the chain's count covers) holds none, so no later intent waits behind a gap."""
        ...

    def writer_lock(self, sender: str) -> AbstractContextManager[None]:
        """Held while assigning nonces: one writer per operator key across processes."""
        ...

    def open_keys(self, sender: str) -> list[str]:
        """`sender`'s intents not yet final or failed, oldest nonce first."""
        ...


@dataclass(frozen=True)
class FeePolicy:
    bump_after_s: float = 30.0
    bump_percent: int = 15
    max_fee_cap: int = 500 * 10**9
    priority_fee: int | None = None  # None: ask the node (eth_maxPriorityFeePerGas)
    gas_margin_percent: int = 25
    confirmations: int = 2

    def __post_init__(self) -> None:
        if self.bump_percent < 10:
            raise ValueError("bump_percent must be at least 10: nodes refuse smaller replacements")

    def bumped(self, max_fee: int, tip: int, cap: int | None = None) -> tuple[int, int] | None:
        """The fees of a replacement: both raised by `bump_percent` (rounded up, and by at least 1 wei, so
        a zero tip rises too), never above `cap` (default `max_fee_cap`); None once the cap leaves no room."""
        factor = 100 + self.bump_percent
        new_fee = min(max(-(-max_fee * factor // 100), max_fee + 1), self.max_fee_cap if cap is None else cap)
        new_tip = min(max(-(-tip * factor // 100), tip + 1), new_fee)
        if new_fee <= max_fee or new_tip <= tip:
            return None
        return new_fee, new_tip


@dataclass
class TxManager:
    w3: Web3
    private_key: str
    store: TxStore
    policy: FeePolicy = field(default_factory=FeePolicy)
    clock: Callable[[], float] = time.time

    def __post_init__(self) -> None:
        self.account = Account.from_key(self.private_key)
        self.chain_id = self.w3.eth.chain_id

    @property
    def sender(self) -> str:
        return str(self.account.address)

    # --- sending ----------------------------------------------------------------------------------
    def send(self, key: str, to: str, data: str, value: int = 0, gas: int | None = None,
             max_cost_wei: int | None = None) -> TxRecord:
        """Create and broadcast the intent `key`, or return it as it stands if it exists already. With
        `max_cost_wei`, its max fee never prices the gas it uses past that (`fee_cap`)."""
        existing = self.store.load(key)
        if existing is not None:
            return existing
        with self.store.writer_lock(self.sender):
            existing = self.store.load(key)
            if existing is not None:
                return existing
            gas = gas or self._estimate_gas(to, data, value)
            record = TxRecord(key=key, sender=self.sender, nonce=self._next_nonce(), to=Web3.to_checksum_address(to),
                              data=data, value=value, gas=gas)
            max_fee, tip = self._initial_fees(self.fee_cap(record, max_cost_wei))
            record = replace(record, attempts=(self._sign(record, max_fee, tip),))
            self.store.save(record)
            log.info("tx %s: nonce %d signed, broadcasting", key, record.nonce)
            self._first_broadcast(record)  # under the lock: a ContractClient on this key then counts it pending
        return record

    def _first_broadcast(self, record: TxRecord) -> None:
        try:
            self._broadcast(record.latest)
        except ChainError as exc:  # the node refused it (e.g. the account cannot pay the gas): it never mines
            if not self._known(record.latest.tx_hash):  # unless the node has it after all
                refused = f"broadcast refused: {exc.facts['reason']}"
                self.store.save(replace(record, state=TxState.FAILED, error=refused))
            raise

    def cancel(self, key: str) -> TxRecord | None:
        """Replace the pending intent `key` with a no-op on its nonce, priced one bump above its latest
        attempt and at least for the base fee of the moment, even past `max_fee_cap` (it costs 21,000 gas:
        the cap bounds what a call may spend, not the price of keeping a stale call off the chain, or of
        freeing the nonces behind it). A settle that must never land (its node was vetoed, and the
        guardian's amend would make it valid again), or one waiting at its cap with a claim behind it
        (`stuck_at_cap`), is cancelled this way."""
        with self.store.writer_lock(self.sender):
            record = self.store.load(key)
            if record is None or record.state is not TxState.PENDING or record.latest.is_cancel:
                return record
            if self.w3.eth.get_transaction_count(self.account.address, "latest") > record.nonce:
                return record  # its nonce is mined (this call or a sibling): nothing is left to keep off the chain
            fees = self.policy.bumped(record.latest.max_fee_per_gas, record.latest.max_priority_fee_per_gas,
                                      cap=2**256 - 1)
            assert fees is not None, "an uncapped bump always rises"
            now = self._initial_fees(2**256 - 1)  # lands now, even in a spike the intent was priced out by
            fees = (max(fees[0], now[0]), max(fees[1], now[1]))
            attempt = self._sign(record, *fees, is_cancel=True)
            record = replace(record, attempts=(*record.attempts, attempt))
            self.store.save(record)  # durable before broadcast, like every attempt
        log.warning("tx %s: cancelled, nonce %d re-signed as a no-op at max fee %d", key, record.nonce, fees[0])
        self._broadcast(attempt)
        return record

    def stuck_at_cap(self, key: str, max_cost_wei: int | None) -> bool:
        """Whether the pending intent `key` waits at its fee cap (`fee_cap`: no bump left) below the latest
        block's base fee: it cannot land until the price falls, and holds every later nonce behind it."""
        record = self.store.load(key)
        if record is None or record.state is not TxState.PENDING or record.latest.is_cancel:
            return False
        latest = record.latest
        if self.policy.bumped(latest.max_fee_per_gas, latest.max_priority_fee_per_gas,
                              self.fee_cap(record, max_cost_wei)) is not None:
            return False
        return latest.max_fee_per_gas < int(self.w3.eth.get_block("latest")["baseFeePerGas"])

    def waiting_behind(self, key: str, prefix: str) -> list[str]:
        """The pending intents whose key starts with `prefix` that have a higher nonce than intent `key`'s:
        they cannot land before it does."""
        record = self.store.load(key)
        if record is None:
            return []
        later = (self.store.load(k) for k in self.store.open_keys(self.sender)
                 if k.startswith(prefix))
        return [r.key for r in later if r is not None and r.state is TxState.PENDING and r.nonce > record.nonce]

    def cancel_orphans(self, prefix: str, followed: set[str]) -> None:
        """Cancel (`cancel`) and poll every open intent whose key starts with `prefix` that its caller no
        longer follows (`followed`: e.g. a settle whose epoch was dissolved by an adopt): it must never
        land, and its nonce must still be filled for the next intents to mine."""
        for key in self.store.open_keys(self.sender):
            if key.startswith(prefix) and key not in followed:
                self.cancel(key)
                self.poll(key)

    def _next_nonce(self) -> int:
        chain_nonce = self.w3.eth.get_transaction_count(self.account.address, "pending")
        stored = self.store.max_nonce(self.sender)
        return max(chain_nonce, -1 if stored is None else stored + 1)

    def _estimate_gas(self, to: str, data: str, value: int) -> int:
        try:
            estimate = self.w3.eth.estimate_gas({"from": self.account.address, "to": Web3.to_checksum_address(to),
                                                 "data": data, "value": value})  # type: ignore[typeddict-item]
        except (Web3RPCError, ContractLogicError) as exc:  # a revert in estimation is ContractLogicError in web3 8
            raise ChainError("the transaction would revert", to=to, reason=str(exc)) from exc
        return int(estimate) * (100 + self.policy.gas_margin_percent) // 100

    def _initial_fees(self, cap: int) -> tuple[int, int]:
        base_fee = int(self.w3.eth.get_block("latest")["baseFeePerGas"])
        tip = self.policy.priority_fee if self.policy.priority_fee is not None else int(self.w3.eth.max_priority_fee)
        return min(2 * base_fee + tip, cap), min(tip, cap)

    def fee_cap(self, record: TxRecord, max_cost_wei: int | None) -> int:
        """The highest max fee per gas of the intent's attempts: `max_fee_cap`, and with `max_cost_wei` (what
        the call is worth to its caller) no more than prices the gas it uses (its estimate, without the
        margin: `record.gas` less `gas_margin_percent`) at that."""
        if max_cost_wei is None or (record.attempts and record.latest.is_cancel):  # a no-op: `cancel` prices it
            return self.policy.max_fee_cap
        used = max(1, -(-record.gas * 100 // (100 + self.policy.gas_margin_percent)))  # rounded up
        return min(self.policy.max_fee_cap, max_cost_wei // used)

    def _sign(self, record: TxRecord, max_fee: int, tip: int, is_cancel: bool = False) -> TxAttempt:
        call = ({"to": self.sender, "data": "0x", "value": 0, "gas": 21_000} if is_cancel else
                {"to": record.to, "data": record.data, "value": record.value, "gas": record.gas})
        tx: dict[str, Any] = {"type": 2, "chainId": self.chain_id, "nonce": record.nonce, **call,
                              "maxFeePerGas": max_fee, "maxPriorityFeePerGas": tip}
        signed = self.account.sign_transaction(tx)
        return TxAttempt(tx_hash=signed.hash.to_0x_hex(), max_fee_per_gas=max_fee, max_priority_fee_per_gas=tip,
                         raw=signed.raw_transaction.to_0x_hex(), sent_at=self.clock(), is_cancel=is_cancel)

    def _broadcast(self, attempt: TxAttempt) -> None:
        try:
            self.w3.eth.send_raw_transaction(HexStr(attempt.raw))
        except Web3RPCError as exc:
            text = str(exc).lower()
            if "already known" in text or "nonce too low" in text or "already imported" in text:
                log.info("tx %s: node already has it or a sibling was mined (%s)", attempt.tx_hash, text[:80])
                return
            if any(m in text for m in _UNDERPRICED):
                log.warning("tx %s: refused as underpriced, the next poll bumps it (%s)", attempt.tx_hash, text[:80])
                return
            raise ChainError("broadcast refused", tx_hash=attempt.tx_hash, reason=str(exc)) from exc

    # --- following --------------------------------------------------------------------------------
    def poll(self, key: str, max_cost_wei: int | None = None) -> TxRecord:
        """Advance the intent one step (confirm, bump, re-broadcast); returns the saved record. With
        `max_cost_wei`, a bump never prices the gas it uses past that (`fee_cap`): the intent waits instead."""
        record = self.store.load(key)
        if record is None:
            raise ChainError("unknown transaction intent", key=key)
        if record.state in (TxState.FINAL, TxState.FAILED):
            return record
        updated = self._advance(record, self.fee_cap(record, max_cost_wei))
        if updated != record:
            self.store.save(updated)
        return updated

    def _advance(self, record: TxRecord, cap: int) -> TxRecord:
        receipt = self._find_receipt(record)
        if receipt is not None:
            mined_hash = receipt["transactionHash"].to_0x_hex()
            if any(a.is_cancel and a.tx_hash.lower() == mined_hash.lower() for a in record.attempts):
                return replace(record, state=TxState.FAILED, mined_hash=mined_hash, mined_block=receipt["blockNumber"],
                               error=f"cancelled: a no-op took nonce {record.nonce}")
            if receipt["status"] != 1:
                return replace(record, state=TxState.FAILED, mined_hash=receipt["transactionHash"].to_0x_hex(),
                               mined_block=receipt["blockNumber"], error="reverted on chain")
            depth = self.w3.eth.block_number - receipt["blockNumber"] + 1
            state = TxState.FINAL if depth >= self.policy.confirmations else TxState.MINED
            return replace(record, state=state, mined_hash=receipt["transactionHash"].to_0x_hex(),
                           mined_block=receipt["blockNumber"])
        if record.state is TxState.MINED:
            log.warning("tx %s: mined transaction reorged out, re-broadcasting nonce %d", record.key, record.nonce)
            record = replace(record, state=TxState.PENDING, mined_hash=None, mined_block=None)
            self._broadcast(record.latest)
            return record
        if self.w3.eth.get_transaction_count(self.account.address, "latest") > record.nonce:
            if self._find_receipt(record) is not None:  # mined between the two reads
                return self._advance(record, cap)
            if not self._used_deep(record.nonce):  # a receipt a lagging node hides yet: asked again next poll
                return record
            return replace(record, state=TxState.FAILED, error=f"nonce {record.nonce} used by another transaction")
        if not self._known(record.latest.tx_hash):
            self._broadcast(record.latest)
        if self.clock() - record.latest.sent_at >= self.policy.bump_after_s:
            return self._bump(record, cap)
        return record

    def _find_receipt(self, record: TxRecord) -> Any:
        for attempt in reversed(record.attempts):
            try:
                return self.w3.eth.get_transaction_receipt(attempt.tx_hash)  # type: ignore[arg-type]
            except TransactionNotFound:
                continue
        return None

    def _used_deep(self, nonce: int) -> bool:
        """Whether the account's `nonce` was used at least `confirmations` blocks ago (a node that cannot
        answer for that block: not yet). Until then a receipt none of the intent's attempts shows may be
        one an RPC node behind the head hides: the intent is not given up."""
        try:
            block = self.w3.eth.block_number - self.policy.confirmations + 1
            return block >= 0 and self.w3.eth.get_transaction_count(self.account.address, block) > nonce
        except Web3RPCError:
            return False

    def _known(self, tx_hash: str) -> bool:
        try:
            self.w3.eth.get_transaction(tx_hash)  # type: ignore[arg-type]
            return True
        except TransactionNotFound:
            return False

    def _bump(self, record: TxRecord, cap: int) -> TxRecord:
        fees = self.policy.bumped(record.latest.max_fee_per_gas, record.latest.max_priority_fee_per_gas, cap)
        if fees is None:
            log.warning("tx %s: fee cap %d reached, waiting", record.key, cap)
            return record
        max_fee, tip = fees
        attempt = self._sign(record, max_fee, tip, is_cancel=record.latest.is_cancel)  # a cancel stays one
        bumped = replace(record, attempts=(*record.attempts, attempt))
        self.store.save(bumped)  # durable before broadcast, like the first attempt
        log.info("tx %s: bumped to max fee %d (attempt %d)", record.key, max_fee, len(bumped.attempts))
        self._broadcast(attempt)
        return bumped

    def wait(self, key: str, timeout_s: float = 60.0, interval_s: float = 0.2,
             until: TxState = TxState.FINAL) -> TxRecord:
        """Poll until the intent reaches `until` (or FINAL/FAILED); for CLIs, tests and the demo."""
        deadline = time.monotonic() + timeout_s
        for record in self._polls(key, interval_s):
            if record.state in (until, TxState.FINAL, TxState.FAILED):
                return record
            if time.monotonic() > deadline:
                raise ChainError("transaction not confirmed in time", key=key, state=record.state.value)
        raise AssertionError("unreachable")

    def _polls(self, key: str, interval_s: float) -> Iterator[TxRecord]:
        while True:
            yield self.poll(key)
            time.sleep(interval_s)
