"""A tiny attacker model for the paid path: a payer with a real key and real escrow who signs honest
vouchers and then misbehaves with them (reuses a header, hangs up after N chunks, leaves a plain
request mid-answer, races two requests on one voucher). Every move goes over real HTTP."""

from __future__ import annotations

import json
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import httpx

from node.client.payer import Payer
from tests.fixtures.paid_node import PaidNode

NEVER = "@@never@@"  # a stop string no tiny model writes: the answer runs to max_tokens


@dataclass
class Attacker:
    payer: Payer
    base_url: str
    model: str

    # --- what it sends ----------------------------------------------------------------------------
    def body(self, prompt: str = "the sea", max_tokens: int = 1_000, stream: bool = False) -> bytes:
        """A request for a long answer (greedy: the tiny model writes no end-of-text after "the sea")."""
        return json.dumps({"model": self.model, "prompt": prompt, "max_tokens": max_tokens, "stream": stream,
                           "temperature": 0, "stop": [NEVER]}).encode()

    def header(self, body: bytes, lane: int) -> str:
        return self.payer.payment_header(body, lane)

    def post(self, body: bytes, header: str, timeout: float = 60.0) -> httpx.Response:
        return httpx.post(f"{self.base_url}/v1/completions", content=body, timeout=timeout,
                          headers={"X-Payment": header, "Content-Type": "application/json"})

    # --- how it misbehaves ------------------------------------------------------------------------
    def hang_up_after(self, body: bytes, header: str, chunks: int) -> list[dict[str, Any]]:
        """Stream the answer, read `chunks` events, and close the connection."""
        got: list[dict[str, Any]] = []
        with httpx.stream("POST", f"{self.base_url}/v1/completions", content=body, timeout=30,
                          headers={"X-Payment": header, "Content-Type": "application/json"}) as resp:
            assert resp.status_code == 200, resp.read()
            for line in resp.iter_lines():
                if line.startswith("data: {"):
                    got.append(json.loads(line.removeprefix("data: ")))
                if len(got) >= chunks:
                    break
        return got

    def leave_after(self, body: bytes, header: str, seconds: float) -> None:
        """Send a plain request and give up on it (closing the connection) after `seconds`."""
        try:
            httpx.post(f"{self.base_url}/v1/completions", content=body, timeout=httpx.Timeout(10, read=seconds),
                       headers={"X-Payment": header, "Content-Type": "application/json"})
        except httpx.ReadTimeout:
            return
        raise AssertionError("the answer came before the attacker could leave: ask for a longer one")

    def stream_text(self, body: bytes, header: str, timeout: float = 30.0) -> tuple[int, str, list[dict[str, Any]]]:
        """A whole streamed answer: status, text, and the JSON events."""
        events: list[dict[str, Any]] = []
        with httpx.stream("POST", f"{self.base_url}/v1/completions", content=body, timeout=timeout,
                          headers={"X-Payment": header, "Content-Type": "application/json"}) as resp:
            if resp.status_code != 200:
                return resp.status_code, resp.read().decode(), []
            events = [json.loads(line.removeprefix("data: ")) for line in resp.iter_lines()
                      if line.startswith("data: {")]
        return 200, "".join(e["choices"][0]["text"] for e in events if e.get("choices")), events

    def in_background(self, work: Callable[[], Any]) -> Callable[[], Any]:
        """Start `work` on a thread; the returned function joins it and gives its result (or raises)."""
        out: list[Any] = []
        thread = threading.Thread(target=lambda: out.append(_outcome(work)), daemon=True)
        thread.start()

        def join(timeout: float = 60.0) -> Any:
            thread.join(timeout)
            assert out, "the request is still hanging"
            if isinstance(out[0], BaseException):
                raise out[0]
            return out[0]

        return join

    # --- what it sees -----------------------------------------------------------------------------
    def charged(self, lane: int) -> int:
        return int(self.payer.channel(lane)["chargedTotal"])

    def charged_once_settled(self, lane: int, before: int, timeout_s: float = 10.0) -> int:
        """The lane's charged total once it moved from `before` (or `before` after `timeout_s`)."""
        deadline = time.monotonic() + timeout_s
        while (now := self.charged(lane)) == before and time.monotonic() < deadline:
            time.sleep(0.1)
        return now


class NodeAborts:
    """The node itself ends the adapter's requests (its adapter is removed from the engine), then serves
    it again: a node fault, as the engine reports it."""

    def __init__(self, paid: PaidNode) -> None:
        self.svc, self.model = paid.local.services, str(paid.adapter_id)
        assert self.svc is not None

    def __enter__(self) -> None:
        self.svc.engine.engine.remove_adapter(self.model)

    def __exit__(self, *exc: object) -> None:
        saved, self.svc.catalog.cache_ttl_s = self.svc.catalog.cache_ttl_s, 0.0
        try:
            time.sleep(0.2)  # the engine drains its inbox, then the catalog registers the adapter again
            self.svc.catalog.resolve(self.model)
        finally:
            self.svc.catalog.cache_ttl_s = saved


def _outcome(work: Callable[[], Any]) -> Any:
    try:
        return work()
    except BaseException as exc:  # handed to the joining test
        return exc
