"""LLMEngine: the public API (generate, stream, abort, adapters) over the scheduler and model runner.

The step loop runs either in the caller's thread (`generate` with no background loop) or on one
background thread started by `start()` (what `stream()` callers and the API use). Requests and
aborts from other threads go through an inbox that the loop drains at the start of each step.
"""

from __future__ import annotations

import itertools
import logging
import threading
from collections.abc import AsyncIterator, Callable, Iterable
from concurrent.futures import Future
from pathlib import Path

import torch
from transformers import AutoTokenizer, PreTrainedTokenizerBase

from node.engine.block_manager import BlockManager, KVCacheStats
from node.engine.config import EngineConfig
from node.engine.delta_stream import stream_deltas
from node.engine.grammar import GrammarCompiler
from node.engine.inbox import Abort, DropAdapter, InboxMessage
from node.engine.logprob import TokenLogprob
from node.engine.model_runner import ModelRunner
from node.engine.output import OutputProcessor
from node.engine.sampler import SamplerOutput
from node.engine.sampling import SamplingParams, check_vocabulary
from node.engine.scheduler import ScheduledSeq, Scheduler
from node.engine.sequence import RequestOutput, Sequence, StreamDelta
from node.errors import AdapterError, AdapterNotFound, BadRequest, ConfigError, NodeError, Overloaded, PromptTooLong
from node.lora.adapter import LoRATargetSpec, LoRAWeights, load_lora_adapter
from node.lora.manager import AdapterAction, ControlAdapter, LoRAManager
from node.lora.memory_provider import InMemoryAdapterProvider
from node.lora.provider import AdapterProvider, AdapterSource, LoadState
from node.models.config import ModelConfig

log = logging.getLogger(__name__)
Listener = Callable[[StreamDelta], None]
Waiter = Callable[[RequestOutput], None]




def max_model_len(config: EngineConfig, model: ModelConfig) -> int:
    """The longest sequence (prompt + completion) the engine takes for this model and config."""
    limit = model.max_positions  # sliding windows are masked per layer: no limit of their own
    wanted = config.max_model_len or min(limit, 4096)
    if wanted > limit:
        raise ConfigError(f"max_model_len {wanted} exceeds the model's {limit}", max_model_len=wanted)
    return wanted


