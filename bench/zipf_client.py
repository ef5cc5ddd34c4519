"""The load client of bench/replicas.py, cheap so that the replicas get the CPU: one process, one asyncio
loop, one HTTP/1.1 keep-alive connection per lane on raw asyncio streams (no HTTP library on the way of
a request), and every request's body and voucher signed before the timed part.

The money rules are the node's as ever: each voucher pays for its body's exact bytes on its lane, and
vouchers are signed in lane order `cumulative = top + k x step` (top: the highest cumulative signed on
the lane so far, or the lane's figures from the node at first; step: the most one request of this
traffic can cost, from the node's quotes). The node charges each request its actual fee (at most step),
so every voucher covers its request on top of the charged total, and a voucher left unused when a round
ends is never sent (the next round signs above it).

    traffic = ZipfTraffic(ids, 1.1, payer, max_tokens=16)
    signed = traffic.presign(lanes=range(32), per_lane=100)
    results = asyncio.run(traffic.run("http://127.0.0.1:8080", signed, seconds=20))
    # [(status, ttft_s, latency_s, completion tokens, replica that served it, adapter)], traffic.signed_inline
    # status 599: the connection broke before an answer came; 598: a 200 stream that ended without its
    # receipt; traffic.failures says what each of them saw
"""

from __future__ import annotations

import asyncio
import bisect
import json
import random
import time
from collections import deque
from dataclasses import dataclass
from typing import Any
from urllib.parse import urlsplit

from node.client.payer import Payer
from node.protocol.voucher import SignedVoucher, Voucher, request_hash, sign_voucher

PROMPTS = ("the sea is", "waves on the shore", "a ship sails", "the lighthouse keeper said")
VALIDITY_S = 3_600
Result = tuple[int, float, float, int, str, int]


@dataclass(frozen=True)
class Signed:
    request: bytes  # the whole HTTP/1.1 request: head with X-Payment, and body
    adapter: int


