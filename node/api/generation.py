"""One paid generation, plain or streamed: check, hold, generate, charge with a receipt, answer.

The order of checks makes every refusal cheap and leaves nothing behind: header and body (400),
signature (401), adapter (404), prompt size (413), capacity (429), then the voucher in flight here
(409), the lane and the escrow (409, 402) which place a hold. From the hold on, every completion
token that leaves the node is paid for or recorded as a loss:

    the answer is complete                    -> charged; the charge, receipt and response committed
    the client left (hung up, gave up)        -> charged for what was generated; the partial answer is
                                                 stored, so a replay of the voucher gets it for free
    the time limit (the hold would expire)    -> the same, and the client gets the cut answer
    a node fault before any token left        -> the hold is released; the voucher may be sent again
    a node fault after tokens left            -> nothing charged, the voucher spent, a NODE_FAULT loss
    the charge fails after tokens left        -> the voucher spent, a DELIVERED_UNCHARGED loss
"""

from __future__ import annotations

import asyncio
import json
import logging
import secrets
import threading
import time
from collections.abc import AsyncIterator
from dataclasses import dataclass, field
from typing import Any, Literal

from fastapi import Request
from fastapi.responses import JSONResponse, StreamingResponse

from node.api.engine_client import EngineClient
from node.api.metrics import APIMetrics
from node.api.receipt_issuer import ReceiptIssuer
from node.api.schemas import ChatCompletionRequest, CompletionRequest
from node.api.structured import ChatAnswer, constraint_of, read_answer, render_messages
from node.catalog import AdapterCatalog, ServedAdapter
from node.db.loss import LossReason
from node.engine import SamplingParams
from node.engine.sequence import RequestOutput, StreamDelta
from node.errors import NodeError, Unavailable
from node.payment.service import Hold, PaymentService, Replay, Usage

log = logging.getLogger(__name__)
INLINE_TOKENIZE_CHARS = 8_192  # shorter prompts are tokenized on the event loop
Kind = Literal["completion", "chat"]
Finished = StreamDelta | RequestOutput  # a request's end: the last delta of a stream, or the whole output
CLIENT_LEFT, TIME_LIMIT = "abort", "length"  # the finish reasons of an answer the node cut short


@dataclass(frozen=True)
class Job:
    kind: Kind
    request: CompletionRequest | ChatCompletionRequest
    response_id: str  # derived from the voucher: a replay answers with the same id
    request_id: str  # the engine's: unique per request, so two requests never share a listener
    created: int
    adapter: ServedAdapter
    prompt_ids: list[int]
    params: SamplingParams
    hold: Hold

    @property
    def calls_tools(self) -> bool:
        return isinstance(self.request, ChatCompletionRequest) and self.request.calls_tools

    def answer(self, text: str) -> ChatAnswer:
        return read_answer(text, self.calls_tools, self.response_id.rsplit("-", 1)[-1][:16])


class Cut:
    """Ends a request early on the node's side, remembering why (the client left, or the time limit):
    the engine then reports the request as aborted with what it had generated."""

    def __init__(self, engine: EngineClient, request_id: str) -> None:
        self.engine, self.request_id = engine, request_id
        self.reason: str | None = None

    def __call__(self, reason: str) -> None:
        if self.reason is None:
            self.reason = reason
            self.engine.abort(self.request_id)

    def ending(self, final: Finished) -> str:
        """How the request ended: its finish reason, or why it was cut; a node fault raises."""
        if final.finish_reason == "abort" and self.reason is not None:
            return self.reason
        _raise_if_failed(final)
        return final.finish_reason or "stop"


@dataclass
class Sent:
    """What a stream has produced so far, and whether its hold has ended (charged, released, lost). The
    hold ends once: every ending takes `lock` and checks `is_settled` (a hang-up can race the charge)."""

    num_prompt_tokens: int
    num_completion_tokens: int = 0
    parts: list[str] = field(default_factory=list)
    is_settled: bool = False
    lock: threading.Lock = field(default_factory=threading.Lock)

    def add(self, delta: StreamDelta) -> None:
        self.num_completion_tokens = delta.num_completion_tokens
        if delta.text:
            self.parts.append(delta.text)

    @property
    def usage(self) -> Usage:
        return Usage(self.num_prompt_tokens, self.num_completion_tokens)

    @property
    def text(self) -> str:
        return "".join(self.parts)