class LLMEngine:
    def __init__(self, config: EngineConfig, provider: AdapterProvider[LoRAWeights] | None = None):
        self.config = config
        self.model_config = ModelConfig.from_folder(config.model_path)
        self.max_model_len = max_model_len(config, self.model_config)
        self.lora_target = LoRATargetSpec.of(self.model_config.num_layers, self.model_config.module_shapes(),
                                               self.model_config.fused_modules())
        self.provider: AdapterProvider[LoRAWeights] = provider or InMemoryAdapterProvider(self.parse_adapter)
        self.tokenizer: PreTrainedTokenizerBase = AutoTokenizer.from_pretrained(str(config.model_path))
        eos = eos_token_ids(self.model_config, self.tokenizer)
        self.runner = runner_class(config)(config, self.model_config, self.max_model_len, frozenset(eos))
        if self.runner.num_blocks * config.block_size < self.max_model_len:
            self.runner.close()
            raise ConfigError("the KV cache cannot hold one max_model_len sequence",
                              num_kv_blocks=self.runner.num_blocks, max_model_len=self.max_model_len)
        self.block_manager = BlockManager(self.runner.num_blocks, config.block_size,
                                          enable_caching=config.prefix_caching)
        self.adapters = LoRAManager(self.provider, self.runner.slots, self.runner.copies, self._post)
        self.scheduler = Scheduler(self.block_manager, self.adapters.loads, max_num_seqs=config.max_num_seqs,
                                   max_num_batched_tokens=config.max_num_batched_tokens,
                                   max_adapter_slots=self.adapters.slots.num_slots)
        self.outputs = OutputProcessor(self.tokenizer, frozenset(eos), self.max_model_len)
        self.grammars = GrammarCompiler(self.tokenizer, self.model_config.vocab_size, sorted(eos))
        self._inbox: list[InboxMessage] = []  # from other threads, drained at the start of each step
        self._listeners: dict[str, Listener] = {}  # stream callers: every delta
        self._waiters: dict[str, Waiter] = {}  # generate callers: the final output only
        self._wake = threading.Condition()
        self._ids = itertools.count()
        self.num_steps = 0  # forward passes run (a batch's tokens per step: what the step's fixed cost is shared by)
        self._thread: threading.Thread | None = None
        self._stop = False

    # --- adapters -------------------------------------------------------------------------------
    def parse_adapter(self, folder: Path) -> LoRAWeights:
        """The `parse` function for adapter providers: a validated PEFT folder for this base model."""
        return load_lora_adapter(folder, self.lora_target, self.config.max_lora_rank,
                                 pin_memory=self.config.device.startswith("cuda"))

    def add_adapter(self, adapter_id: str, path: str | Path) -> None:
        """Register a local PEFT folder and parse it now, so that a bad adapter fails here."""
        self.adapters.register(adapter_id, AdapterSource(uri=str(path), sha256=""))
        self.provider.get(adapter_id)

    def control_adapter(self, adapter_id: str, action: AdapterAction) -> Future[None]:
        """Pin, unpin, preload or evict an adapter (node/lora/manager.py); done once it took effect."""
        done: Future[None] = Future()
        self._post(ControlAdapter(adapter_id, action, done))
        if self._thread is None:
            for seq in self._drain_inbox():
                self._notify(seq)
        return done

    def remove_adapter(self, adapter_id: str) -> None:
        """Unregister an adapter; its requests still waiting or running finish with "abort"."""
        self._post(DropAdapter(adapter_id))
        if self._thread is None:
            for seq in self._drain_inbox():
                self._notify(seq)

    # --- requests -------------------------------------------------------------------------------
    def count_tokens(self, prompt: str | list[int]) -> int:
        return len(self._encode(prompt))

    def _encode(self, prompt: str | list[int]) -> list[int]:
        if isinstance(prompt, str):
            return list(self.tokenizer(prompt).input_ids)
        if not all(isinstance(t, int) and 0 <= t < self.model_config.vocab_size for t in prompt):
            raise BadRequest("prompt token ids must be ints in the vocabulary")
        return list(prompt)

    def check_vocabulary(self, params: SamplingParams) -> None:
        check_vocabulary(params, self.model_config.vocab_size)

    def add_request(self, prompt: str | list[int], params: SamplingParams, adapter_id: str | None = None,
                    request_id: str | None = None, listener: Listener | None = None,
                    waiter: Waiter | None = None, prefix_key: str | None = None) -> str:
        """Queue a request. Requests given one `prefix_key` are the n choices of one prompt: the prefix
        cache shares their prompt's KV blocks as it does any common prefix (the key matters to a router
        of several engines, which sends them to one)."""
        ids = self._encode(prompt)
        if not ids:
            raise BadRequest("the prompt is empty")
        if len(ids) >= self.max_model_len:
            raise PromptTooLong(f"prompt of {len(ids)} tokens, max_model_len is {self.max_model_len}",
                                num_prompt_tokens=len(ids), max_model_len=self.max_model_len)
        self.check_vocabulary(params)
        if adapter_id is not None and self.adapters.state(adapter_id) is LoadState.UNKNOWN:
            raise AdapterNotFound(f"adapter {adapter_id} is not registered", adapter=adapter_id)
        request_id = request_id or f"req-{next(self._ids)}"
        seq = Sequence(request_id=request_id, prompt_token_ids=ids, params=params, adapter_id=adapter_id,
                       arrival=next(self._ids))
        if params.grammar is not None:
            seq.grammar = self.grammars.state(params.grammar)  # BadRequest if it cannot compile
        seed = params.seed if params.seed is not None else self.config.seed * 1_000_003 + seq.arrival
        seq.generator = torch.Generator(device=self.config.device).manual_seed(seed)
        with self._wake:
            if listener is not None:
                self._listeners[request_id] = listener
            if waiter is not None:
                self._waiters[request_id] = waiter
            self._inbox.append(seq)
            self._wake.notify()
        return request_id

    def abort(self, request_id: str) -> None:
        self._post(Abort(request_id))

    def _post(self, message: InboxMessage) -> None:
        with self._wake:
            self._inbox.append(message)
            self._wake.notify()

    def _drain_inbox(self) -> list[Sequence]:
        """Apply the inbox's messages in order; returns the sequences they ended."""
        with self._wake:
            inbox, self._inbox = self._inbox, []
        finished: list[Sequence | None] = []
        for message in inbox:
            match message:
                case Sequence():
                    self.scheduler.add(message)
                case Abort(request_id):
                    finished.append(self._abort(request_id))
                case ControlAdapter():
                    running = {s.adapter_id for s in self.scheduler.running if s.adapter_id is not None}
                    self.adapters.apply(message, running)
                case DropAdapter(adapter_id):
                    for seq in [*self.scheduler.running, *self.scheduler.waiting]:
                        if seq.adapter_id == adapter_id:
                            finished.append(self._abort(seq.request_id))
                    self.adapters.drop(adapter_id)
                    self.block_manager.forget_adapter(adapter_id)
        return [s for s in finished if s is not None]

    def _abort(self, request_id: str) -> Sequence | None:
        """End a request where it stands: its answer is the text of what it generated (outputs.cut)."""
        seq = self.scheduler.abort(request_id)
        if seq is not None:
            self.outputs.cut(seq)
        return seq

    def kv_cache_stats(self) -> KVCacheStats:
        """The KV cache's use and the prefix cache's hits, evictions and cached blocks (a snapshot)."""
        return self.block_manager.stats()

    # --- the step loop --------------------------------------------------------------------------
    def has_unfinished(self) -> bool:
        with self._wake:
            return bool(self._inbox) or self.scheduler.has_unfinished

    def step(self) -> list[RequestOutput]:
        """One scheduling step and forward pass; returns the requests that finished in it."""
        finished = self._drain_inbox()
        out = self.scheduler.schedule()
        finished.extend(out.failed)
        scheduled, adapter_slots = self._place_adapters(out.scheduled, finished)
        if scheduled:
            self.num_steps += 1
            inputs = self.runner.prepare(scheduled, adapter_slots)
            sampled = self.runner.sample(inputs, self.runner.run(inputs))
            finished.extend(self._advance(scheduled, sampled))
        for seq in finished:
            self._notify(seq)
        self.adapters.stage(out.upcoming)  # after this step's outputs went out: the copies delay only the next
        return [s.to_output() for s in finished]

    def _place_adapters(self, items: Iterable[ScheduledSeq], failed: list[Sequence],
                        ) -> tuple[list[ScheduledSeq], list[int]]:
        """The items whose adapter is in a device slot now, with their slots; the others wait for a slot
        (deferred) or fail alone (appended to `failed`), never the batch."""
        in_use = {s.adapter_id for s in self.scheduler.running if s.adapter_id is not None}
        scheduled, adapter_slots = [], []
        for item in items:
            try:
                seq = item.seq
                adapter_slots.append(self.adapters.prepare(seq.adapter_id, in_use, is_first=not seq.is_placed))
                seq.is_placed = True  # a cached prefix or a prompt in chunks: one request, one use
                scheduled.append(item)
            except Overloaded:  # every slot of its rank holds a running sequence's adapter: next steps
                self.scheduler.defer(item.seq)
            except AdapterError as e:  # this request alone fails, not the batch
                self.scheduler.fail(item.seq, e)
                failed.append(item.seq)
        return scheduled, adapter_slots

    def _advance(self, scheduled: list[ScheduledSeq], sampled: SamplerOutput) -> list[Sequence]:
        """Count the step's tokens, append the sampled ones, stream them; returns the sequences that stopped."""
        finished = []
        rows = iter(enumerate(zip(sampled.token_ids, sampled.logprobs, strict=True)))
        for item in scheduled:
            seq = item.seq
            seq.num_computed_tokens += item.num_new_tokens
            if seq.num_computed_tokens < seq.num_tokens:
                continue  # a prefill chunk: nothing sampled yet
            row, (token_id, logprob) = next(rows)
            if row in sampled.dead_ends:
                self._end_at_dead_end(seq)
                finished.append(seq)
                continue
            self._append(seq, token_id, logprob)
            if self.outputs.check_stop(seq, is_streamed=seq.request_id in self._listeners):
                self.scheduler.finish(seq)
                finished.append(seq)
            elif seq.request_id in self._listeners:
                self._notify(seq)
        return finished

    def _end_at_dead_end(self, seq: Sequence) -> None:
        """Its grammar allows no next token (a schema this node's JSON rules cannot satisfy): the answer ends
        before it, cut as one at its length is (its tokens counted and charged); the batch goes on."""
        log.warning("request %s: its grammar allows no token after %d; its answer ends there", seq.request_id,
                    len(seq.output_token_ids))
        self.outputs.cut(seq)
        seq.finish("length")
        self.scheduler.finish(seq)

    @staticmethod
    def _append(seq: Sequence, token_id: int, logprob: TokenLogprob | None) -> None:
        if seq.grammar is not None and not seq.grammar.accept(token_id):  # the mask allowed it: a bug
            log.error("request %s: token %d is outside its grammar", seq.request_id, token_id)
        seq.append(token_id, logprob)

    def _notify(self, seq: Sequence) -> None:
        listener = self._listeners.get(seq.request_id)
        if listener is not None:
            delta = self.outputs.delta(seq)
            if delta is not None:
                listener(delta)
        if seq.is_finished:
            with self._wake:
                self._listeners.pop(seq.request_id, None)
                waiter = self._waiters.pop(seq.request_id, None)
            self.outputs.forget(seq)
            if waiter is not None:
                waiter(seq.to_output())

    def generate(self, prompts: list[str | list[int]],
                 params: SamplingParams | list[SamplingParams] | None = None,
                 adapter_ids: list[str | None] | None = None) -> list[RequestOutput]:
        """Run every prompt to completion; outputs in prompt order."""
        params_list = params if isinstance(params, list) else [params or SamplingParams()] * len(prompts)
        adapters = adapter_ids if adapter_ids is not None else [None] * len(prompts)
        if not len(prompts) == len(params_list) == len(adapters):
            raise BadRequest("prompts, params and adapter_ids must have the same length")
        done: dict[str, RequestOutput] = {}
        event = threading.Event()
        ids: list[str] = []

        def collect(output: RequestOutput) -> None:
            done[output.request_id] = output
            if len(done) == len(ids):
                event.set()

        ids.extend(f"gen-{next(self._ids)}" for _ in prompts)
        try:
            for rid, prompt, p, a in zip(ids, prompts, params_list, adapters, strict=True):
                self.add_request(prompt, p, a, request_id=rid, waiter=collect)
        except NodeError:
            for rid in ids:  # all or nothing: drop the ones already queued
                self.abort(rid)
            if self._thread is None:
                self._drain_inbox()
            raise
        if self._thread is not None:
            event.wait()
        else:
            while len(done) < len(ids):
                self.step()
        return [done[rid] for rid in ids]

    async def stream(self, prompt: str | list[int], params: SamplingParams | None = None,
                     adapter_id: str | None = None, request_id: str | None = None, prefix_key: str | None = None,
                     ) -> AsyncIterator[StreamDelta]:
        """Deltas of new token ids and text as they are produced; the last one has finish_reason."""
        self.start()
        rid = request_id or f"stream-{next(self._ids)}"
        async for delta in stream_deltas(self, prompt, params or SamplingParams(), adapter_id, rid, prefix_key):
            yield delta

    def start(self) -> None:
        """Run the step loop on a background thread (idempotent)."""
        with self._wake:
            if self._thread is not None:
                return
            self._stop = False
            self._thread = threading.Thread(target=self._loop, name="llm-engine", daemon=True)
            self._thread.start()

    def shutdown(self) -> None:
        with self._wake:
            thread, self._thread, self._stop = self._thread, None, True
            self._wake.notify_all()
        if thread is not None:
            thread.join()
        self.runner.close()

    def _loop(self) -> None:
        while True:
            with self._wake:
                while not self._stop and not self._inbox and not self.scheduler.has_unfinished:
                    self._wake.wait()
                if self._stop:
                    return
            try:
                self.step()
            except Exception as e:
                log.exception("engine step failed; failing the running requests")
                self.fail_all(e if isinstance(e, NodeError) else None)

    def fail_all(self, error: NodeError | None = None) -> None:
        """End every request in the engine with "error" (after a step raised `error`, if it is typed)."""
        for seq in [*self.scheduler.running, *self.scheduler.waiting]:
            self.scheduler.abort(seq.request_id)
            seq.finish("error", error or NodeError("engine step failed"))
            self._notify(seq)


def runner_class(config: EngineConfig) -> type[ModelRunner]:
    """`ModelRunner`, or its tensor-parallel form (rank 0 of a group it starts)."""
    if config.tensor_parallel_size == 1:
        return ModelRunner
    from node.engine.tp_runner import TPModelRunner  # torch.distributed only where it is used

    return TPModelRunner


def eos_token_ids(model_config: ModelConfig, tokenizer: PreTrainedTokenizerBase) -> frozenset[int]:
    """The tokens that end an answer: the model's and its tokenizer's."""
    eos = set(model_config.eos_token_ids)
    if tokenizer.eos_token_id is not None:
        eos.add(tokenizer.eos_token_id)
    return frozenset(eos)
