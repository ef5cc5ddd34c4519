"""The engine in other processes, with the request API of `LLMEngine` (add_request, abort, stream, generate).

`CoreClient` starts `num_cores` engine cores (`core_process.py`, watched by `CoreSupervisor`), sends
each request to one of them (`CoreRouter`: balanced by queued tokens, kept on a core where its adapter
is warm unless that costs more than a cold load) and hands the outputs
back to the request's listener or waiter from one receiver thread, as the in-process engine does from
its step thread. Adapters are registered with every core (`adapters`); a core that starts again gets
them all again before it serves.

A core that dies fails its requests in flight with `Unavailable` (finish reason "error": a node
fault, for the API's money rules); while no core is up, new requests fail at once the same way. A
core that stops reading (a stalled step) never blocks the caller: frames queue in ZeroMQ up to
`MAX_QUEUED_FRAMES`, then requests are refused with `Overloaded`; once it has been silent for
`stall_timeout_s` the supervisor kills it, and it fails its requests and restarts as a core that died.
"""

from __future__ import annotations

import contextlib
import itertools
import logging
import shutil
import tempfile
import threading
from collections.abc import AsyncIterator
from concurrent.futures import Future
from dataclasses import dataclass

import zmq
from transformers import AutoTokenizer, PreTrainedTokenizerBase

from node.engine import wire
from node.engine.config import EngineConfig
from node.engine.core_adapters import CoreAdapters
from node.engine.core_controls import CoreControls
from node.engine.core_metrics import CoreMetrics
from node.engine.core_process import CoreSpec, core_engine_config, input_endpoint, output_endpoint
from node.engine.core_router import CoreRouter
from node.engine.core_supervisor import CoreSupervisor
from node.engine.delta_stream import stream_deltas
from node.engine.grammar import GrammarCompiler
from node.engine.llm_engine import Listener, Waiter, eos_token_ids, max_model_len
from node.engine.sampling import SamplingParams, check_vocabulary
from node.engine.sequence import RequestOutput, StreamDelta
from node.errors import BadRequest, NodeError, Overloaded, Unavailable
from node.lora.manager import AdapterAction
from node.lora.store_config import StoreConfig
from node.models.config import ModelConfig

log = logging.getLogger(__name__)
MAX_QUEUED_FRAMES = 100_000  # per core, waiting for it to read them


@dataclass
class _Pending:
    core: int
    num_prompt_tokens: int
    adapter_id: str | None
    listener: Listener | None
    waiter: Waiter | None
    work: int  # queued tokens it counts for on its core (prompt + max_tokens)
    prefix_key: str | None = None
    num_completion_tokens: int = 0


