"""One paid generation, plain or streamed: check, hold, generate, charge with a receipt, answer.

The order of checks makes every refusal cheap and leaves nothing behind: header and body (400),
signature (401), adapter (404), a load of a chat adapter not in host memory by a caller without escrow
beyond the free callers' bucket (429, node/api/payment_gate.py), prompt size (413), a payer whose hang-ups
before a first token spent its budget (429, node/api/hang_up_budget.py), capacity (429), then
the voucher in flight here (409), the lane and the escrow (409, 402) which place a hold, then the
grammar of a structured answer (400, the hold released). From the hold on, every completion token that
leaves the node is paid for or recorded as a loss:

    the answer is complete                    -> charged; the charge, receipt and response committed
    the client left (hung up, gave up)        -> charged for what was generated; the partial answer is
                                                 stored, so a replay of the voucher gets it for free
    the time limit (the hold would expire)    -> the same, and the client gets the cut answer (the limits
                                                 count from the hold: a grammar's compile runs inside them)
    a stream read past the hold's time        -> charged for what was sent so far; nothing more is sent
    a node fault (or the time limit) before   -> the hold is released; the voucher may be sent again
      any token left
    a node fault after tokens left            -> nothing charged, the voucher spent, a NODE_FAULT loss
    the charge fails after tokens left        -> the voucher spent, a DELIVERED_UNCHARGED loss

A stream with tools holds its text back (the calls go out whole, with the charge): a node fault before
its end is one before any token left; a client that hangs up before it is charged for what was generated.

A request of n choices runs as n engine sequences of one prompt; its hold covers n x max_tokens, and
every ending above counts the tokens of all its choices, under one receipt.
"""

from __future__ import annotations

import asyncio
import contextlib
import functools
import logging
import time
from collections.abc import AsyncIterator, Callable
from typing import Any

from fastapi import Request
from fastapi.responses import JSONResponse, StreamingResponse

from node.api.choice import ChoiceOutput, Kind, ResponseShape, event, replay_response
from node.api.cold_load import Caller
from node.api.engine_client import EngineClient
from node.api.job import CLIENT_LEFT, TIME_LIMIT, Cut, Job, Sent, as_fault, once, sampling_params
from node.api.json_response import FastJSONResponse
from node.api.metrics import APIMetrics
from node.api.payment_gate import PaymentGate
from node.api.payment_threads import PaymentThreads
from node.api.queued_job import QueuedJob, held_and_queued, queue
from node.api.receipt_issuer import ReceiptIssuer
from node.api.schemas import ChatCompletionRequest, CompletionRequest
from node.api.shared_budget import SharedCounts
from node.api.structured import checked_constraint, render_messages
from node.catalog import AdapterCatalog, ServedAdapter
from node.db.loss import LossReason
from node.engine.grammar import GrammarSpec
from node.engine.sequence import RequestOutput
from node.errors import NodeError, Unavailable
from node.payment.service import Hold, PaymentService, Replay, Usage
from node.payment.x402 import replay as x402_replay
from node.payment.x402.service import X402Payments, X402Voucher
from node.payment.x402.terms import Offer
from node.payment.x402.wire import PAYMENT_RESPONSE_HEADER
from node.protocol.receipt import output_text

log = logging.getLogger(__name__)
INLINE_TOKENIZE_CHARS = 8_192  # shorter prompts are rendered and tokenized on the event loop (num_render_chars)


