"""The engine core: `LLMEngine`'s step loop in a process of its own, talking msgpack over ZeroMQ.

    API process                                   engine core i  (python -m node.engine.core_process)
    PUSH --connect--> ipc://RUN/core-i.in  (PULL, bound by the core)   AddRequest, AbortRequest, adapters
    PULL <--connect-- ipc://RUN/engine.out (bound by the API; every core PUSHes to it)  Ready, Outputs, Metrics

One thread does everything, in the order nano-vllm's loop does: take every message waiting on the
socket, run one engine step, send that step's outputs as one frame. An idle core blocks on the socket
(it wakes at least every `metrics_interval_s` to report its metrics, which are its heartbeat, and to
notice that the API that started it is gone, then it exits). A frame that is not a message, or a
message that cannot be applied (a second AddRequest for a request running here, an adapter the store
refuses), is refused alone and counted (`Metrics.num_refused`); the core goes on. Detokenization and
stop strings stay in the core (the API only turns token ids of prompts into text of answers it
already has). The spec (engine and store configs) comes once, on stdin, at start.
"""

from __future__ import annotations

import collections
import dataclasses
import functools
import logging
import os
import pickle
import sys
import time
from concurrent.futures import Future
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
import zmq

from node.engine import wire
from node.engine.config import EngineConfig
from node.engine.llm_engine import LLMEngine
from node.engine.sequence import RequestOutput
from node.engine.stats import device_tier, engine_stats
from node.errors import AdapterError, AdapterSourceError, BadRequest, NodeError, TensorParallelError
from node.lora.adapter import LoRATargetSpec, LoRAWeights, load_lora_adapter
from node.lora.manager import AdapterAction
from node.lora.provider import AdapterSource
from node.lora.store import AdapterStore, StoreConfig
from node.models.config import ModelConfig

log = logging.getLogger(__name__)
TENSOR_PARALLEL_EXIT = 75  # a tensor-parallel rank died: the supervisor starts the core (and its group) again
LOAD_POLL_MS = 5  # how often an idle core looks for finished adapter loads


@dataclass(frozen=True)
class CoreSpec:
    """Everything a core needs to start, as plain values."""

    engine: EngineConfig
    run_dir: str  # the folder of the ipc sockets
    store: StoreConfig | None = None  # None: adapters are local folders registered by path (tests)
    num_threads: int | None = None  # torch intra-op threads; None: torch's default
    metrics_interval_s: float = 1.0


def input_endpoint(run_dir: str, core: int) -> str:
    return f"ipc://{run_dir}/core-{core}.in"


def output_endpoint(run_dir: str) -> str:
    return f"ipc://{run_dir}/engine.out"


def start_error_file(run_dir: str, core: int) -> Path:
    """Where a core that cannot start writes why (the model, its split, its settings), for the API to say."""
    return Path(run_dir) / f"core-{core}.start-error"


def core_engine_config(config: EngineConfig, core: int, num_cores: int) -> EngineConfig:
    """Core `core`'s engine config: with data parallelism on CUDA, its own devices (one per
    tensor-parallel rank, from cuda:core * tensor_parallel_size)."""
    if num_cores > 1 and config.device == "cuda":
        return dataclasses.replace(config, device=f"cuda:{core * config.tensor_parallel_size}")
    return config


def adapter_store(store: StoreConfig, config: EngineConfig) -> AdapterStore[LoRAWeights]:
    """The tiered adapter store for this base model (parse: a validated PEFT folder)."""
    model = ModelConfig.from_folder(config.model_path)
    target = LoRATargetSpec.of(model.num_layers, model.module_shapes(), model.fused_modules())
    parse = functools.partial(load_lora_adapter, target=target, max_rank=config.max_lora_rank,
                              pin_memory=config.device.startswith("cuda"))  # read into what the copy reads
    return AdapterStore(store, parse, lambda w: w.nbytes)


