"""The free-work budgets of a node whose API replicas share one Redis (DESIGN: replicas behind HAProxy on
the same PostgreSQL and Redis): counted per process, N replicas gave a payer N times the free hang-ups
and cold loads of one. Here every count lives in Redis under the node's prefix, with the rules of
node/api/hang_up_budget.py and node/api/cold_load.py, each decision one Lua script (one round trip):
a paid request's admission is one (none other for a payer that has not hung up), and its end one more
where it took a token (a payer that hung up) or hung up before its first token.
A purchase marks its payer a buyer once per `PAID_REFRESH_S` at most, and at once after a cold load on its
own budget on this replica (the purchase that pays for it renews the budget).

Every count is timed by Redis's clock (node/shared_clock.py: the replica's own plus the difference, read
every minute): stamped by a replica running ahead and read by one behind, a bucket refilled the difference's
worth of tokens on each read, so a payer alternating two replicas a minute apart hung up without end.

Redis down or slower than `TIMEOUT_S`: each replica counts on its own (the per-process budgets, the same
rules) for `RETRY_S`, then tries Redis again. Honest payers are served as on an embedded node; free work
is bounded as it was before the counts were shared (N replicas, N budgets), never unbounded.
"""

from __future__ import annotations

import asyncio
import logging
import threading
import time
from collections.abc import Callable, Sequence
from typing import Any

import redis

from node.api.cold_load import Caller, ColdLoadGate, cold_refusal
from node.api.hang_up_budget import HangUpBudget, Ticket, refusal
from node.lora.provider import AdapterRegistrar, LoadState
from node.shared_clock import SharedClock

log = logging.getLogger(__name__)
TIMEOUT_S, RETRY_S, PAID_REFRESH_S = 0.25, 5.0, 5.0
# the replicas' difference to Redis's clock in 1/16 s: a time stays exact through the scripts' tostring (%.14g:
# 4 decimals on 10 digits of seconds), so a refill of whole seconds gives whole tokens (0.0001 s less: 429)
CLOCK_RESOLUTION_S = 1 / 16

