"""The node's reads of x402 channels on chain, bounded: its RPC quota is not a stranger's to spend.

Anyone can sign a voucher for a channel with nothing in it, at no cost and as often as they like (a fresh
key or salt names a fresh channel). Each one used to cost the node a chain read (the hold looks there
when the indexer's mirror shows too little), so one client could spend the node's RPC quota and slow
every paid request that needs a read. Now:

- a channel read with something in it (a deposit, a claim, a withdrawal, a refund), or one the node
  deposited into, is *known*: read again at most every `ttl_s`, as often as it is paid from;
- a channel read empty is remembered as empty for `empty_ttl_s`, in an LRU of at most `max_empty`
  channels (one stranger's retries cost one read; the memory is bounded);
- any other channel is read only while the strangers' bucket has a read left (`reads_per_s`, up to
  `burst` at once). Past it, it reads as empty without an RPC: its voucher is refused as above its
  deposit (402), and its payer retries once the mirror shows its deposit, which needs no chain read.
  A caller that knows the channel is funded (the mirror shows it) says so and is never counted.
- a deposit into a channel not known funded is simulated (an eth_call) only as one of those calls
  (`may_ask`): free to sign with a key that holds nothing, it must not spend the quota either.
"""

from __future__ import annotations

import threading
import time
from collections import OrderedDict
from collections.abc import Callable
from dataclasses import dataclass
from typing import Protocol


class OnChain(Protocol):
    """The channel's contract state (node.chain.x402_channels.OnChainChannel)."""

    @property
    def balance(self) -> int: ...
    @property
    def total_claimed(self) -> int: ...
    @property
    def pending_withdrawal(self) -> int: ...
    @property
    def withdraw_requested_at(self) -> int: ...
    @property
    def refund_nonce(self) -> int: ...


ReadChannel = Callable[[bytes], OnChain]


class Mirrored(OnChain, Protocol):
    """A channel as the indexer mirrored it: its deposits not final yet are part of `balance`."""

    @property
    def pending_deposits(self) -> int: ...


ReadMirror = Callable[[bytes], Mirrored]


@dataclass(frozen=True)
class ChannelState:
    balance: int = 0
    total_claimed: int = 0
    pending_withdrawal: int = 0
    withdraw_requested_at: int = 0
    refund_nonce: int = 0
    pending_deposits: int = 0


EMPTY = ChannelState()
NEVER_FRESH = float("-inf")  # the read time of a channel known funded whose state must be read again


def has_anything(state: OnChain) -> bool:
    return bool(state.balance or state.total_claimed or state.pending_withdrawal or state.refund_nonce)


class ChannelReads:
    def __init__(self, read: ReadChannel, ttl_s: float = 2.0, *, empty_ttl_s: float = 5.0, max_empty: int = 4096,
                 reads_per_s: float = 5.0, burst: float = 20.0,
                 clock: Callable[[], float] = time.monotonic) -> None:
        self.read, self.ttl_s, self.empty_ttl_s, self.max_empty = read, ttl_s, empty_ttl_s, max_empty
        self.reads_per_s, self.burst, self.clock = reads_per_s, burst, clock
        self._known: dict[bytes, tuple[float, OnChain]] = {}  # funded channels: bounded by what was paid in
        self._empty: OrderedDict[bytes, float] = OrderedDict()  # channel -> when it was read empty
        self._tokens, self._refilled_at = burst, clock()
        self._lock = threading.Lock()
        self.num_unread = 0  # strangers' channels answered as empty because the bucket was dry

    def __len__(self) -> int:
        """How many channels are remembered."""
        return len(self._known) + len(self._empty)

    def get(self, channel: bytes, is_known: bool = False) -> OnChain:
        """The channel's state (maybe `ttl_s` old); EMPTY, without a read, for a stranger's channel read
        empty lately or while the strangers' bucket is dry. `is_known`: the caller knows it is funded."""
        now = self.clock()
        with self._lock:
            cached = self._known.get(channel)
            if cached is not None and now - cached[0] < self.ttl_s:
                return cached[1]
            if cached is None and not is_known and not self._may_read_stranger(channel, now):
                return EMPTY
        state = self.read(channel)
        with self._lock:
            if has_anything(state):
                self._known[channel] = (now, state)
                self._empty.pop(channel, None)
            else:
                self._known.pop(channel, None)
                self._remember_empty(channel, now)
        return state

    def deposited(self, channel: bytes) -> None:
        """The node deposited into `channel`: known from now on, and read afresh next time."""
        with self._lock:
            self._known[channel] = (NEVER_FRESH, EMPTY)
            self._empty.pop(channel, None)

    def may_ask(self, channel: bytes) -> bool:
        """Whether the chain may be asked about `channel` now, beyond a read (a deposit into it simulated):
        always for a channel known funded, else one of the strangers' calls, while the bucket has one."""
        with self._lock:
            return channel in self._known or self._take(self.clock())

    def _may_read_stranger(self, channel: bytes, now: float) -> bool:
        seen = self._empty.get(channel)
        if seen is not None and now - seen < self.empty_ttl_s:
            return False
        return self._take(now)

    def _take(self, now: float) -> bool:
        """Under the lock: one call from the strangers' bucket, if it has one."""
        self._tokens = min(self.burst, self._tokens + (now - self._refilled_at) * self.reads_per_s)
        self._refilled_at = now
        if self._tokens < 1:
            self.num_unread += 1
            return False
        self._tokens -= 1
        return True

    def _remember_empty(self, channel: bytes, now: float) -> None:
        self._empty[channel] = now
        self._empty.move_to_end(channel)
        while len(self._empty) > self.max_empty:
            self._empty.popitem(last=False)
