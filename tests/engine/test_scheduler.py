"""Continuous batching on its own: budgets, preemption, abort, out of blocks, adapters vs slots."""

from __future__ import annotations

from concurrent.futures import Future

from node.engine.block_manager import BlockManager
from node.engine.sampling import SamplingParams
from node.engine.scheduler import Scheduler, SchedulerOutput
from node.engine.sequence import Sequence, SequenceStatus
from node.errors import AdapterFormatError
from node.lora.loads import AdapterLoads
from node.lora.memory_provider import InMemoryAdapterProvider
from node.lora.provider import AdapterSource, LoadState


class ManualProvider:
    """An AdapterProvider whose background loads finish when the test says so."""

    def __init__(self) -> None:
        self.states: dict[str, LoadState] = {}
        self.futures: dict[str, Future[object]] = {}
        self.prefetched: list[str] = []

    def register(self, adapter_id: str, source: AdapterSource) -> None:
        self.states[adapter_id] = LoadState.COLD

    def unregister(self, adapter_id: str) -> None:
        self.states.pop(adapter_id, None)

    def get(self, adapter_id: str) -> object:
        return adapter_id

    def prefetch(self, adapter_id: str) -> Future[object]:
        self.prefetched.append(adapter_id)
        self.states[adapter_id] = LoadState.LOADING
        return self.futures.setdefault(adapter_id, Future())

    def state(self, adapter_id: str) -> LoadState:
        return self.states.get(adapter_id, LoadState.UNKNOWN)

    def finish(self, adapter_id: str, error: Exception | None = None) -> None:
        if error is None:
            self.futures[adapter_id].set_result(adapter_id)
        else:
            self.futures[adapter_id].set_exception(error)
        self.states[adapter_id] = LoadState.FAILED if error else LoadState.READY


def _ready_provider(*names: str) -> InMemoryAdapterProvider[str]:
    provider: InMemoryAdapterProvider[str] = InMemoryAdapterProvider(parse=lambda p: p.name)
    for name in names:
        provider.register(name, AdapterSource(uri=f"/adapters/{name}", sha256=""))
        provider.get(name)
    return provider


_arrivals = iter(range(10**6))


def _seq(name: str, num_prompt: int, adapter: str | None = None) -> Sequence:
    return Sequence(request_id=name, prompt_token_ids=[1] * num_prompt, params=SamplingParams(),
                    adapter_id=adapter, arrival=next(_arrivals))


def _scheduler(provider: object = None, *, blocks: int = 64, block_size: int = 4, seqs: int = 8,
               tokens: int = 64, slots: int = 4) -> Scheduler:
    return Scheduler(BlockManager(blocks, block_size), AdapterLoads(provider or _ready_provider()),  # type: ignore[arg-type]
                     max_num_seqs=seqs, max_num_batched_tokens=tokens, max_adapter_slots=slots)


def _run(out: SchedulerOutput, sampled_token: int = 7) -> None:
    """What the engine does after the forward: advance and append a token where one is sampled."""
    for item in out.scheduled:
        item.seq.num_computed_tokens += item.num_new_tokens
        if item.seq.num_computed_tokens == item.seq.num_tokens:
            item.seq.output_token_ids.append(sampled_token)


def test_token_budget_and_sequence_cap_bound_each_step() -> None:
    sched = _scheduler(tokens=10, seqs=2)
    for i in range(3):
        sched.add(_seq(f"r{i}", 6))
    out = sched.schedule()
    assert [(s.seq.request_id, s.num_new_tokens) for s in out.scheduled] == [("r0", 6), ("r1", 4)]
    assert not out.scheduled[1].is_sampled  # r1's prefill is cut into chunks
    _run(out)
    out = sched.schedule()  # r0 decodes, r1 finishes its prefill, r2 waits for a sequence slot
    assert [(s.seq.request_id, s.num_new_tokens) for s in out.scheduled] == [("r0", 1), ("r1", 2)]
    assert [s.request_id for s in sched.waiting] == ["r2"]