class GenerationService:
    def __init__(self, engine: EngineClient, payments: PaymentService, issuer: ReceiptIssuer, catalog: AdapterCatalog,
                 metrics: APIMetrics, default_max_tokens: int = 256, offer: Offer | None = None,
                 x402: X402Payments | None = None, shared: SharedCounts | None = None) -> None:
        self.engine, self.payments, self.catalog, self.metrics = engine, payments, catalog, metrics
        self.offer, self.x402 = offer, x402  # with an offer, an unpaid request gets a 402 naming both schemes
        self.issuer, self.default_max_tokens = issuer, default_max_tokens
        self.max_generation_s = payments.max_generation_s
        self._closing: set[asyncio.Future[None]] = set()  # charges of streams read too slowly, running
        self.gate = PaymentGate(payments, catalog.provider, offer, x402, shared)  # before the hold: payment_gate.py
        self.threads = PaymentThreads()  # holds and charges never queue behind free work (tokenizing)

    async def handle(self, kind: Kind, req: CompletionRequest | ChatCompletionRequest, body: bytes,
                     payment: str | None, http: Request, x402: str | None = None,
                     read: str | None = None) -> JSONResponse | StreamingResponse:
        presented = self.gate.present(payment, body, x402)
        adapter = await self.catalog.resolve_async(req.model)
        template = await self._chat_template(adapter, self.gate.caller(presented)) if kind == "chat" else None
        prompt_ids = await self._tokenize(kind, req, template)
        max_tokens, max_fee = self._ceiling(req, len(prompt_ids), adapter)
        constraint = await checked_constraint(req, self.engine.tokenizing) \
            if isinstance(req, ChatCompletionRequest) else None
        params = sampling_params(req, max_tokens, constraint.spec if constraint else None)
        self.engine.check_vocabulary(params)
        pricing = self.payments.pricing_for(adapter.is_base)
        x402_checked = self.gate.x402_payment(presented, str(http.url), max_fee)
        ticket = self.gate.hang_up_ticket(presented)  # 429 here for a payer whose hang-ups spent its budget
        hold = functools.partial(self.gate.hold, presented.voucher, x402_checked, max_fee, pricing, str(http.url),
                                 read, body)
        job_of = functools.partial(Job.of, kind, req, adapter, prompt_ids, params, held_at=time.monotonic(),
                                   ticket=ticket)
        admission = self.engine.admission()
        admission.__enter__()
        held: Hold | Replay | QueuedJob
        try:
            if req.stream or constraint is not None:  # a grammar is compiled once the hold stands (self._compile)
                held = await self.threads.run(hold)
                if constraint is not None and isinstance(held, Hold):
                    await self._compile(constraint.spec, constraint.param, held)
                    if not req.stream:
                        held = queue(held, job_of, self.engine, self.payments, asyncio.get_running_loop())
            else:  # a plain request is queued on its hold's thread (node/api/queued_job.py)
                held = await held_and_queued(hold, job_of, self.engine, self.payments, self.threads.executor)
        except BaseException:
            admission.__exit__(None, None, None)
            ticket.done()
            raise
        if isinstance(held, Replay):
            admission.__exit__(None, None, None)
            ticket.done()
            return replay_response(held, req.stream)
        if isinstance(held, Hold):
            leave = once(lambda: admission.__exit__(None, None, None))
            return StreamingResponse(self._sse(job_of(held), leave), media_type="text/event-stream",
                                     headers={"Cache-Control": "no-cache"})
        try:
            return await self._complete(held, http)
        finally:
            admission.__exit__(None, None, None)
            ticket.done()

    async def _compile(self, spec: GrammarSpec, param: str, hold: Hold) -> None:
        """Compile the answer's grammar once the request's payment holds (a caller that cannot pay never
        makes the node compile: a compile, once started, runs to its end); one that fails (400) or is
        cut releases the hold, and the voucher may be sent again."""
        try:
            await self.engine.compile_grammar(spec, param)
        except BaseException:
            await asyncio.shield(self.threads.start(self.payments.cancel, hold))
            raise

    async def quote(self, kind: Kind, req: CompletionRequest | ChatCompletionRequest,
                    payer: str | None = None) -> tuple[int, int, int]:
        """(prompt tokens, max_tokens, max fee) of this request: exactly what `handle` would hold, so a
        voucher for `chargedTotal + max fee` covers it (POST /v1/quote/...). `payer`: who asks, if said."""
        adapter = await self.catalog.resolve_async(req.model)
        template = await self._chat_template(adapter, self.gate.quote_caller(payer)) if kind == "chat" else None
        num_prompt_tokens = len(await self._tokenize(kind, req, template))
        return (num_prompt_tokens, *self._ceiling(req, num_prompt_tokens, adapter))

    def _ceiling(self, req: CompletionRequest | ChatCompletionRequest, num_prompt_tokens: int,
                 adapter: ServedAdapter) -> tuple[int, int]:
        """(max_tokens, the most the request can cost): what the hold is sized by."""
        limit = req.completion_limit if isinstance(req, ChatCompletionRequest) else req.max_tokens
        max_tokens = self.engine.completion_budget(num_prompt_tokens, limit, self.default_max_tokens)
        pricing = self.payments.pricing_for(adapter.is_base)
        return max_tokens, pricing.max_fee(num_prompt_tokens, max_tokens, req.num_choices)

    async def _chat_template(self, adapter: ServedAdapter, caller: Caller | None) -> str | None:
        """The adapter's own chat template, once its files are fetched and verified (a load that fails
        refuses the request here, before any hold); None: the base model's template applies. A load
        not in host memory yet waits for the gate's cold loads (node/api/cold_load.py)."""
        name = adapter.engine_adapter
        if name is None:
            return None
        await self.gate.admit(name, caller)
        await asyncio.wrap_future(self.catalog.provider.prefetch(name))
        return self.catalog.provider.chat_template(name)

    async def _tokenize(self, kind: Kind, req: CompletionRequest | ChatCompletionRequest,
                        template: str | None = None) -> list[int]:
        """The prompt's ids; a long prompt (its text, or its many chat messages: `num_render_chars`), or one
        rendered with an adapter's own chat template (untrusted code, however sandboxed), is rendered and
        tokenized off the event loop (a short one costs less than the thread hop), on the tokenizing threads,
        so nobody's huge prompt or slow template stalls everyone else's requests nor queues in front of their
        holds and charges."""
        if template is None and req.num_render_chars <= INLINE_TOKENIZE_CHARS:
            return self._prompt_ids(kind, req, template)
        return await asyncio.get_running_loop().run_in_executor(self.engine.tokenizing, self._prompt_ids, kind, req,
                                                                template)

    def _prompt_ids(self, kind: Kind, req: CompletionRequest | ChatCompletionRequest,
                    template: str | None = None) -> list[int]:
        if isinstance(req, ChatCompletionRequest):
            tools = [t.model_dump(exclude_none=True) for t in req.tools or []] if req.calls_tools else None
            return self.engine.encode_chat(render_messages(req.messages), template, tools)
        return self.engine.encode_completion(req.prompt)

    # --- plain --------------------------------------------------------------------------------------
    async def _complete(self, queued: QueuedJob, http: Request) -> JSONResponse:
        """Nothing leaves the node before the charge commits: whatever fails first releases the hold."""
        started, job = time.monotonic(), queued.job
        try:
            finals, endings = await self._generate(job, queued.waiting, http)
            generated = sum(f.num_completion_tokens for f in finals)
            if generated == 0 and any(f.finish_reason == "abort" for f in finals):  # cut by the client or time
                if CLIENT_LEFT in endings:
                    job.ticket.hung_up()  # free, yet its compile or prefill ran: the hang-up budget pays
                raise Unavailable("the request was cut before it produced a token; nothing was charged")
            usage = Usage(len(job.prompt_ids), generated)
            choices = [ChoiceOutput(f.text, e, f.logprobs) for f, e in zip(finals, endings, strict=True)]
            total, body = await self.threads.run(self._charge, job, usage, choices)
        except BaseException:
            await asyncio.shield(self.threads.start(self.payments.cancel, job.hold))
            raise
        self._observe(job, usage, time.monotonic() - started, body)
        headers = {"X-Charged-Total": str(total), **self.gate.payment_headers(job.hold, total)}
        return FastJSONResponse(body, headers=headers)

    async def _generate(self, job: Job, waiting: list[asyncio.Future[RequestOutput]],
                        http: Request) -> tuple[list[RequestOutput], list[str]]:
        """Each queued choice's output and how it ended; a client that leaves, or the time limit, cuts them
        all short (the engine then reports what each had generated)."""
        cut = Cut(self.engine, job.choice_ids)
        timer = asyncio.get_running_loop().call_later(job.time_left(self.max_generation_s), cut, TIME_LIMIT)
        watcher = asyncio.ensure_future(_wait_disconnect(http))
        watcher.add_done_callback(lambda w: None if w.cancelled() or w.exception() else cut(CLIENT_LEFT))
        try:
            finals = list(await asyncio.gather(*waiting))
        except asyncio.CancelledError:  # the server is stopping: a node fault, nothing charged
            for request_id in job.choice_ids:
                self.engine.abort(request_id)
            raise
        finally:
            timer.cancel()
            watcher.cancel()
        endings = [cut.ending(final) for final in finals]
        return finals, endings

    def _charge(self, job: Job, usage: Usage, choices: list[ChoiceOutput]) -> tuple[int, dict[str, Any]]:
        digest, text = job.hold.checked.digest, output_text([c.text for c in choices])
        shape = job.shape(self.engine.token_text)
        voucher = job.hold.checked
        request = voucher.request if isinstance(voucher, X402Voucher) else None  # an x402 voucher names no body

        def stored(receipt: dict[str, Any]) -> dict[str, Any]:
            answer = shape.body(choices, usage, receipt)
            return answer if request is None else x402_replay.kept(answer, request)

        total, body = self.payments.finish(job.hold, usage,
                                           lambda fee: self.issuer.issue(digest, job.adapter, usage, fee, text),
                                           stored)
        self.gate.paid(voucher)  # a purchase: its cold loads were paid for
        return total, body if request is None else x402_replay.as_sent(body)

    # --- streamed -----------------------------------------------------------------------------------
    async def _sse(self, job: Job, leave: Callable[[], None]) -> AsyncIterator[bytes]:
        """The streamed answer; `leave` gives its place among the requests in flight back (once)."""
        started = time.monotonic()
        sent = Sent(len(job.prompt_ids), job.request.num_choices, holds_back=job.calls_tools)
        shape = job.shape(self.engine.token_text)
        try:
            if job.kind == "chat":
                yield event(shape.chunk([shape.delta(i, {"role": "assistant", "content": ""}, None)
                                         for i in range(sent.num_choices)]))
            cut, last_at = Cut(self.engine, job.choice_ids), dict[int, float]()
            loop = asyncio.get_running_loop()
            timer = loop.call_later(job.time_left(self.max_generation_s), cut, TIME_LIMIT)
            closer = loop.call_later(job.time_left(self.payments.max_delivery_s), self._close, job, sent, leave)
            deltas = self.engine.stream_choices(job.prompt_ids, job.choice_params, job.adapter.engine_adapter,
                                                job.choice_ids)
            try:
                async with contextlib.aclosing(deltas):
                    async for index, delta in deltas:
                        if sent.is_closed:
                            break
                        if delta.finish_reason is not None:
                            sent.endings[index] = cut.ending(delta)
                        was_sent, offset = sent.is_sent, sent.add(index, delta)
                        if (delta.text or delta.logprobs) and not job.calls_tools:  # calls go out whole, at the end
                            self.metrics.chunk_sent(started, was_sent, last_at, index)
                            yield event(shape.chunk([shape.delta(index, delta.text, None,
                                                                 shape.logprobs(delta.logprobs, offset))]))
                        if sent.is_done:
                            yield await self._last_event(job, sent, shape, started)
                            yield b"data: [DONE]\n\n"
                            return
            finally:
                timer.cancel()
                closer.cancel()
            if sent.is_closed:
                yield event({"error": {"message": "the stream was read too slowly: it ends where the hold's time ran "
                                                  "out, charged for what was sent", "code": "stream_read_too_slowly",
                                       "type": "server_error"}})
        except Exception as exc:  # the node's fault, whatever it raised (a hang-up is GeneratorExit or a cancel)
            fault = as_fault(exc, job.response_id)
            await self.threads.run(self._end_unpaid, job, sent, LossReason.NODE_FAULT, fault)
            yield event({"error": {"message": fault.message, "code": fault.code, "type": "server_error"}})
        finally:
            if not sent.is_done:  # a fault or a hang-up: the choices still running stop now
                for request_id in job.choice_ids:
                    self.engine.abort(request_id)
            if not sent.is_settled:  # the client hung up (or the server is stopping) mid-stream
                await asyncio.shield(self.threads.start(self._settle_hang_up, job, sent, not sent.is_closed))
            leave()
            job.ticket.done()

    async def _last_event(self, job: Job, sent: Sent, shape: ResponseShape, started: float) -> bytes:
        """Charge for the stream; the last chunk carries every choice's finish reason, the usage and the
        receipt. A charge that cannot be committed after tokens left is a loss (raised on as the stream's
        error). One the time limit cut before a token is charged nothing, as unstreamed (raised as a fault); one
        cut after tokens that spelled no text (special tokens) is charged them, as unstreamed."""
        if sent.is_cut and not sent.is_owed and not any(sent.tokens):
            raise Unavailable("the request was cut before it produced a token; nothing was charged")
        try:
            body = await self.threads.run(self._charge_stream, job, sent)
        except NodeError as exc:
            await self.threads.run(self._end_unpaid, job, sent, LossReason.DELIVERED_UNCHARGED, exc)
            raise
        self._observe(job, sent.usage, time.monotonic() - started, body)
        last = shape.chunk([shape.delta(c["index"], shape.final_delta(c), c["finish_reason"]) for c in body["choices"]])
        last.update(usage=body["usage"], receipt=body["receipt"])
        if x402 := self.gate.payment_headers(job.hold, int(body["receipt"]["chargedTotal"])):
            last["payment_response"] = x402[PAYMENT_RESPONSE_HEADER]
        return event(last)

    def _close(self, job: Job, sent: Sent, leave: Callable[[], None]) -> None:
        """The hold's time is nearly up and the stream is still being read (a slow reader, the tokens
        queued for it): charge now, while the hold still can be, for what was handed to the client; the
        stream sends nothing more, and its place in flight goes to others (its reader may never read). A
        stream charged already and stuck on a reader that stopped gives its place back too."""
        if sent.is_settled:
            leave()
            return
        sent.is_closed = True
        for request_id in job.choice_ids:
            self.engine.abort(request_id)
        leave()  # the engine's part is over; the charge is the database's
        task = self.threads.start(self._settle_hang_up, job, sent, False)
        self._closing.add(task)
        task.add_done_callback(self._closing.discard)

    def _charge_stream(self, job: Job, sent: Sent) -> dict[str, Any]:
        with sent.lock:
            if sent.is_settled:  # the hang-up's settling came first (its thread may start before this one)
                raise Unavailable("the stream ended while it was being charged")
            _total, body = self._charge(job, sent.usage, sent.choices(job.params.logprobs is not None, CLIENT_LEFT))
            sent.is_settled = True
            return body

    def _end_unpaid(self, job: Job, sent: Sent, reason: LossReason, exc: NodeError) -> None:
        """No charge: release the hold if no token left the node, else spend the voucher with a loss."""
        with sent.lock:
            if not self._settling(job, sent, sent.is_sent):
                return
            self._observe_loss(job, sent.usage, reason)
            self.payments.write_off(job.hold, sent.usage, reason, f"{exc.code}: {exc.message}")

    def _settling(self, job: Job, sent: Sent, is_owed: bool) -> bool:
        """Under `sent.lock`: take the stream's one settling. False when there is nothing left to do: it
        was settled already, or nothing is owed (then the hold is released here)."""
        if sent.is_settled:
            return False
        sent.is_settled = True
        if not is_owed:
            self.payments.cancel(job.hold)
            return False
        return True

    def _settle_hang_up(self, job: Job, sent: Sent, client_left: bool) -> None:
        """The client left mid-stream: charge what was generated and sent, and store it as the answer
        (a loss if that charge cannot be committed); release the hold if nothing was sent (a hang-up's
        release spends from its payer's hang-up budget: node/api/hang_up_budget.py)."""
        with sent.lock:
            is_free = client_left and not sent.is_settled and not sent.is_owed
            if not self._settling(job, sent, sent.is_owed):
                if is_free:
                    job.ticket.hung_up()
                return
            try:
                self._charge(job, sent.usage, sent.choices(job.params.logprobs is not None, CLIENT_LEFT))
            except NodeError as exc:
                self._observe_loss(job, sent.usage, LossReason.DELIVERED_UNCHARGED)
                self.payments.write_off(job.hold, sent.usage, LossReason.DELIVERED_UNCHARGED,
                                        f"{exc.code}: {exc.message}")
                return
        log.info("stream %s: ended early (the client left, or read past the hold) after %d tokens, charged for "
                 "them", job.response_id, sent.usage.completion_tokens)

    def _observe(self, job: Job, usage: Usage, seconds: float, body: dict[str, Any]) -> None:
        self.metrics.latency.labels(route=job.kind).observe(seconds)
        self.metrics.answered(job.adapter.model, usage.prompt_tokens, usage.completion_tokens,
                              int(body["receipt"]["fee"]))

    def _observe_loss(self, job: Job, usage: Usage, reason: LossReason) -> None:
        """What `PaymentService.write_off` records as lost (counted even when the database refuses it)."""
        fee = job.hold.pricing.fee(usage.prompt_tokens, usage.completion_tokens)
        self.metrics.lost(job.adapter.model, usage.completion_tokens, min(fee, job.hold.reservation.max_fee),
                          reason.value)


async def _wait_disconnect(http: Request) -> None:
    while True:
        message = await http.receive()
        if message["type"] == "http.disconnect":
            return
