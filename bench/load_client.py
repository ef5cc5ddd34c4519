"""The load generator of bench/load.py: one asyncio task per (payer, lane), each sending paid requests
back to back (signed for their exact bytes, on top of the lane's charged total) until a deadline.

Every request's outcome is kept: status, latency, completion tokens, and for a 200 the receipt id, its
fee and the charged total the node returned, so that the run can be audited against the database.
"""

from __future__ import annotations

import asyncio
import json
import random
import time
from dataclasses import dataclass

import httpx

from node.client.payer import Payer

PROMPTS = ("the sea is", "tell me of the harbour at night", "waves on the shore", "a ship sails",
           "the lighthouse keeper said", "salt and wind and")


@dataclass(frozen=True)
class Outcome:
    payer: str
    lane: int
    status: int
    latency_s: float
    completion_tokens: int = 0
    receipt_id: str | None = None
    fee: int = 0
    charged_total: int | None = None
    streamed: bool = False


@dataclass(frozen=True)
class LoadShape:
    adapter_ids: tuple[int, ...]
    max_tokens: int = 16
    stream_every: int = 5  # every n-th request of a lane is streamed (0: never)
    seed: int = 0


class LoadClient:
    def __init__(self, base_url: str, shape: LoadShape) -> None:
        self.base_url = base_url
        self.shape = shape

    async def run(self, lanes: list[tuple[Payer, int]], duration_s: float) -> list[Outcome]:
        outcomes: list[Outcome] = []
        deadline = time.monotonic() + duration_s
        limits = httpx.Limits(max_connections=len(lanes) + 4, max_keepalive_connections=len(lanes) + 4)
        async with httpx.AsyncClient(base_url=self.base_url, timeout=300, limits=limits) as http:
            await asyncio.gather(*(self._lane(http, payer, lane, deadline, outcomes) for payer, lane in lanes))
        return outcomes

    async def _lane(self, http: httpx.AsyncClient, payer: Payer, lane: int, deadline: float,
                    outcomes: list[Outcome]) -> None:
        rng = random.Random(f"{self.shape.seed}:{payer.address}:{lane}")
        i = 0
        while time.monotonic() < deadline:
            i += 1
            stream = self.shape.stream_every > 0 and i % self.shape.stream_every == 0
            outcome = await self._one(http, payer, lane, rng, stream)
            outcomes.append(outcome)
            if outcome.charged_total is not None:
                payer.observe(lane, outcome.charged_total)
            else:
                payer.forget(lane)  # refused: ask the node for the lane's total next time
                if outcome.status in (429, 503):
                    await asyncio.sleep(0.2)

    async def _one(self, http: httpx.AsyncClient, payer: Payer, lane: int, rng: random.Random,
                   stream: bool) -> Outcome:
        body = json.dumps({"model": str(rng.choice(self.shape.adapter_ids)), "prompt": rng.choice(PROMPTS),
                           "max_tokens": self.shape.max_tokens, "stream": stream}).encode()
        header = await asyncio.to_thread(payer.payment_header, body, lane)
        headers = {"Content-Type": "application/json", "X-Payment": header}
        started = time.monotonic()
        if not stream:
            resp = await http.post("/v1/completions", content=body, headers=headers)
            elapsed = time.monotonic() - started
            if resp.status_code != 200:
                return Outcome(payer.address, lane, resp.status_code, elapsed)
            data = resp.json()
            return _served(payer, lane, elapsed, data["usage"], data["receipt"], streamed=False)
        async with http.stream("POST", "/v1/completions", content=body, headers=headers) as resp:
            if resp.status_code != 200:
                await resp.aread()
                return Outcome(payer.address, lane, resp.status_code, time.monotonic() - started)
            last = None
            async for line in resp.aiter_lines():
                if line.startswith("data: {"):
                    last = json.loads(line.removeprefix("data: "))
        elapsed = time.monotonic() - started
        if last is None or "receipt" not in last:  # an error event ended the stream: nothing charged
            return Outcome(payer.address, lane, 599, elapsed, streamed=True)
        return _served(payer, lane, elapsed, last["usage"], last["receipt"], streamed=True)


def _served(payer: Payer, lane: int, elapsed: float, usage: dict[str, int], receipt: dict[str, str],
            streamed: bool) -> Outcome:
    return Outcome(payer.address, lane, 200, elapsed, usage["completion_tokens"], receipt["id"],
                   int(receipt["fee"]), int(receipt["chargedTotal"]), streamed)
