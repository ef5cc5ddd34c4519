"""One paid generation, plain or streamed: check, hold, generate, charge with a receipt, answer.

The order of checks makes every refusal cheap and leaves nothing behind: header and body (400),
signature (401), adapter (404), prompt size (413), capacity (429), then the lane and the escrow
(409, 402) which place a hold. From the hold on, the request either ends with a committed charge,
receipt and response together, or the hold is released and nothing is charged.
"""

from __future__ import annotations

import asyncio
import json
import logging
import time
from collections.abc import AsyncIterator
from dataclasses import dataclass
from typing import Any, Literal

from fastapi import Request
from fastapi.responses import JSONResponse, StreamingResponse

from node.api.engine_client import EngineClient
from node.api.metrics import APIMetrics
from node.api.schemas import ChatCompletionRequest, CompletionRequest
from node.catalog import AdapterCatalog, ServedAdapter
from node.engine import SamplingParams
from node.engine.sequence import RequestOutput, StreamDelta
from node.errors import NodeError, Unavailable
from node.payment.service import Hold, PaymentService, Replay, Usage

log = logging.getLogger(__name__)
Kind = Literal["completion", "chat"]
Finished = StreamDelta | RequestOutput  # a request's end: the last delta of a stream, or the whole output


@dataclass(frozen=True)
class Job:
    kind: Kind
    request: CompletionRequest | ChatCompletionRequest
    response_id: str
    created: int
    adapter: ServedAdapter
    prompt_ids: list[int]
    params: SamplingParams
    hold: Hold


class GenerationService:
    def __init__(self, engine: EngineClient, payments: PaymentService, catalog: AdapterCatalog,
                 metrics: APIMetrics, default_max_tokens: int = 256) -> None:
        self.engine, self.payments, self.catalog, self.metrics = engine, payments, catalog, metrics
        self.default_max_tokens = default_max_tokens

    async def handle(self, kind: Kind, req: CompletionRequest | ChatCompletionRequest, body: bytes,
                     payment: str | None, http: Request) -> JSONResponse | StreamingResponse:
        checked = self.payments.check(payment, body)
        adapter = self.catalog.cached(req.model) or await asyncio.to_thread(self.catalog.resolve, req.model)
        prompt_ids = self._prompt_ids(kind, req)
        limit = req.completion_limit if isinstance(req, ChatCompletionRequest) else req.max_tokens
        max_tokens = self.engine.completion_budget(len(prompt_ids), limit, self.default_max_tokens)
        params = SamplingParams(max_tokens=max_tokens, temperature=req.temperature, top_k=max(req.top_k, 0),
                                top_p=req.top_p, seed=req.seed, stop=tuple(req.stop_strings))
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
            return self._replay(kind, req, held.body)
        job = Job(kind, req, f"{'chatcmpl' if kind == 'chat' else 'cmpl'}-{checked.digest.hex()[:24]}",
                  int(time.time()), adapter, prompt_ids, params, held)
        if req.stream:
            return StreamingResponse(self._sse(job, admission), media_type="text/event-stream",
                                     headers={"Cache-Control": "no-cache"})
        try:
            return await self._complete(job, http)
        finally:
            admission.__exit__(None, None, None)

    def _prompt_ids(self, kind: Kind, req: CompletionRequest | ChatCompletionRequest) -> list[int]:
        if isinstance(req, ChatCompletionRequest):
            return self.engine.encode_chat([(m.role, m.text()) for m in req.messages])
        return self.engine.encode_completion(req.prompt)

    # --- plain --------------------------------------------------------------------------------------
    async def _complete(self, job: Job, http: Request) -> JSONResponse:
        started = time.monotonic()
        try:
            final, text = await _race_disconnect(self._generate(job), http)
            total, body = await asyncio.to_thread(self._charge, job, final, text)
        except BaseException:
            await asyncio.to_thread(self.payments.cancel, job.hold)
            raise
        self._observe(job, final, time.monotonic() - started)
        return JSONResponse(body, headers={"X-Charged-Total": str(total)})

    async def _generate(self, job: Job) -> tuple[RequestOutput, str]:
        final = await self.engine.complete(job.prompt_ids, job.params, str(job.adapter.adapter_id), job.response_id)
        _raise_if_failed(final)
        return final, final.text

    def _charge(self, job: Job, final: Finished, text: str) -> tuple[int, dict[str, Any]]:
        usage = Usage(final.num_prompt_tokens, final.num_completion_tokens)
        return self.payments.finish(job.hold, job.adapter, usage, text,
                                    lambda receipt: _body(job, text, final.finish_reason, usage, receipt))

    # --- streamed -----------------------------------------------------------------------------------
    async def _sse(self, job: Job, admission: Any) -> AsyncIterator[bytes]:
        started, committed, parts = time.monotonic(), False, []
        try:
            if job.kind == "chat":
                yield _event(_chunk(job, {"role": "assistant", "content": ""}, None))
            async for delta in self.engine.stream(job.prompt_ids, job.params, str(job.adapter.adapter_id),
                                                  job.response_id):
                if delta.finish_reason is not None:
                    _raise_if_failed(delta)
                parts.append(delta.text)
                if delta.text:
                    if len(parts) == 1:
                        self.metrics.ttft.observe(time.monotonic() - started)
                    yield _event(_chunk(job, delta.text, None))
                if delta.finish_reason is not None:
                    text = "".join(parts)
                    _total, body = await asyncio.to_thread(self._charge, job, delta, text)
                    committed = True
                    self._observe(job, delta, time.monotonic() - started)
                    last = _chunk(job, "", delta.finish_reason)
                    last.update(usage=body["usage"], receipt=body["receipt"])
                    yield _event(last)
                    yield b"data: [DONE]\n\n"
                    return
        except NodeError as exc:
            yield _event({"error": {"message": exc.message, "code": exc.code, "type": "server_error"}})
        finally:
            if not committed:
                await asyncio.shield(asyncio.to_thread(self.payments.cancel, job.hold))
            admission.__exit__(None, None, None)

    def _replay(self, kind: Kind, req: CompletionRequest | ChatCompletionRequest,
                body: dict[str, Any]) -> JSONResponse | StreamingResponse:
        headers = {"X-Charged-Total": body["receipt"]["chargedTotal"], "X-Idempotent-Replay": "true"}
        if not req.stream:
            return JSONResponse(body, headers=headers)

        async def events() -> AsyncIterator[bytes]:
            choice = body["choices"][0]
            text = choice["message"]["content"] if kind == "chat" else choice["text"]
            base = {"id": body["id"], "created": body["created"], "model": body["model"]}
            job_like = _ChunkBase(kind, base)
            yield _event(job_like.chunk(text, None))
            last = job_like.chunk("", choice["finish_reason"])
            last.update(usage=body["usage"], receipt=body["receipt"])
            yield _event(last)
            yield b"data: [DONE]\n\n"

        return StreamingResponse(events(), media_type="text/event-stream", headers=headers)

    def _observe(self, job: Job, final: Finished, seconds: float) -> None:
        self.metrics.latency.labels(route=job.kind).observe(seconds)
        self.metrics.tokens.labels(kind="prompt").inc(final.num_prompt_tokens)
        self.metrics.tokens.labels(kind="completion").inc(final.num_completion_tokens)
        self.metrics.receipts.inc()