class EngineCore:
    def __init__(self, spec: CoreSpec, core: int, incarnation: int) -> None:
        self.spec, self.core, self.incarnation = spec, core, incarnation
        if spec.num_threads:
            torch.set_num_threads(spec.num_threads)
        self.store = adapter_store(spec.store, spec.engine) if spec.store is not None else None
        self.engine = LLMEngine(spec.engine, provider=self.store)
        self.codec = wire.core_codec()
        self.context = zmq.Context()
        self.inbox = self.context.socket(zmq.PULL)
        self.inbox.setsockopt(zmq.MAXMSGSIZE, wire.MAX_FRAME_BYTES)
        self.inbox.bind(input_endpoint(spec.run_dir, core))
        self.outbox = self.context.socket(zmq.PUSH)
        self.outbox.setsockopt(zmq.LINGER, 1000)
        self.outbox.connect(output_endpoint(spec.run_dir))
        self.deltas: list[object] = []
        self.finished: list[RequestOutput] = []
        # answers to prefetches and adapter controls, appended by the threads that finish them
        self.answers: collections.deque[wire.AdapterLoaded | wire.AdapterControlled] = collections.deque()
        self.num_due = 0  # prefetches and controls asked for and not answered yet
        self.report_id = 0  # the last ReportMetrics read: answered with Metrics at once
        self.metrics_due = False
        self.num_refused = 0  # frames dropped: malformed, or messages that could not be applied
        self.live: set[str] = set()  # request ids running here
        self._parent = os.getppid()
        self._stop = False
        self.exit_code = 0

    def run(self) -> None:
        self._send(wire.Ready(self.core, self.incarnation, os.getpid(), self.engine.max_model_len))
        next_metrics = time.monotonic()
        while not self._stop:
            busy = self.engine.has_unfinished()
            wait_ms = 0 if busy else max(0, int((next_metrics - time.monotonic()) * 1000))
            if self.num_due:  # a load finishes on a store thread: look for its answer often
                wait_ms = min(wait_ms, LOAD_POLL_MS)
            if self.inbox.poll(wait_ms):
                self._receive_all()
            if self.engine.has_unfinished():
                self._step()
            self._flush()
            if self.metrics_due or time.monotonic() >= next_metrics:
                self.metrics_due = False
                if os.getppid() != self._parent:
                    log.warning("engine core %d: the API process is gone; exiting", self.core)
                    return
                self._send_metrics()
                next_metrics = time.monotonic() + self.spec.metrics_interval_s

    def _step(self) -> None:
        try:
            self.engine.step()
        except TensorParallelError as e:  # a rank died: fail the batch, then exit to be started again
            log.error("engine core %d: %s; exiting so that the supervisor starts it again", self.core, e.message)
            self.engine.fail_all(e)
            self._stop, self.exit_code = True, TENSOR_PARALLEL_EXIT
        except Exception:  # the batch fails, the core goes on (as the in-process loop does)
            log.exception("engine core %d: step failed; failing its requests", self.core)
            self.engine.fail_all()

    def _flush(self) -> None:
        """Send what the step (or a refused request) produced, as one frame; and the loads finished."""
        while self.answers:
            self.num_due -= 1
            self._send(self.answers.popleft())
        if self.deltas or self.finished:  # the engine's callbacks hold these lists: copy, then clear
            deltas, finished = self.deltas[:], self.finished[:]
            self.deltas.clear()
            self.finished.clear()
            for output in (*deltas, *finished):
                if output.finish_reason is not None:  # type: ignore[attr-defined]
                    self.live.discard(output.request_id)  # type: ignore[attr-defined]
            self._send(wire.Outputs(self.core, self.incarnation, deltas, finished))  # type: ignore[arg-type]

    def _receive_all(self) -> None:
        while True:
            try:
                frame = self.inbox.recv(zmq.NOBLOCK, copy=False)
            except zmq.Again:
                return
            try:
                message = self.codec.decode(frame.buffer)
            except wire.MalformedMessage as e:
                self._refuse(f"a malformed frame of {len(frame.buffer)} bytes ({e})")
                continue
            try:
                self._handle(message)
            except Exception as e:  # a message that decodes but cannot be applied: it alone is refused
                self._refuse(f"{type(message).__name__}: {type(e).__name__}: {e}"[:300])

    def _refuse(self, what: str) -> None:
        self.num_refused += 1
        log.warning("engine core %d: refused %s", self.core, what)

    def _handle(self, message: wire.ToCore) -> None:
        match message:
            case wire.AddRequest(request_id) if request_id in self.live:
                self._refuse(f"a second AddRequest for {request_id}, which is running here")
            case wire.AddRequest():
                self._add(message)
            case wire.AbortRequest(request_id):
                self.engine.abort(request_id)
            case wire.RegisterAdapter(adapter_id, uri, sha256, is_pinned):
                self.engine.adapters.register(adapter_id, AdapterSource(uri, sha256, is_pinned))
            case wire.RemoveAdapter(adapter_id):
                self.engine.remove_adapter(adapter_id)
            case wire.PrefetchAdapter(adapter_id):
                self._prefetch(adapter_id)
            case wire.ControlAdapter(adapter_id, action, control_id):
                self._control(adapter_id, action, control_id)
            case wire.ReportMetrics(report_id):
                self.report_id, self.metrics_due = max(self.report_id, report_id), True
            case wire.Shutdown():
                self._stop = True

    def _prefetch(self, adapter_id: str) -> None:
        """Load an adapter into host memory and answer with its chat template or its error."""
        self.num_due += 1
        try:
            future = self.engine.adapters.prefetch(adapter_id)
        except NodeError as e:
            self.answers.append(wire.AdapterLoaded(self.core, self.incarnation, adapter_id, None, e))
            return
        future.add_done_callback(lambda f: self.answers.append(self._loaded(adapter_id, f)))

    def _control(self, adapter_id: str, action: AdapterAction, control_id: int) -> None:
        """Pin, unpin, preload or evict, and answer once it took effect (or with why it was refused)."""
        self.num_due += 1

        def answer(future: Future[None]) -> None:
            error = _error_of(future, adapter_id)
            self.answers.append(wire.AdapterControlled(self.core, self.incarnation, control_id, error))

        self.engine.control_adapter(adapter_id, action).add_done_callback(answer)

    def _loaded(self, adapter_id: str, future: Future[object]) -> wire.AdapterLoaded:
        """The answer to a prefetch (on the store's thread: it only builds the message)."""
        error = _error_of(future, adapter_id)
        template = self.engine.adapters.chat_template(adapter_id) if error is None else None
        return wire.AdapterLoaded(self.core, self.incarnation, adapter_id, template, error)

    def _add(self, m: wire.AddRequest) -> None:
        if m.incarnation != self.incarnation:  # meant for the core this one replaces: already failed there
            return
        self.live.add(m.request_id)
        try:
            if m.is_streamed:
                self.engine.add_request(m.prompt_token_ids, m.params, m.adapter_id, m.request_id,
                                        listener=self.deltas.append, prefix_key=m.prefix_key)
            else:
                self.engine.add_request(m.prompt_token_ids, m.params, m.adapter_id, m.request_id,
                                        waiter=self.finished.append, prefix_key=m.prefix_key)
        except Exception as e:  # refused before it ran: it ends here, with the engine's reason
            error = e if isinstance(e, NodeError) else BadRequest(f"the engine core refused the request: "
                                                                  f"{type(e).__name__}", request_id=m.request_id)
            n = len(m.prompt_token_ids)
            self.finished.append(RequestOutput(m.request_id, [], [], "", "error", n, 0, m.adapter_id, error))

    def _send_metrics(self) -> None:
        tiers: dict[str, dict[str, float]] = {}
        if self.store is not None:
            for tier, stats in self.store.metrics().as_dict().items():
                if isinstance(stats, dict):
                    tiers[tier] = {k: float(v) for k, v in stats.items() if isinstance(v, int | float)}
        tiers["device"] = device_tier(self.engine)
        scheduler = self.engine.scheduler
        self._send(wire.Metrics(self.core, self.incarnation, len(scheduler.running), len(scheduler.waiting), tiers,
                                engine_stats(self.engine), self.num_refused, self.report_id))

    def _send(self, message: wire.FromCore) -> None:
        self.outbox.send(self.codec.encode(message), copy=False)

    def close(self) -> None:
        self.engine.runner.close()
        if self.store is not None:
            self.store.close()
        self.inbox.close(linger=0)
        self.outbox.close()
        self.context.term()


