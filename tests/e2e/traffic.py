"""Paid traffic through the official `openai` client, recorded on the client side.

Every call becomes an `Outcome` in a `ClientLog`: what the client asked (payer, lane, adapter, plain or
streamed), how it ended (200 for a complete answer, the HTTP status of a refusal, 0 when the
connection or the stream broke), and every receipt it was handed. The invariant checker holds this
log against the node's database and the chain. The client never retries on its own (max_retries=0):
each call is one HTTP request, so the log is exactly what went over the wire.
"""

from __future__ import annotations

import json
import threading
from collections.abc import Iterable
from dataclasses import dataclass
from typing import Any

import httpx
import openai

from node.client.payer import Payer

PROMPTS = ("the sea is", "count with me", "what shall we cook", "tell me of the stars", "calm water")


@dataclass(frozen=True)
class Outcome:
    payer: str
    lane: int
    model: str
    stream: bool
    status: int  # 200: a complete answer; else the refusal's HTTP status; 0: the connection or stream broke
    receipts: tuple[dict[str, Any], ...]
    error: str = ""
    receipt_id: str = ""  # a refusal that names the voucher's receipt (409: already used and settled)

    @property
    def is_served(self) -> bool:
        return self.status == 200


class ClientLog:
    """Thread-safe record of every paid call the test made."""

    def __init__(self) -> None:
        self._outcomes: list[Outcome] = []
        self._lock = threading.Lock()

    def add(self, outcome: Outcome) -> Outcome:
        with self._lock:
            self._outcomes.append(outcome)
        return outcome

    @property
    def outcomes(self) -> list[Outcome]:
        with self._lock:
            return list(self._outcomes)

    def statuses(self) -> dict[int, int]:
        counts: dict[int, int] = {}
        for o in self.outcomes:
            counts[o.status] = counts.get(o.status, 0) + 1
        return counts


def _receipt_of(obj: Any) -> dict[str, Any] | None:
    extra = getattr(obj, "model_extra", None) or {}
    return extra.get("receipt")


def paid_call(client: Any, payer: str, lane: int, model: str, i: int, *, stream: bool | None = None,
              max_tokens: int | None = None) -> Outcome:
    """Request number `i` of a lane: chat and plain completions alternate, every other pair streams."""
    chat, stream = i % 2 == 0, ((i // 2) % 2 == 1) if stream is None else stream
    prompt, max_tokens = PROMPTS[i % len(PROMPTS)], max_tokens or 3 + i % 8
    receipts: list[dict[str, Any]] = []
    try:
        if chat:
            resp = client.chat.completions.create(model=model, messages=[{"role": "user", "content": prompt}],
                                                  max_tokens=max_tokens, stream=stream, temperature=0)
        else:
            resp = client.completions.create(model=model, prompt=prompt, max_tokens=max_tokens, stream=stream,
                                             temperature=0)
        for part in (resp if stream else [resp]):
            found = _receipt_of(part)
            if found is not None:
                receipts.append(found)
        return Outcome(payer, lane, model, stream, 200, tuple(receipts))
    except openai.APIStatusError as exc:
        code = (exc.body or {}).get("code") if isinstance(exc.body, dict) else None
        return Outcome(payer, lane, model, stream, exc.status_code, tuple(receipts), str(code or exc.message))
    except (openai.APIError, httpx.HTTPError) as exc:
        return Outcome(payer, lane, model, stream, 0, tuple(receipts), type(exc).__name__)


class Traffic:
    """One thread per (payer, lane), each sending requests back to back across `models` until `stop()`
    or until it has sent `max_per_lane`. Use as a context manager; `wait()` joins the threads."""

    def __init__(self, payers: list[Payer], lanes: Iterable[tuple[int, int]], models: list[str], log: ClientLog,
                 max_per_lane: int | None = None) -> None:
        self.payers, self.lanes, self.models, self.log = payers, list(lanes), models, log
        self.max_per_lane = max_per_lane
        self._stop = threading.Event()
        self._threads = [threading.Thread(target=self._drive, args=lane, daemon=True) for lane in self.lanes]

    def _drive(self, payer_index: int, lane: int) -> None:
        payer = self.payers[payer_index]
        client = payer.openai(lane, max_retries=0, timeout=60.0)
        i = 0
        while not self._stop.is_set() and (self.max_per_lane is None or i < self.max_per_lane):
            model = self.models[(i + lane + payer_index) % len(self.models)]
            self.log.add(paid_call(client, payer.address, lane, model, i))
            i += 1

    def __enter__(self) -> Traffic:
        for t in self._threads:
            t.start()
        return self

    def stop(self) -> None:
        self._stop.set()
        self.wait()

    def wait(self, timeout_s: float = 300.0) -> None:
        for t in self._threads:
            t.join(timeout=timeout_s)
            assert not t.is_alive(), "a traffic lane did not finish"

    def __exit__(self, *exc: object) -> None:
        self.stop()


def burst(payers: list[Payer], lanes: Iterable[tuple[int, int]], models: list[str], log: ClientLog,
          per_lane: int) -> None:
    """`per_lane` requests on each lane, concurrently across lanes; returns when all are answered."""
    with Traffic(payers, lanes, models, log, max_per_lane=per_lane) as traffic:
        traffic.wait()


def sse_payloads(lines: Iterable[str]) -> list[dict[str, Any]]:
    """The JSON payloads of a server-sent event stream (`[DONE]` left out)."""
    out = []
    for line in lines:
        if line.startswith("data: ") and line != "data: [DONE]":
            out.append(json.loads(line.removeprefix("data: ")))
    return out


def _error(resp: httpx.Response) -> tuple[str, str]:
    """The node's error code and the receipt its details name, if any; a proxy's own error page (a 502
    from the balancer) has neither."""
    try:
        error = resp.json()["error"]
        return str(error["code"]), str((error.get("details") or {}).get("receipt_id") or "")
    except (ValueError, KeyError, TypeError, AttributeError):
        return resp.reason_phrase, ""


def send_raw(base_url: str, body: bytes, header: str, payer: str, lane: int) -> Outcome:
    """POST exactly these bytes with this X-Payment (what a client's retry sends); streamed or not, as the
    body says. A stream that breaks, or ends in an error event, is not a complete answer (status 0)."""
    request = json.loads(body)
    stream, model = bool(request.get("stream")), str(request["model"])
    headers = {"X-Payment": header, "Content-Type": "application/json"}
    payloads: list[dict[str, Any]] = []
    status, error = 0, ""
    try:
        with httpx.stream("POST", f"{base_url}/v1/completions", content=body, headers=headers, timeout=60) as resp:
            if resp.status_code != 200:
                resp.read()
                return Outcome(payer, lane, model, stream, resp.status_code, (), *_error(resp))
            for line in resp.iter_lines() if stream else [f"data: {resp.read().decode()}"]:
                payloads.extend(sse_payloads([line]))
        errors = [p["error"] for p in payloads if "error" in p]
        status, error = (0, str(errors[0].get("code"))) if errors else (200, "")
    except httpx.HTTPError as exc:
        error = type(exc).__name__
    receipts = tuple(p["receipt"] for p in payloads if "receipt" in p)
    return Outcome(payer, lane, model, stream, status, receipts, error)