def _raise_if_failed(delta: Finished) -> None:
    if delta.finish_reason == "error":
        raise delta.error or Unavailable("the engine failed this request")
    if delta.finish_reason == "abort":
        raise Unavailable("the request was aborted (its adapter was removed or the engine stopped)")


async def _race_disconnect(work: Any, http: Request) -> Any:
    """Run `work`; if the client goes away first, cancel it (the engine aborts, nothing is charged)."""
    task = asyncio.ensure_future(work)
    watcher = asyncio.ensure_future(_wait_disconnect(http))
    done, _ = await asyncio.wait({task, watcher}, return_when=asyncio.FIRST_COMPLETED)
    if task in done:
        watcher.cancel()
        return task.result()
    task.cancel()
    raise asyncio.CancelledError("client disconnected")


async def _wait_disconnect(http: Request) -> None:
    while True:
        message = await http.receive()
        if message["type"] == "http.disconnect":
            return


class _ChunkBase:
    def __init__(self, kind: Kind, base: dict[str, Any]) -> None:
        self.kind, self.base = kind, base

    def chunk(self, text: str | dict[str, str], finish: str | None) -> dict[str, Any]:
        if self.kind == "chat":
            delta = text if isinstance(text, dict) else ({"content": text} if text else {})
            return {**self.base, "object": "chat.completion.chunk",
                    "choices": [{"index": 0, "delta": delta, "finish_reason": finish}]}
        return {**self.base, "object": "text_completion",
                "choices": [{"index": 0, "text": text, "finish_reason": finish, "logprobs": None}]}


def _chunk(job: Job, text: str | dict[str, str], finish: str | None) -> dict[str, Any]:
    base = {"id": job.response_id, "created": job.created, "model": job.request.model}
    return _ChunkBase(job.kind, base).chunk(text, finish)


def _event(payload: dict[str, Any]) -> bytes:
    return b"data: " + json.dumps(payload, separators=(",", ":")).encode() + b"\n\n"


def _body(job: Job, text: str, finish: str | None, usage: Usage, receipt: dict[str, Any]) -> dict[str, Any]:
    usage_json = {"prompt_tokens": usage.prompt_tokens, "completion_tokens": usage.completion_tokens,
                  "total_tokens": usage.prompt_tokens + usage.completion_tokens}
    if job.kind == "chat":
        choice: dict[str, Any] = {"index": 0, "message": {"role": "assistant", "content": text},
                                  "finish_reason": finish}
        obj = "chat.completion"
    else:
        choice = {"index": 0, "text": text, "finish_reason": finish, "logprobs": None}
        obj = "text_completion"
    return {"id": job.response_id, "object": obj, "created": job.created, "model": job.request.model,
            "choices": [choice], "usage": usage_json, "receipt": receipt}