def _error_of(future: Future[Any], adapter_id: str) -> NodeError | None:
    """What a finished load or control answers: None, or its error as a NodeError (which crosses the wire)."""
    if future.cancelled():
        return AdapterSourceError("the load was cancelled", adapter=adapter_id)
    e = future.exception()
    if e is None or isinstance(e, NodeError):
        return e
    return AdapterError(f"{type(e).__name__}: {e}", adapter=adapter_id)


def main() -> None:
    """`python -m node.engine.core_process CORE INCARNATION` with the pickled CoreSpec on stdin (from the
    API process that starts it, never from a socket)."""
    core, incarnation = int(sys.argv[1]), int(sys.argv[2])
    spec: CoreSpec = pickle.loads(sys.stdin.buffer.read())
    logging.basicConfig(level=os.environ.get("LORANODE_LOG_LEVEL", "INFO"),
                        format=f"%(asctime)s core-{core} %(levelname)s %(name)s: %(message)s")
    Path(spec.run_dir).mkdir(parents=True, exist_ok=True)
    try:
        engine_core = EngineCore(spec, core, incarnation)
    except NodeError as e:
        start_error_file(spec.run_dir, core).write_text(e.message)
        raise
    try:
        engine_core.run()
    finally:
        engine_core.close()
    sys.exit(engine_core.exit_code)


if __name__ == "__main__":
    main()