def test_running_out_of_blocks_preempts_the_newest_sequence_for_recompute() -> None:
    sched = _scheduler(blocks=4, block_size=4, tokens=64)
    old, new = _seq("old", 8), _seq("new", 8)
    sched.add(old)
    sched.add(new)
    _run(sched.schedule())  # both prefilled: all 4 blocks used, each has 9 tokens now
    out = sched.schedule()  # old needs a 3rd block for its 9th token: new is preempted
    assert [s.seq.request_id for s in out.scheduled] == ["old"]
    assert new.status is SequenceStatus.WAITING and new.block_table == [] and new.num_preemptions == 1
    assert new.num_computed_tokens == 0 and new.output_token_ids == [7]  # recompute keeps its output
    assert list(sched.waiting) == [new]
    _run(out)
    sched.finish(old)
    out = sched.schedule()  # the preempted sequence comes back with prompt + output to recompute
    assert [(s.seq.request_id, s.num_new_tokens) for s in out.scheduled] == [("new", 9)]


def test_a_request_larger_than_the_free_blocks_waits_without_starving() -> None:
    sched = _scheduler(blocks=3, block_size=4)
    sched.add(_seq("big", 10))
    sched.add(_seq("huge", 13))
    sched.add(_seq("small", 2))
    out = sched.schedule()
    assert [s.seq.request_id for s in out.scheduled] == ["big"]  # FCFS: small does not overtake huge
    assert [s.request_id for s in sched.waiting] == ["huge", "small"]


def test_abort_frees_blocks_of_running_and_drops_waiting_requests() -> None:
    sched = _scheduler(blocks=4)
    a, b = _seq("a", 8), _seq("b", 4)
    sched.add(a)
    sched.add(b)
    sched.add(_seq("c", 40))  # cannot fit: stays waiting
    sched.schedule()
    assert sched.blocks.num_free == 1
    assert sched.abort("a") is a and a.finish_reason == "abort"
    assert sched.blocks.num_free == 3
    assert sched.abort("c") is not None and sched.abort("nope") is None
    assert [s.request_id for s in sched.running] == ["b"] and not sched.waiting


def test_more_distinct_adapters_than_slots_never_exceed_the_slots() -> None:
    names = [f"ad{i}" for i in range(5)]
    sched = _scheduler(_ready_provider(*names), slots=2, seqs=8)
    for i in range(10):
        sched.add(_seq(f"r{i}", 3, names[i % 5]))
    finished = []
    for _ in range(40):
        out = sched.schedule()
        if out.is_empty:
            break
        assert len({s.adapter_id for s in sched.running}) <= 2
        _run(out)
        for seq in list(sched.running):
            if len(seq.output_token_ids) >= 2:
                sched.finish(seq)
                finished.append(seq.request_id)
    assert sorted(finished) == sorted(f"r{i}" for i in range(10))


def test_requests_wait_for_their_adapter_without_blocking_others() -> None:
    provider = ManualProvider()
    provider.register("slow", AdapterSource(uri="x", sha256=""))
    sched = _scheduler(provider)
    sched.add(_seq("cold", 4, "slow"))
    sched.add(_seq("base", 4))
    out = sched.schedule()
    assert [s.seq.request_id for s in out.scheduled] == ["base"]
    assert provider.prefetched == ["slow"]
    sched.schedule()
    assert provider.prefetched == ["slow"]  # one load, not one per step
    provider.finish("slow")
    out = sched.schedule()
    assert "cold" in [s.seq.request_id for s in out.scheduled]


def test_a_failed_adapter_load_fails_only_its_own_requests() -> None:
    provider = ManualProvider()
    provider.register("broken", AdapterSource(uri="x", sha256=""))
    sched = _scheduler(provider)
    sched.add(_seq("bad", 4, "broken"))
    sched.add(_seq("good", 4))
    sched.schedule()
    provider.finish("broken", AdapterFormatError("rank 64 exceeds max_lora_rank 16", adapter="broken"))
    out = sched.schedule()
    assert [s.request_id for s in out.failed] == ["bad"]
    bad = out.failed[0]
    assert bad.finish_reason == "error" and isinstance(bad.error, AdapterFormatError)
    assert [s.request_id for s in sched.running] == ["good"]