class ZipfTraffic:
    def __init__(self, ids: list[int], s: float, payer: Payer, max_tokens: int) -> None:
        weights = [1 / (k + 1) ** s for k in range(len(ids))]
        self.cum = [sum(weights[: k + 1]) for k in range(len(weights))]
        self.ids, self.payer, self.max_tokens = ids, payer, max_tokens
        self.rng = random.Random(0)
        self.top: dict[int, int] = {}  # lane -> the highest cumulative signed there
        self.signed_inline = 0  # requests of a lane that ran out of presigned ones (signed in the loop)
        self.failures: list[str] = []  # what each request that got no receipt saw (an exception, an error event)
        self.per_lane = 80  # how many to presign per lane (bench/replicas.py raises it to what a round used)
        self.step = max(payer.quote("/v1/completions", self._body(ids[0], p), 0)[1] for p in PROMPTS)

    def pick(self) -> int:
        return self.ids[bisect.bisect(self.cum, self.rng.random() * self.cum[-1])]

    def _body(self, adapter: int, prompt: str) -> bytes:
        return json.dumps({"model": str(adapter), "prompt": prompt, "max_tokens": self.max_tokens,
                           "stream": True, "stop": ["@@never@@"]}).encode()

    def sign_next(self, lane: int) -> Signed:
        if lane not in self.top:
            data = self.payer.channel(lane)
            self.top[lane] = max(int(data["chargedTotal"]), int(data.get("lastCumulative", 0)))
        adapter = self.pick()
        body = self._body(adapter, self.rng.choice(PROMPTS))
        self.top[lane] += self.step
        info = self.payer.info
        voucher = Voucher(payer=self.payer.address, node=info.node, lane=lane, cumulative=self.top[lane],
                          request_hash=request_hash(body),
                          deadline=int(time.time()) + max(VALIDITY_S, info.min_validity_s + 60))
        header = SignedVoucher.of(voucher, sign_voucher(self.payer.key, voucher, info.domain)).encode()
        head = (f"POST /v1/completions HTTP/1.1\r\nHost: bench\r\nContent-Type: application/json\r\n"
                f"X-Payment: {header}\r\nContent-Length: {len(body)}\r\n\r\n")
        return Signed(head.encode() + body, adapter)

    def presign(self, lanes: range | list[int], per_lane: int) -> dict[int, deque[Signed]]:
        return {lane: deque(self.sign_next(lane) for _ in range(per_lane)) for lane in lanes}

    async def run(self, url: str, signed: dict[int, deque[Signed]], seconds: float) -> list[Result]:
        """Each lane sends its requests back to back until `seconds` have passed."""
        out: list[Result] = []
        deadline = time.monotonic() + seconds
        await asyncio.gather(*(self._lane(url, lane, queue, deadline, out) for lane, queue in signed.items()))
        return out

    async def _lane(self, url: str, lane: int, queue: deque[Signed], deadline: float, out: list[Result]) -> None:
        where = urlsplit(url)
        conn: tuple[asyncio.StreamReader, asyncio.StreamWriter] | None = None
        while time.monotonic() < deadline:
            if not queue:
                self.signed_inline += 1
                queue.append(self.sign_next(lane))
            signed = queue.popleft()
            request = signed.request
            started = time.monotonic()
            try:
                conn = conn or await asyncio.open_connection(where.hostname, where.port)
                status, ttft, served_by, text, keep = await _exchange(*conn, request, started)
            except (OSError, asyncio.IncompleteReadError, ValueError) as exc:
                status, ttft, served_by, text, keep = 599, float("nan"), "", b"", False
                self.failures.append(f"lane {lane}: {type(exc).__name__}: {exc}"[:300])
            last = _last_event(text) if status == 200 else None
            # answered: the last event carries the receipt (of no completion token when the model's first
            # token ended the text: charged for the prompt, an answer all the same)
            is_answered = last is not None and "receipt" in last
            tokens = last["usage"]["completion_tokens"] if last is not None and is_answered else 0
            if status == 200 and not is_answered:
                self.failures.append(f"lane {lane}: 200 from {served_by}, no receipt: {text[-300:]!r}")
            out.append((status if is_answered or status != 200 else 598, ttft, time.monotonic() - started, tokens,
                        served_by, signed.adapter))
            if not keep and conn is not None:
                conn[1].close()
                conn = None
            if not is_answered:
                await asyncio.sleep(0.2)
        if conn is not None:
            conn[1].close()


async def _exchange(reader: asyncio.StreamReader, writer: asyncio.StreamWriter, request: bytes,
                    started: float) -> tuple[int, float, str, bytes, bool]:
    """(status, time to the first streamed event, X-Served-By, body, whether the connection stays open)."""
    writer.write(request)
    head = await reader.readuntil(b"\r\n\r\n")
    status = int(head[9:12])
    headers = dict(line.split(b": ", 1) for line in head.lower().split(b"\r\n")[1:] if b": " in line)
    ttft, chunks = float("nan"), []
    if headers.get(b"transfer-encoding") == b"chunked":
        while size := int((await reader.readuntil(b"\r\n")).split(b";")[0], 16):
            chunk = await reader.readexactly(size + 2)
            if ttft != ttft and b"data: {" in chunk:
                ttft = time.monotonic() - started
            chunks.append(chunk[:-2])
        await reader.readuntil(b"\r\n")  # the end of the (empty) trailer
    else:
        chunks.append(await reader.readexactly(int(headers.get(b"content-length", b"0"))))
    return (status, ttft, headers.get(b"x-served-by", b"").decode(), b"".join(chunks),
            headers.get(b"connection") != b"close")


def _last_event(text: bytes) -> dict[str, Any] | None:
    """The last `data: {...}` event of a stream (the one with the receipt and usage), parsed; None if none."""
    start = text.rfind(b"data: {")
    if start < 0:
        return None
    end = text.find(b"\n", start)
    return json.loads(text[start + len(b"data: "): end if end >= 0 else len(text)])  # type: ignore[no-any-return]