BUCKET = """
local now = tonumber(ARGV[1])
local function within(key, window)  -- the key's time (a purchase, a hang-up) is within the window
  local at = tonumber(redis.call('GET', key) or '')
  return at ~= nil and now - at < window
end
local function level(key, rate, burst)
  local b = redis.call('HMGET', key, 'tokens', 'at')
  if not b[1] then return burst end
  return math.min(burst, tonumber(b[1]) + math.max(now - tonumber(b[2]), 0) * rate)
end
local function store(key, tokens, rate, burst, window)
  redis.call('HSET', key, 'tokens', tostring(tokens), 'at', tostring(now))
  local ttl = window  -- once full again, a bucket is as good as none
  if rate > 0 then ttl = (burst - tokens) / rate + 1 end
  redis.call('EXPIRE', key, math.max(1, math.ceil(ttl)))
end
"""
# KEYS: shared bucket, own bucket, struck, buyer; ARGV: now, rate, burst, own rate, own burst, window.
# Returns {took a token (-1 refused), retry after ms, is own}
HANG_UP_ADMIT = BUCKET + """
local window = tonumber(ARGV[6])
local is_own = 0
local bucket, rate, burst = KEYS[1], tonumber(ARGV[2]), tonumber(ARGV[3])
if within(KEYS[4], window) then is_own, bucket, rate, burst = 1, KEYS[2], tonumber(ARGV[4]), tonumber(ARGV[5]) end
if not within(KEYS[3], window) then return {0, 0, is_own} end
local tokens = level(bucket, rate, burst)
if tokens >= 1 then store(bucket, tokens - 1, rate, burst, window) return {1, 0, is_own} end
local wait = 600
if rate > 0 then wait = math.min((1 - tokens) / rate, 600) end
return {-1, math.ceil(wait * 1000), is_own}
"""
# KEYS: its bucket, struck; ARGV: now, rate, burst, window, took a token, is a hang-up
HANG_UP_END = BUCKET + """
local rate, burst, window = tonumber(ARGV[2]), tonumber(ARGV[3]), tonumber(ARGV[4])
if ARGV[6] == '0' then
  if ARGV[5] == '1' then store(KEYS[1], math.min(level(KEYS[1], rate, burst) + 1, burst), rate, burst, window) end
  return 1
end
if ARGV[5] ~= '1' then store(KEYS[1], math.max(level(KEYS[1], rate, burst) - 1, -burst), rate, burst, window) end
redis.call('SET', KEYS[2], ARGV[1], 'EX', math.ceil(window))
return 1
"""
# KEYS: buyer marks; ARGV: now, window
PAID = """
for _, key in ipairs(KEYS) do redis.call('SET', key, ARGV[1], 'EX', math.ceil(tonumber(ARGV[2]))) end
return 1
"""
UNPAID = """
local function unpaid(window)  -- the caller's cold loads since its last purchase, in its window
  local u = redis.call('HMGET', KEYS[1], 'n', 'since')
  local paid = tonumber(redis.call('GET', KEYS[2]) or '-1')
  if not u[1] or now - tonumber(u[2]) >= window or paid >= tonumber(u[2]) then return 0, now end
  return tonumber(u[1]), tonumber(u[2])
end
"""
# KEYS: unpaid, buyer; ARGV: now, window, per payer. Returns 1 while the caller has budget left
COLD_ROOM = BUCKET + UNPAID + """
local n = unpaid(tonumber(ARGV[2]))
if n < tonumber(ARGV[3]) then return 1 end
return 0
"""
# KEYS: unpaid, buyer, named bucket, free bucket; ARGV: now, window, per payer, may pay, is proven, named rate,
# named burst, free rate, free burst. Returns 1 (the caller's budget), 2 (the free bucket), 0 (refused)
COLD_ADMIT = BUCKET + UNPAID + """
local window = tonumber(ARGV[2])
if ARGV[4] == '1' then
  local n, since = unpaid(window)
  if n < tonumber(ARGV[3]) then
    local ok = ARGV[5] == '1' and within(KEYS[2], window)
    if not ok then
      local t = level(KEYS[3], tonumber(ARGV[6]), tonumber(ARGV[7]))
      if t >= 1 then store(KEYS[3], t - 1, tonumber(ARGV[6]), tonumber(ARGV[7]), window) ok = true end
    end
    if ok then
      redis.call('HSET', KEYS[1], 'n', n + 1, 'since', tostring(since))
      redis.call('EXPIRE', KEYS[1], math.max(1, math.ceil(since + window - now)))
      return 1
    end
  end
end
local t = level(KEYS[4], tonumber(ARGV[8]), tonumber(ARGV[9]))
if t >= 1 then store(KEYS[4], t - 1, tonumber(ARGV[8]), tonumber(ARGV[9]), window) return 2 end
return 0
"""


class SharedCounts:
    """The node's budget counts in Redis under `prefix`. A call that fails returns None, and for `RETRY_S`
    none is tried (the budgets count in their process meanwhile)."""

    def __init__(self, url: str, prefix: str, clock: Callable[[], float] = time.time) -> None:
        self.client = redis.Redis.from_url(url, socket_timeout=TIMEOUT_S, socket_connect_timeout=TIMEOUT_S)
        self.prefix, self.clock = prefix, SharedClock(clock, self._redis_time, "Redis", CLOCK_RESOLUTION_S)
        self._scripts = {name: self.client.register_script(source) for name, source in (
            ("hang_up_admit", HANG_UP_ADMIT), ("hang_up_end", HANG_UP_END), ("paid", PAID),
            ("cold_room", COLD_ROOM), ("cold_admit", COLD_ADMIT))}
        self._down_until = 0.0
        self._marked: dict[str, float] = {}  # buyer key -> when this process last marked it
        self._lock = threading.Lock()

    def _redis_time(self) -> float:
        seconds, micros = self.client.time()
        return seconds + micros / 1e6

    def key(self, *parts: str) -> str:
        return self.prefix + ":".join(parts)

    def run(self, script: str, keys: Sequence[str], args: Sequence[float | int | str]) -> Any:
        if time.monotonic() < self._down_until:
            return None
        try:
            return self._scripts[script](keys=[self.key(k) for k in keys], args=[self.clock(), *args])
        except redis.RedisError as exc:
            self._down_until = time.monotonic() + RETRY_S
            log.warning("budget counts: Redis failed (%s); this replica counts on its own for %g s",
                        type(exc).__name__, RETRY_S)
            return None

    def paid(self, keys: Sequence[str], window_s: float) -> None:
        """Mark the keys buyers (and their cold loads paid for), each at most once per PAID_REFRESH_S here."""
        now = time.monotonic()
        with self._lock:
            due = [k for k in keys if now - self._marked.get(k, -PAID_REFRESH_S) >= PAID_REFRESH_S]
            if len(self._marked) >= 100_000:
                self._marked.clear()
            self._marked.update((k, now) for k in due)
        if due:
            self.run("paid", [f"buyer:{k}" for k in due], [window_s])

    def unmark(self, key: str) -> None:
        """The key spent its own cold-load budget here: its next purchase here is written at once (left to
        the 5 s refresh, a payer trying adapters in turn, one purchase each, ran out of loads: 429)."""
        with self._lock:
            self._marked.pop(key, None)