class GenerationService:
    def __init__(self, engine: EngineClient, payments: PaymentService, issuer: ReceiptIssuer, catalog: AdapterCatalog,
                 metrics: APIMetrics, default_max_tokens: int = 256) -> None:
        self.engine, self.payments, self.catalog, self.metrics = engine, payments, catalog, metrics
        self.issuer = issuer
        self.default_max_tokens = default_max_tokens
        self.max_generation_s = payments.max_generation_s

    async def handle(self, kind: Kind, req: CompletionRequest | ChatCompletionRequest, body: bytes,
                     payment: str | None, http: Request) -> JSONResponse | StreamingResponse:
        checked = self.payments.check(payment, body)
        adapter = self.catalog.cached(req.model) or await asyncio.to_thread(self.catalog.resolve, req.model)
        prompt_ids = await self._tokenize(kind, req)
        limit = req.completion_limit if isinstance(req, ChatCompletionRequest) else req.max_tokens
        max_tokens = self.engine.completion_budget(len(prompt_ids), limit, self.default_max_tokens)
        constraint = constraint_of(req) if isinstance(req, ChatCompletionRequest) else None
        if constraint is not None:  # refused here, before any hold, if it cannot compile
            await self.engine.compile_grammar(constraint.spec, constraint.param)
        params = SamplingParams(max_tokens=max_tokens, temperature=req.temperature, top_k=max(req.top_k, 0),
                                top_p=req.top_p, seed=req.seed, stop=tuple(req.stop_strings),
                                grammar=constraint.spec if constraint else None)
        max_fee = self.payments.pricing.max_fee(len(prompt_ids), max_tokens)
        admission = self.engine.admission()
        admission.__enter__()
        try:
            held = await asyncio.to_thread(self.payments.hold, checked, max_fee)
        except BaseException:
            admission.__exit__(None, None, None)
            raise
        if isinstance(held, Replay):
            admission.__exit__(None, None, None)
            return self._replay(req, held.body)
        response_id = f"{'chatcmpl' if kind == 'chat' else 'cmpl'}-{checked.digest.hex()[:24]}"
        job = Job(kind, req, response_id, f"{response_id}-{secrets.token_hex(6)}", int(time.time()), adapter,
                  prompt_ids, params, held)
        if req.stream:
            return StreamingResponse(self._sse(job, admission), media_type="text/event-stream",
                                     headers={"Cache-Control": "no-cache"})
        try:
            return await self._complete(job, http)
        finally:
            admission.__exit__(None, None, None)

    async def _tokenize(self, kind: Kind, req: CompletionRequest | ChatCompletionRequest) -> list[int]:
        """The prompt's ids; a long prompt is tokenized off the event loop (a short one costs less than
        the thread hop), so nobody's huge prompt stalls everyone else's requests."""
        if _prompt_chars(req) <= INLINE_TOKENIZE_CHARS:
            return self._prompt_ids(kind, req)
        return await asyncio.to_thread(self._prompt_ids, kind, req)

    def _prompt_ids(self, kind: Kind, req: CompletionRequest | ChatCompletionRequest) -> list[int]:
        if isinstance(req, ChatCompletionRequest):
            tools = [t.model_dump(exclude_none=True) for t in req.tools or []] if req.calls_tools else None
            return self.engine.encode_chat(render_messages(req.messages), tools)
        return self.engine.encode_completion(req.prompt)

    # --- plain --------------------------------------------------------------------------------------
    async def _complete(self, job: Job, http: Request) -> JSONResponse:
        """Nothing leaves the node before the charge commits: whatever fails first releases the hold."""
        started = time.monotonic()
        try:
            final, ending = await self._generate(job, http)
            if final.num_completion_tokens == 0 and ending in (CLIENT_LEFT, TIME_LIMIT):
                raise Unavailable("the request was cut before it produced a token; nothing was charged")
            usage = Usage(final.num_prompt_tokens, final.num_completion_tokens)
            total, body = await asyncio.to_thread(self._charge, job, usage, final.text, ending)
        except BaseException:
            await asyncio.shield(asyncio.to_thread(self.payments.cancel, job.hold))
            raise
        self._observe(job, usage, time.monotonic() - started)
        return JSONResponse(body, headers={"X-Charged-Total": str(total)})

    async def _generate(self, job: Job, http: Request) -> tuple[RequestOutput, str]:
        """The request's output and how it ended; a client that leaves, or the time limit, cuts it short
        (the engine then reports what it had generated)."""
        finished = self.engine.submit(job.prompt_ids, job.params, str(job.adapter.adapter_id), job.request_id)
        cut = Cut(self.engine, job.request_id)
        timer = asyncio.get_running_loop().call_later(self.max_generation_s, cut, TIME_LIMIT)
        watcher = asyncio.ensure_future(_wait_disconnect(http))
        watcher.add_done_callback(lambda w: None if w.cancelled() or w.exception() else cut(CLIENT_LEFT))
        try:
            final = await finished
        except asyncio.CancelledError:  # the server is stopping: a node fault, nothing charged
            self.engine.abort(job.request_id)
            raise
        finally:
            timer.cancel()
            watcher.cancel()
        return final, cut.ending(final)

    def _charge(self, job: Job, usage: Usage, text: str, finish: str) -> tuple[int, dict[str, Any]]:
        digest = job.hold.checked.digest
        return self.payments.finish(job.hold, usage,
                                    lambda fee: self.issuer.issue(digest, job.adapter, usage, fee, text),
                                    lambda receipt: _body(job, text, finish, usage, receipt))

    # --- streamed -----------------------------------------------------------------------------------
    async def _sse(self, job: Job, admission: Any) -> AsyncIterator[bytes]:
        started, sent = time.monotonic(), Sent(len(job.prompt_ids))
        try:
            if job.kind == "chat":
                yield _event(_chunk(job, {"role": "assistant", "content": ""}, None))
            cut = Cut(self.engine, job.request_id)
            timer = asyncio.get_running_loop().call_later(self.max_generation_s, cut, TIME_LIMIT)
            try:
                async for delta in self.engine.stream(job.prompt_ids, job.params, str(job.adapter.adapter_id),
                                                      job.request_id):
                    ending = cut.ending(delta) if delta.finish_reason is not None else None
                    sent.add(delta)
                    if delta.text and not job.calls_tools:  # tool calls go out whole, at the end
                        if len(sent.parts) == 1:
                            self.metrics.ttft.observe(time.monotonic() - started)
                        yield _event(_chunk(job, delta.text, None))
                    if ending is not None:
                        yield await self._last_event(job, sent, ending, started)
                        yield b"data: [DONE]\n\n"
                        return
            finally:
                timer.cancel()
        except NodeError as exc:
            await asyncio.to_thread(self._end_unpaid, job, sent, LossReason.NODE_FAULT, exc)
            yield _event({"error": {"message": exc.message, "code": exc.code, "type": "server_error"}})
        finally:
            if not sent.is_settled:  # the client hung up (or the server is stopping) mid-stream
                self.engine.abort(job.request_id)
                await asyncio.shield(asyncio.to_thread(self._settle_hang_up, job, sent))
            admission.__exit__(None, None, None)

    async def _last_event(self, job: Job, sent: Sent, ending: str, started: float) -> bytes:
        """Charge for the stream; the last chunk carries usage and receipt. A charge that cannot be
        committed after tokens left is a loss (raised on as the stream's error)."""
        try:
            body = await asyncio.to_thread(self._charge_stream, job, sent, ending)
        except NodeError as exc:
            await asyncio.to_thread(self._end_unpaid, job, sent, LossReason.DELIVERED_UNCHARGED, exc)
            raise
        self._observe(job, sent.usage, time.monotonic() - started)
        choice = body["choices"][0]
        last = _chunk(job, "", choice["finish_reason"])
        if job.calls_tools:
            last["choices"][0]["delta"] = ChatAnswer(choice["message"]["content"],
                                                     choice["message"].get("tool_calls", [])).delta()
        last.update(usage=body["usage"], receipt=body["receipt"])
        return _event(last)

    def _charge_stream(self, job: Job, sent: Sent, ending: str) -> dict[str, Any]:
        with sent.lock:
            if sent.is_settled:  # the hang-up's settling came first (its thread may start before this one)
                raise Unavailable("the stream ended while it was being charged")
            _total, body = self._charge(job, sent.usage, sent.text, ending)
            sent.is_settled = True
            return body

    def _end_unpaid(self, job: Job, sent: Sent, reason: LossReason, exc: NodeError) -> None:
        """No charge: release the hold if no token left the node, else spend the voucher with a loss."""
        with sent.lock:
            if not self._settling(job, sent):
                return
            self.payments.write_off(job.hold, sent.usage, reason, f"{exc.code}: {exc.message}")

    def _settling(self, job: Job, sent: Sent) -> bool:
        """Under `sent.lock`: take the stream's one settling. False when there is nothing left to do: it
        was settled already, or no token left the node (then the hold is released here)."""
        if sent.is_settled:
            return False
        sent.is_settled = True
        if not sent.parts:
            self.payments.cancel(job.hold)
            return False
        return True

    def _settle_hang_up(self, job: Job, sent: Sent) -> None:
        """The client left mid-stream: charge what was generated and sent, and store it as the answer
        (a loss if that charge cannot be committed); release the hold if nothing was sent."""
        with sent.lock:
            if not self._settling(job, sent):
                return
            try:
                self._charge(job, sent.usage, sent.text, CLIENT_LEFT)
            except NodeError as exc:
                self.payments.write_off(job.hold, sent.usage, LossReason.DELIVERED_UNCHARGED,
                                        f"{exc.code}: {exc.message}")
                return
        log.info("stream %s: the client left after %d tokens, charged for them", job.response_id,
                 sent.num_completion_tokens)

    def _replay(self, req: CompletionRequest | ChatCompletionRequest,
                body: dict[str, Any]) -> JSONResponse | StreamingResponse:
        """The stored answer again, free, in the shape it was bought in: a body both endpoints accept may
        be retried on the other one (the voucher covers the body, not the path)."""
        headers = {"X-Charged-Total": body["receipt"]["chargedTotal"], "X-Idempotent-Replay": "true"}
        kind: Kind = "chat" if body["object"] == "chat.completion" else "completion"
        if not req.stream:
            return JSONResponse(body, headers=headers)

        async def events() -> AsyncIterator[bytes]:
            choice = body["choices"][0]
            message = choice.get("message", {})
            text: str | dict[str, Any] = (ChatAnswer(message["content"], message.get("tool_calls", [])).delta()
                                          if kind == "chat" else choice["text"])
            base = {"id": body["id"], "created": body["created"], "model": body["model"]}
            job_like = _ChunkBase(kind, base)
            yield _event(job_like.chunk(text, None))
            last = job_like.chunk("", choice["finish_reason"])
            last.update(usage=body["usage"], receipt=body["receipt"])
            yield _event(last)
            yield b"data: [DONE]\n\n"

        return StreamingResponse(events(), media_type="text/event-stream", headers=headers)

    def _observe(self, job: Job, usage: Usage, seconds: float) -> None:
        self.metrics.latency.labels(route=job.kind).observe(seconds)
        self.metrics.tokens.labels(kind="prompt").inc(usage.prompt_tokens)
        self.metrics.tokens.labels(kind="completion").inc(usage.completion_tokens)
        self.metrics.receipts.inc()