def test_adapters_of_requests_behind_a_full_batch_load_before_admission() -> None:
    provider = ManualProvider()
    for name in ("first", "second", "third"):
        provider.register(name, AdapterSource(uri="x", sha256=""))
    provider.states["first"] = LoadState.READY
    sched = _scheduler(provider, seqs=1)
    for name in ("first", "second", "third"):
        sched.add(_seq(name, 4, name))
    out = sched.schedule()
    assert [s.seq.request_id for s in out.scheduled] == ["first"]  # the batch is full now
    assert provider.prefetched == ["second"]  # the next max_num_seqs (1) waiting request, not admitted
    assert out.upcoming == ("second",)
    provider.finish("second")
    _run(out)
    sched.finish(sched.running[0])
    out = sched.schedule()  # admitted at once: its adapter was loaded while it waited
    assert [s.seq.request_id for s in out.scheduled] == ["second"]
    assert provider.prefetched == ["second", "third"]


def test_look_ahead_continues_through_a_preemption() -> None:
    provider = ManualProvider()
    provider.register("cold", AdapterSource(uri="x", sha256=""))
    sched = _scheduler(provider, blocks=2, block_size=4, seqs=4)
    sched.add(_seq("a", 4))
    sched.add(_seq("b", 4))
    _run(sched.schedule())  # both prefills fill both blocks
    sched.add(_seq("c", 2, "cold"))
    out = sched.schedule()  # decodes need new blocks: b is preempted, nothing is admitted
    assert [s.seq.request_id for s in out.scheduled] == ["a"]
    assert provider.prefetched == ["cold"] and "cold" in out.upcoming


def _caching_scheduler(blocks: int) -> Scheduler:
    return Scheduler(BlockManager(blocks, 4, enable_caching=True), AdapterLoads(_ready_provider()),
                     max_num_seqs=8, max_num_batched_tokens=64, max_adapter_slots=4)


def _prompt_seq(name: str, tokens: list[int]) -> Sequence:
    return Sequence(request_id=name, prompt_token_ids=tokens, params=SamplingParams(), adapter_id=None,
                    arrival=next(_arrivals))


def test_a_request_waits_a_step_for_the_prefix_a_running_one_computes_then_skips_it() -> None:
    sched = _caching_scheduler(blocks=16)
    first, second = _prompt_seq("first", [3] * 10), _prompt_seq("second", [3] * 10)
    sched.add(first)
    sched.add(second)
    out = sched.schedule()
    assert [(s.seq.request_id, s.num_new_tokens) for s in out.scheduled] == [("first", 10)]
    _run(out)
    out = sched.schedule()  # two full blocks of "first" are cached now: "second" computes its last 2 tokens
    assert [(s.seq.request_id, s.num_new_tokens) for s in out.scheduled] == [("first", 1), ("second", 2)]
    assert second.block_table[:2] == first.block_table[:2] and second.block_table[2] != first.block_table[2]
    assert sched.blocks.stats().num_hit_tokens == 8


def test_a_preempted_request_recomputes_only_past_its_cached_blocks() -> None:
    sched = _caching_scheduler(blocks=5)
    old, new = _prompt_seq("old", [1] * 8), _prompt_seq("new", [2] * 8)
    sched.add(old)
    sched.add(new)
    _run(sched.schedule())  # both prefilled: 4 of 5 blocks
    out = sched.schedule()  # old takes the last block for its 9th token; new finds none and is preempted
    assert [s.seq.request_id for s in out.scheduled] == ["old"] and new.num_preemptions == 1
    _run(out)
    sched.finish(old)
    out = sched.schedule()  # its two prompt blocks were kept cached: only its sampled token is run
    assert [(s.seq.request_id, s.num_new_tokens) for s in out.scheduled] == [("new", 1)]
    assert new.num_computed_tokens == 8