class CoreClient:
    def __init__(self, config: EngineConfig, num_cores: int = 1, store: StoreConfig | None = None,
                 num_threads: int | None = None, start_timeout_s: float = 600.0,
                 stall_timeout_s: float = 60.0) -> None:
        self.config = config
        self.model_config = ModelConfig.from_folder(config.model_path)
        self.max_model_len = max_model_len(config, self.model_config)
        self.tokenizer: PreTrainedTokenizerBase = AutoTokenizer.from_pretrained(str(config.model_path))
        # the API checks a grammar compiles before it holds any money (the cores compile their own)
        self.grammars = GrammarCompiler(self.tokenizer, self.model_config.vocab_size,
                                        sorted(eos_token_ids(self.model_config, self.tokenizer)))
        self.num_cores, self.start_timeout_s = num_cores, start_timeout_s
        self.run_dir = tempfile.mkdtemp(prefix="loranode-engine-")
        specs = [CoreSpec(core_engine_config(config, i, num_cores), self.run_dir, store, num_threads)
                 for i in range(num_cores)]
        self.supervisor = CoreSupervisor(specs, self._on_exit, stall_timeout_s)
        self.router = CoreRouter(num_cores, warm_capacity=config.max_adapter_slots)
        for core in range(num_cores):
            self.router.set_up(core, False)
        self.adapters = CoreAdapters(self, validates_hash=store is not None,
                                     retry_after_s=store.retry_after_s if store is not None else 0.0)
        self.metrics = CoreMetrics()  # the cores' last reports
        self.num_refused = 0  # malformed frames the receiver dropped
        self.num_routed = [0] * num_cores  # requests sent to each core
        self._codec = wire.api_codec()
        self._context = zmq.Context()
        self._inbox = self._context.socket(zmq.PULL)
        self._inbox.setsockopt(zmq.MAXMSGSIZE, wire.MAX_FRAME_BYTES)
        self._inbox.bind(output_endpoint(self.run_dir))
        self._outboxes = []
        for core in range(num_cores):
            out = self._context.socket(zmq.PUSH)
            out.setsockopt(zmq.SNDHWM, MAX_QUEUED_FRAMES)
            out.setsockopt(zmq.LINGER, 0)
            out.connect(input_endpoint(self.run_dir, core))
            self._outboxes.append(out)
        self._send_locks = [threading.Lock() for _ in range(num_cores)]
        self._lock = threading.Lock()  # router, pending
        self._pending: dict[str, _Pending] = {}
        self._controls = CoreControls()  # operator actions awaiting the cores' answers
        self._ids = itertools.count()
        self._receiver: threading.Thread | None = None
        self._stopping = threading.Event()
        self._started = False

    @property
    def provider(self) -> CoreAdapters:
        return self.adapters

    # --- processes ---------------------------------------------------------------------------------
    def start(self) -> None:
        """Start the cores and wait until each is ready (idempotent)."""
        with self._lock:
            if self._started:
                return
            self._started = True
        self._receiver = threading.Thread(target=self._receive_loop, name="engine-core-receiver", daemon=True)
        self._receiver.start()
        self.supervisor.start(self.start_timeout_s)

    def shutdown(self) -> None:
        if self._stopping.is_set():
            return
        self._stopping.set()
        for core in range(self.num_cores):
            with contextlib.suppress(zmq.ZMQError):
                self._send(core, wire.Shutdown())
        self.supervisor.stop()
        self._fail_pending(None, "the engine is shutting down")
        for core in range(self.num_cores):
            self._controls.answer_all(core, Unavailable("the engine is shutting down"))
        if self._receiver is not None:
            self._receiver.join(timeout=5)
        for out in self._outboxes:
            out.close(linger=0)
        self._inbox.close(linger=0)
        self._context.term()
        shutil.rmtree(self.run_dir, ignore_errors=True)

    def pids(self) -> list[int | None]:
        """Each core's process id (None while it is being started again)."""
        return self.supervisor.pids()

    def refresh_metrics(self, timeout_s: float = 1.0) -> None:
        """Have every core up report its figures now, and wait (up to `timeout_s`) until each has: what a
        scrape reads then (`metrics`) counts every request answered before it. A core that does not answer
        in time (a stalled step) leaves its last report."""
        report_id = self.metrics.next_report_id()
        up = self.broadcast(wire.ReportMetrics(report_id))
        self.metrics.wait(report_id, up, lambda core: self.router.is_up[core], timeout_s)

    @property
    def num_up(self) -> int:
        with self._lock:
            return sum(self.router.is_up)

    def _on_exit(self, core: int, why: str) -> None:
        self.metrics.forget(core)
        self._fail_pending(core, f"the engine core {why} during the request")
        self.adapters.core_exited(core)
        self._controls.answer_all(core, Unavailable(f"the engine core {why} before the adapter action took effect"))

    def _fail_pending(self, core: int | None, why: str) -> None:
        with self._lock:
            if core is not None:
                self.router.set_up(core, False)
            gone = [(rid, p) for rid, p in self._pending.items() if core is None or p.core == core]
            for rid, _ in gone:
                del self._pending[rid]
        for rid, p in gone:
            self._deliver_failure(rid, p, Unavailable(why))

    def _deliver_failure(self, rid: str, p: _Pending, error: NodeError) -> None:
        if p.listener is not None:
            p.listener(StreamDelta(rid, [], "", "error", p.num_prompt_tokens, p.num_completion_tokens, error))
        if p.waiter is not None:
            p.waiter(RequestOutput(rid, [], [], "", "error", p.num_prompt_tokens, p.num_completion_tokens,
                                   p.adapter_id, error))

    # --- requests ----------------------------------------------------------------------------------
    def check_vocabulary(self, params: SamplingParams) -> None:
        check_vocabulary(params, self.model_config.vocab_size)

    def add_request(self, prompt: str | list[int], params: SamplingParams, adapter_id: str | None = None,
                    request_id: str | None = None, listener: Listener | None = None,
                    waiter: Waiter | None = None, prefix_key: str | None = None) -> str:
        """Queue a request on a core (`CoreRouter.pick`: where its adapter is warm, within the bound on queued
        tokens; the choices of one prompt, given one `prefix_key`, on the core of the first, where they share
        its KV blocks)."""
        ids = list(self.tokenizer(prompt).input_ids) if isinstance(prompt, str) else list(prompt)
        if not ids:
            raise BadRequest("the prompt is empty")
        request_id = request_id or f"req-{next(self._ids)}"
        with self._lock:
            if request_id in self._pending:
                raise BadRequest("a request with this id is in flight", request_id=request_id)
            sibling = next((p.core for p in self._pending.values() if prefix_key and p.prefix_key == prefix_key), None)
            core = sibling if sibling is not None else self.router.pick(adapter_id)
            incarnation = self.supervisor.cores[core].incarnation
            work = len(ids) + params.max_tokens
            self.router.acquire(core, work, adapter_id)
            self.num_routed[core] += 1
            self._pending[request_id] = _Pending(core, len(ids), adapter_id, listener, waiter, work, prefix_key)
        try:
            self._send(core, wire.AddRequest(request_id, ids, params, adapter_id, listener is not None, incarnation,
                                             prefix_key))
        except zmq.Again:
            self._forget(request_id)
            raise Overloaded("the engine core is not taking requests (its queue is full); retry shortly",
                             core=core) from None
        return request_id

    def abort(self, request_id: str) -> None:
        with self._lock:
            p = self._pending.get(request_id)
        if p is not None:
            with contextlib.suppress(zmq.Again):  # a core that reads nothing fails with its requests
                self._send(p.core, wire.AbortRequest(request_id))

    def add_adapter(self, adapter_id: str, path: str) -> None:
        """Register a local PEFT folder with every core (an engine without an adapter store)."""
        from node.lora.provider import AdapterSource

        self.adapters.register(adapter_id, AdapterSource(uri=str(path), sha256=""))

    def remove_adapter(self, adapter_id: str) -> None:
        """Unregister an adapter everywhere; its requests still waiting or running finish with "abort"."""
        self.adapters.unregister(adapter_id)

    def forget_warm(self, adapter_id: str) -> None:
        """The adapter's weights are gone from every core (removed, or registered again from another source)."""
        with self._lock:
            self.router.forget(adapter_id)

    def _send(self, core: int, message: wire.ToCore) -> None:
        frame = self._codec.encode(message)
        with self._send_locks[core]:
            self._outboxes[core].send(frame, zmq.NOBLOCK, copy=False)

    def broadcast(self, message: wire.ToCore) -> list[int]:
        """To every core that is up (one being started again gets the adapters when it is ready); returns them."""
        with self._lock:
            up = [core for core in range(self.num_cores) if self.router.is_up[core]]
        for core in up:
            with contextlib.suppress(zmq.Again):
                self._send(core, message)
        return up

    def control_adapter(self, adapter_id: str, action: AdapterAction) -> Future[None]:
        """Pin, unpin, preload or evict on every core that is up; done once each has applied it, with the
        first refusal if one refused (a second pin that would leave no slot for traffic), Unavailable if
        none is up or one stopped first, Overloaded if one's queue is full."""
        control_id = next(self._ids)
        with self._lock:  # opened with the cores up now, so a core exiting after this answers for itself
            up = {core for core in range(self.num_cores) if self.router.is_up[core]}
            done = self._controls.open(control_id, up) if up else Future()
        if not up:
            done.set_exception(Unavailable("no engine core is running (restarting); retry shortly"))
            return done
        done.add_done_callback(lambda f: self.adapters.controlled(adapter_id, action, f))
        for core in sorted(up):
            try:
                self._send(core, wire.ControlAdapter(adapter_id, action, control_id))
            except zmq.Again:
                self._controls.answer(control_id, core, Overloaded(
                    "the engine core is not taking requests (its queue is full); retry shortly", core=core))
        return done

    def send_prefetch(self, adapter_id: str) -> int:
        """Ask the core its next request would go to to load it; returns that core. Unavailable if no core
        is up, Overloaded if its queue is full."""
        with self._lock:
            core = self.router.pick(adapter_id)
            self.router.warmed(core, adapter_id)
        try:
            self._send(core, wire.PrefetchAdapter(adapter_id))
        except zmq.Again:
            raise Overloaded("the engine core is not taking requests (its queue is full); retry shortly",
                             core=core) from None
        return core

    def _forget(self, request_id: str) -> _Pending | None:
        with self._lock:
            p = self._pending.pop(request_id, None)
            if p is not None and self.router.is_up[p.core]:
                self.router.release(p.core, p.work)
        return p

    # --- outputs -----------------------------------------------------------------------------------
    def _receive_loop(self) -> None:
        poller = zmq.Poller()
        poller.register(self._inbox, zmq.POLLIN)
        while not self._stopping.is_set():
            if not poller.poll(100):
                continue
            while True:
                try:
                    frame = self._inbox.recv(zmq.NOBLOCK, copy=False)
                except zmq.Again:
                    break
                try:
                    message = self._codec.decode(frame.buffer)
                except wire.MalformedMessage as e:
                    self.num_refused += 1
                    log.warning("refused a malformed frame of %d bytes from the engine socket (%s)",
                                len(frame.buffer), e)
                    continue
                try:
                    self._handle(message)
                except Exception:  # one message that cannot be applied must not end the receiver
                    self.num_refused += 1
                    log.exception("refused a %s from the engine socket", type(message).__name__)

    def _handle(self, message: wire.FromCore) -> None:
        if 0 <= message.core < self.num_cores:
            self.supervisor.heard(message.core, message.incarnation)
        if isinstance(message, wire.Ready):
            self._ready(message.core, message.incarnation, message.pid)
            return
        if not self._is_current(message.core, message.incarnation):
            return  # from a core's earlier incarnation (or no core): void
        match message:
            case wire.Outputs(deltas=deltas, finished=finished):
                for delta in deltas:
                    self._on_delta(delta)
                for output in finished:
                    self._on_finished(output)
            case wire.AdapterLoaded():
                self.adapters.loaded(message)
            case wire.AdapterControlled(core=core, control_id=control_id, error=error):
                self._controls.answer(control_id, core, error)
            case wire.Metrics():
                self.metrics.received(message)

    def _is_current(self, core: int, incarnation: int) -> bool:
        return 0 <= core < self.num_cores and self.supervisor.cores[core].incarnation == incarnation

    def _ready(self, core: int, incarnation: int, pid: int) -> None:
        if not 0 <= core < self.num_cores:
            return
        for adapter in self.adapters.registrations():  # before any request reaches it
            with contextlib.suppress(zmq.Again):
                self._send(core, adapter)
        for adapter_id in self.adapters.pins():  # the operator's pins, as the other cores hold them
            with contextlib.suppress(zmq.Again):
                self._send(core, wire.ControlAdapter(adapter_id, AdapterAction.PIN, next(self._ids)))
        with self._lock:
            if self.supervisor.ready(core, incarnation):
                self.router.set_up(core, True)
                log.info("engine core %d ready (pid %d)", core, pid)

    def _on_delta(self, delta: StreamDelta) -> None:
        if delta.finish_reason is not None:
            p = self._forget(delta.request_id)
        else:
            with self._lock:
                p = self._pending.get(delta.request_id)
        if p is None or p.listener is None:
            return
        p.num_completion_tokens = delta.num_completion_tokens
        p.listener(delta)

    def _on_finished(self, output: RequestOutput) -> None:
        p = self._forget(output.request_id)
        if p is None:
            return
        if p.waiter is not None:
            p.waiter(output)
        if p.listener is not None:  # a streamed request refused by the core before its first step
            p.listener(StreamDelta(output.request_id, [], "", output.finish_reason, output.num_prompt_tokens,
                                   output.num_completion_tokens, output.error))

    # --- conveniences with LLMEngine's signatures ---------------------------------------------------
    def generate(self, prompts: list[str | list[int]], params: SamplingParams | list[SamplingParams] | None = None,
                 adapter_ids: list[str | None] | None = None) -> list[RequestOutput]:
        """Run every prompt to completion on the cores; outputs in prompt order."""
        self.start()
        params_list = params if isinstance(params, list) else [params or SamplingParams()] * len(prompts)
        adapters = adapter_ids if adapter_ids is not None else [None] * len(prompts)
        outputs: list[Future[RequestOutput]] = [Future() for _ in prompts]
        for output, prompt, p, a in zip(outputs, prompts, params_list, adapters, strict=True):
            self.add_request(prompt, p, a, request_id=f"gen-{next(self._ids)}", waiter=output.set_result)
        return [output.result() for output in outputs]

    async def stream(self, prompt: str | list[int], params: SamplingParams | None = None,
                     adapter_id: str | None = None, request_id: str | None = None,
                     prefix_key: str | None = None) -> AsyncIterator[StreamDelta]:
        """Deltas as the core produces them; the last one has finish_reason."""
        rid = request_id or f"stream-{next(self._ids)}"
        async for delta in stream_deltas(self, prompt, params or SamplingParams(), adapter_id, rid, prefix_key):
            yield delta