def _prompt_chars(req: CompletionRequest | ChatCompletionRequest) -> int:
    if isinstance(req, ChatCompletionRequest):
        return sum(len(m.text()) for m in req.messages)
    return len(req.prompt)


def _raise_if_failed(delta: Finished) -> None:
    if delta.finish_reason == "error":
        raise delta.error or Unavailable("the engine failed this request")
    if delta.finish_reason == "abort":
        raise Unavailable("the request was aborted (its adapter was removed or the engine stopped)")


async def _wait_disconnect(http: Request) -> None:
    while True:
        message = await http.receive()
        if message["type"] == "http.disconnect":
            return


class _ChunkBase:
    def __init__(self, kind: Kind, base: dict[str, Any]) -> None:
        self.kind, self.base = kind, base

    def chunk(self, text: str | dict[str, Any], finish: str | None) -> dict[str, Any]:
        if self.kind == "chat":
            delta = text if isinstance(text, dict) else ({"content": text} if text else {})
            return {**self.base, "object": "chat.completion.chunk",
                    "choices": [{"index": 0, "delta": delta, "finish_reason": finish}]}
        return {**self.base, "object": "text_completion",
                "choices": [{"index": 0, "text": text, "finish_reason": finish, "logprobs": None}]}


def _chunk(job: Job, text: str | dict[str, Any], finish: str | None) -> dict[str, Any]:
    base = {"id": job.response_id, "created": job.created, "model": job.request.model}
    return _ChunkBase(job.kind, base).chunk(text, finish)


def _event(payload: dict[str, Any]) -> bytes:
    return b"data: " + json.dumps(payload, separators=(",", ":")).encode() + b"\n\n"


def _body(job: Job, text: str, finish: str | None, usage: Usage, receipt: dict[str, Any]) -> dict[str, Any]:
    usage_json = {"prompt_tokens": usage.prompt_tokens, "completion_tokens": usage.completion_tokens,
                  "total_tokens": usage.prompt_tokens + usage.completion_tokens}
    if job.kind == "chat":
        answer = job.answer(text)
        choice: dict[str, Any] = {"index": 0, "message": answer.message(),
                                  "finish_reason": answer.finish_reason(finish or "stop")}
        obj = "chat.completion"
    else:
        choice = {"index": 0, "text": text, "finish_reason": finish, "logprobs": None}
        obj = "text_completion"
    return {"id": job.response_id, "object": obj, "created": job.created, "model": job.request.model,
            "choices": [choice], "usage": usage_json, "receipt": receipt}