def test_cache_hits_are_admitted_first_but_never_ahead_of_the_oldest_request() -> None:
    sched = Scheduler(BlockManager(64, 4, enable_caching=True), _ready_provider(),  # type: ignore[arg-type]
                      max_num_seqs=8, max_num_batched_tokens=16, max_adapter_slots=4)
    system = [5] * 12
    sched.add(_prompt_seq("system", [*system, 1]))
    _run(sched.schedule())  # 13 tokens: the system prompt's 3 blocks are cached from now on
    for name, tokens in (("old", [7] * 13), ("miss", [8] * 13), ("hit-a", [*system, 2]), ("hit-b", [*system, 3])):
        sched.add(_prompt_seq(name, tokens))
    out = sched.schedule()  # 15 tokens after the decode: the oldest first, then the hits (1 token each)
    assert [(s.seq.request_id, s.num_new_tokens) for s in out.scheduled] == [
        ("system", 1), ("old", 13), ("hit-a", 1), ("hit-b", 1)]  # "miss" came before the hits, and waits
    _run(out)
    out = sched.schedule()
    assert [(s.seq.request_id, s.num_new_tokens) for s in out.scheduled][-1] == ("miss", 12)


def test_without_the_cache_admission_is_first_come_first_served() -> None:
    sched = _scheduler(tokens=16, block_size=4)
    for name, n in (("a", 8), ("b", 8), ("c", 2)):
        sched.add(_seq(name, n))
    assert [s.seq.request_id for s in sched.schedule().scheduled] == ["a", "b"]


def test_a_prefill_that_cannot_fit_waits_rather_than_being_computed_again_and_again() -> None:
    # an older sequence keeps growing into the free blocks; a newer 40-token prompt that was admitted on the
    # blocks of its first chunk alone was preempted at its next chunk, admitted again, preempted again: its
    # prefill computed over and over (269 tokens in 60 steps), work nobody pays for
    sched = _scheduler(blocks=20, block_size=4, tokens=8)
    old = _seq("old", 8)
    sched.add(old)
    for _ in range(3):
        _run(sched.schedule())
    new = _seq("new", 40)
    sched.add(new)
    computed = 0
    for _ in range(60):
        out = sched.schedule()
        computed += sum(s.num_new_tokens for s in out.scheduled if s.seq is new)
        _run(out)
    assert len(old.output_token_ids) == 63  # the older sequence never stopped
    assert computed <= 2 * len(new.prompt_token_ids), (computed, new.num_preemptions)


def test_a_full_batch_looks_up_no_waiting_prompt_in_the_prefix_cache() -> None:
    # every sequence slot taken: nothing can be admitted, yet each step walked the cached prefix of each request
    # in the admission window (max_num_seqs of them) to order the queue: a walk over each one's prompt blocks
    blocks = BlockManager(400, 4, enable_caching=True)
    sched = Scheduler(blocks, AdapterLoads(_ready_provider()), max_num_seqs=2, max_num_batched_tokens=256,
                      max_adapter_slots=4)
    prompt = list(range(100, 180))
    for name in ("a", "b"):
        sched.add(Sequence(request_id=name, prompt_token_ids=prompt, params=SamplingParams(), adapter_id=None,
                           arrival=next(_arrivals)))
    while len(sched.running) < 2:  # b waits a step for a's blocks, then starts on them
        _run(sched.schedule())
    for i in range(20):
        sched.add(Sequence(request_id=f"w{i}", prompt_token_ids=[*prompt, i], params=SamplingParams(),
                           adapter_id=None, arrival=next(_arrivals)))
    looked_up = [0]
    num_cached_blocks = blocks.num_cached_blocks

    def counting(seq: Sequence) -> int:
        looked_up[0] += 1
        return num_cached_blocks(seq)

    blocks.num_cached_blocks = counting  # type: ignore[method-assign]
    for _ in range(5):
        out = sched.schedule()
        assert {s.seq.request_id for s in out.scheduled} == {"a", "b"}
        _run(out)
    assert looked_up[0] == 0