def shared_counts(broker_url: str, node: str) -> SharedCounts | None:
    """The node's shared counts where its broker is Redis (production); None: the embedded node's one process."""
    if not broker_url.startswith(("redis://", "rediss://")):
        return None
    return SharedCounts(broker_url, f"loranode:budget:{node.lower()}:")


class SharedHangUpBudget:
    """node/api/hang_up_budget.py's rule on the shared counts; `local` gives its parameters, and counts
    while Redis is down."""

    def __init__(self, counts: SharedCounts, local: HangUpBudget) -> None:
        self.counts, self.local = counts, local
        bucket = local.shared
        self._shared = (bucket.rate_per_s, bucket.burst)
        self._own = (local.per_payer_rate_per_s, local.per_payer_burst)

    def admit(self, key: str | None) -> Ticket:
        if key is None:
            return Ticket()
        answer = self.counts.run("hang_up_admit", ["hang_up:shared", f"hang_up:own:{key}", f"hang_up:struck:{key}",
                                                   f"buyer:{key}"], [*self._shared, *self._own, self.local.window_s])
        if answer is None:
            return self.local.admit(key)
        took, retry_after_ms, is_own = (int(v) for v in answer)
        if took < 0:
            raise refusal(retry_after_ms / 1000)
        return Ticket(self, key, is_reserved=bool(took), is_own=bool(is_own))

    def give_back(self, ticket: Ticket) -> None:
        self._end(ticket, is_hang_up=False)  # Redis down: the token comes back by the refill

    def spend(self, ticket: Ticket) -> None:
        if not self._end(ticket, is_hang_up=True):
            self.local.spend(ticket)

    def paid(self, *keys: str) -> None:
        self.local.paid(*keys)
        self.counts.paid(keys, self.local.window_s)

    def _end(self, ticket: Ticket, is_hang_up: bool) -> bool:
        bucket, (rate, burst) = ((f"hang_up:own:{ticket.key}", self._own) if ticket.is_own
                                 else ("hang_up:shared", self._shared))
        return self.counts.run("hang_up_end", [bucket, f"hang_up:struck:{ticket.key}"],
                               [rate, burst, self.local.window_s, int(ticket.is_reserved), int(is_hang_up)]) is not None


class SharedColdLoadGate:
    """node/api/cold_load.py's rule on the shared counts; `local` gives its parameters, and counts while
    Redis is down."""

    def __init__(self, provider: AdapterRegistrar, counts: SharedCounts, local: ColdLoadGate) -> None:
        self.provider, self.counts, self.local = provider, counts, local

    async def admit(self, adapter: str, caller: Caller | None) -> None:
        if self.provider.state(adapter) is LoadState.READY:
            return
        gate, key = self.local, caller.key if caller is not None else "-"
        may_pay = False
        if caller is not None:
            room = self.counts.run("cold_room", [f"cold:unpaid:{key}", f"buyer:{key}"], [gate.window_s, gate.per_payer])
            if room is None:
                return await gate.admit(adapter, caller)
            may_pay = bool(room) and await asyncio.to_thread(caller.spendable) > 0
        answer = self.counts.run("cold_admit", [f"cold:unpaid:{key}", f"buyer:{key}", "cold:named", "cold:free"],
                                 [gate.window_s, gate.per_payer, int(may_pay), int(caller is not None and
                                                                                    caller.is_proven),
                                  gate.named.rate_per_s, gate.named.burst, gate.free.rate_per_s, gate.free.burst])
        if answer is None:
            return await gate.admit(adapter, caller)
        if not answer:
            raise cold_refusal(adapter)
        if answer == 1:
            self.counts.unmark(key)

    def paid(self, *keys: str) -> None:
        self.local.paid(*keys)
        self.counts.paid(keys, self.local.window_s)
