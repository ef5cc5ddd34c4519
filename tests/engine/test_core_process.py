"""The engine in core processes of its own, through `CoreClient`: the same answers as in-process,
streams and aborts across the socket, a core killed mid-request, and garbage on both sockets."""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import os
import shutil
import signal
import threading
import time
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest
import zmq

from node.engine import EngineConfig, LLMEngine, SamplingParams, wire
from node.engine.core_client import CoreClient
from node.engine.core_process import input_endpoint, output_endpoint
from node.engine.sequence import RequestOutput, StreamDelta
from node.errors import AdapterError, AdapterNotFound, Overloaded, Unavailable
from node.lora.manager import AdapterAction
from node.lora.provider import LoadState
from tests.fixtures.models import TinyAdapters

GREEDY = SamplingParams(max_tokens=10, temperature=0, ignore_eos=True)
LONG = SamplingParams(max_tokens=100, temperature=0, ignore_eos=True)
TEMPLATE = "{% for m in messages %}<{{ m['role'] }}>{{ m['content'] }}{% endfor %}"


def _config(tiny_model: Path) -> EngineConfig:
    return EngineConfig(model_path=tiny_model, max_num_seqs=8, max_model_len=128, max_adapter_slots=2,
                        max_lora_rank=16)


@pytest.fixture(scope="module")
def cores(tiny_model: Path, tiny_adapters: TinyAdapters) -> Iterator[CoreClient]:
    client = CoreClient(_config(tiny_model), num_cores=2, num_threads=1)
    client.start()
    for name, path in tiny_adapters.paths.items():
        client.add_adapter(name, str(path))
    yield client
    client.shutdown()


@pytest.fixture(scope="module")
def local(tiny_model: Path, tiny_adapters: TinyAdapters) -> LLMEngine:
    engine = LLMEngine(_config(tiny_model))
    for name, path in tiny_adapters.paths.items():
        engine.add_adapter(name, path)
    return engine


def _wait_up(client: CoreClient, n: int, timeout_s: float = 120.0) -> None:
    deadline = time.monotonic() + timeout_s
    while client.num_up < n:
        assert time.monotonic() < deadline, "the core was not started again"
        time.sleep(0.1)


def test_two_cores_answer_what_the_engine_in_process_answers(cores: CoreClient, local: LLMEngine) -> None:
    prompts: list[str | list[int]] = ["The river runs", "Seven small boats", "hello", [5, 6, 7, 8]]
    adapters = ["sea-r8", "count-r4", None, "food-r16"]
    remote = cores.generate(prompts, GREEDY, adapters)
    here = local.generate(prompts, GREEDY, adapters)
    assert [(o.token_ids, o.text, o.finish_reason) for o in remote] == [
        (o.token_ids, o.text, o.finish_reason) for o in here]


def test_generate_with_no_prompts_answers_at_once(cores: CoreClient) -> None:
    answered: list[object] = []
    caller = threading.Thread(target=lambda: answered.append(cores.generate([])), daemon=True)
    caller.start()
    caller.join(timeout=30)
    assert answered == [[]]


def test_a_stream_crosses_delta_by_delta_and_an_abort_ends_it(cores: CoreClient, local: LLMEngine) -> None:
    expected = local.generate(["The river runs"], GREEDY, ["sea-r8"])[0]

    async def read(params: SamplingParams, stop_after: int | None) -> list[object]:
        out = []
        stream = cores.stream("The river runs", params, "sea-r8", request_id=f"s-{stop_after}")
        async for delta in stream:
            out.append(delta)
            if stop_after is not None and len(out) == stop_after:
                cores.abort(f"s-{stop_after}")
        return out

    deltas = asyncio.run(read(GREEDY, None))
    assert "".join(d.text for d in deltas) == expected.text and deltas[-1].finish_reason == "length"  # type: ignore[attr-defined]
    assert len(deltas) > 1
    cut = asyncio.run(read(LONG, 2))
    assert cut[-1].finish_reason == "abort" and cut[-1].num_completion_tokens < 100  # type: ignore[attr-defined]


def test_an_unknown_adapter_fails_with_the_engines_own_error(cores: CoreClient) -> None:
    out = cores.generate(["The river runs"], GREEDY, ["nobody"])[0]
    assert out.finish_reason == "error" and isinstance(out.error, AdapterNotFound)


def test_a_removed_adapter_is_refused_by_every_core(cores: CoreClient, tiny_adapters: TinyAdapters) -> None:
    cores.remove_adapter("stars-attn-r2")
    try:
        time.sleep(0.3)
        outs = cores.generate(["a", "b", "c", "d"], GREEDY, ["stars-attn-r2"] * 4)
        assert all(isinstance(o.error, AdapterNotFound) for o in outs)
    finally:
        cores.add_adapter("stars-attn-r2", str(tiny_adapters.paths["stars-attn-r2"]))


def test_an_adapters_own_chat_template_and_its_load_error_cross_from_the_core(
        cores: CoreClient, tiny_adapters: TinyAdapters, tmp_path: Path) -> None:
    templated = tmp_path / "templated"
    shutil.copytree(tiny_adapters.paths["sea-r8"], templated)
    (templated / "chat_template.jinja").write_text(TEMPLATE)
    broken = tmp_path / "broken"
    broken.mkdir()
    (broken / "adapter_config.json").write_text("{not json")
    cores.add_adapter("templated", str(templated))
    cores.add_adapter("broken", str(broken))
    adapters = cores.adapters
    assert adapters.chat_template("templated") is None  # not loaded by any core yet
    assert adapters.prefetch("templated").result(timeout=30) is None
    assert adapters.chat_template("templated") == TEMPLATE and adapters.state("templated") is LoadState.READY
    assert adapters.prefetch("sea-r8").result(timeout=30) is None
    assert adapters.chat_template("sea-r8") is None  # none of its own: the base model's applies
    with pytest.raises(AdapterError):
        adapters.prefetch("broken").result(timeout=30)
    assert adapters.state("broken") is LoadState.FAILED and isinstance(adapters.error("broken"), AdapterError)
    cores.remove_adapter("templated")
    assert adapters.chat_template("templated") is None and adapters.state("templated") is LoadState.UNKNOWN


def test_garbage_on_both_sockets_is_refused_and_both_sides_go_on(cores: CoreClient, local: LLMEngine) -> None:
    pids = cores.pids()
    context = zmq.Context.instance()
    to_core = context.socket(zmq.PUSH)
    to_core.connect(input_endpoint(cores.run_dir, 0))
    to_api = context.socket(zmq.PUSH)
    to_api.connect(output_endpoint(cores.run_dir))
    junk = [b"", b"\xff" * 100, b"\x93\x01\x02\x03", b'{"type":"AddRequest"}', os.urandom(4096),
            b"\x82\xa4type\xaaAddRequest\xaarequest_id\x01"]
    try:
        for frame in junk:
            to_core.send(frame)
            to_api.send(frame)
        _until(lambda: cores.num_refused == len(junk), "the API did not refuse them")
        _until(lambda: cores.metrics.num_refused_by_cores == len(junk), "the core did not refuse them")
    finally:
        to_core.close(linger=1000)
        to_api.close(linger=1000)
    here = local.generate(["The river runs"] * 2, GREEDY, ["sea-r8", "count-r4"])
    there = cores.generate(["The river runs"] * 2, GREEDY, ["sea-r8", "count-r4"])
    assert [o.token_ids for o in there] == [o.token_ids for o in here]
    assert cores.pids() == pids, "a core died of a malformed frame"


def test_wrong_truncated_and_unknown_messages_are_refused_and_both_sides_go_on(
        cores: CoreClient, local: LLMEngine) -> None:
    pids, incarnation = cores.pids(), cores.supervisor.cores[0].incarnation
    api_refused, core_refused = cores.num_refused, cores.metrics.num_refused_by_cores
    codec = wire.api_codec()  # encodes any message
    add = codec.encode(wire.AddRequest("foreign-1", [5, 6, 7], LONG, None, False, incarnation))
    outputs = codec.encode(wire.Outputs(0, incarnation, [StreamDelta("nobody", [1], "x", None, 3, 1)],
                                        [RequestOutput("nobody", [1], [1], "x", "length", 3, 1)]))
    to_core_refused = [codec.encode(wire.Ready(0, incarnation, 1, 128)),  # a message of the other direction
                       add[: len(add) // 2], add[:-1],  # truncated
                       add]  # the second one for a request running there
    to_core_ignored = [add, codec.encode(wire.AbortRequest("nobody")), codec.encode(wire.RemoveAdapter("nobody")),
                       codec.encode(wire.PrefetchAdapter("nobody")),  # answered with AdapterNotFound, dropped here
                       codec.encode(wire.AddRequest("foreign-2", [10**9], GREEDY, None, False, incarnation))]
    to_api_refused = [add, outputs[: len(outputs) // 2], outputs[:-3]]
    to_api_ignored = [outputs,  # request ids nobody here asked for
                      codec.encode(wire.Outputs(7, 1, [], [])), codec.encode(wire.Ready(9, 1, 1, 128)),
                      codec.encode(wire.AdapterLoaded(0, incarnation, "nobody", "{{ x }}")),
                      codec.encode(wire.Metrics(0, incarnation + 5, 0, 0, {}, num_refused=10**6))]
    expected = local.generate(["The river runs"], LONG, ["sea-r8"])[0]
    results: list[RequestOutput] = []
    cores.add_request("The river runs", LONG, "sea-r8", "genuine", waiter=results.append)
    with _pushers(cores) as (to_core, to_api):
        for frame in to_core_ignored[:1] + to_core_refused + to_core_ignored[1:]:
            to_core.send(frame)
        for frame in to_api_refused + to_api_ignored:
            to_api.send(frame)
        _until(lambda: cores.num_refused == api_refused + len(to_api_refused), "the API did not refuse them")
        _until(lambda: cores.metrics.num_refused_by_cores == core_refused + len(to_core_refused),
               "the core did not refuse them")
        _until(lambda: bool(results), "the genuine request never ended")
    assert results[0].token_ids == expected.token_ids and results[0].finish_reason == "length"
    assert cores.adapters.state("nobody") is LoadState.UNKNOWN
    assert cores.num_refused == api_refused + len(to_api_refused)  # ignoring is not refusing
    assert cores.pids() == pids, "a core died of a message"


@contextlib.contextmanager
def _pushers(cores: CoreClient) -> Iterator[tuple[zmq.Socket[bytes], zmq.Socket[bytes]]]:
    """Sockets that write to core 0's inbox and to the API's, as a foreign process could."""
    context = zmq.Context.instance()
    to_core, to_api = context.socket(zmq.PUSH), context.socket(zmq.PUSH)
    to_core.connect(input_endpoint(cores.run_dir, 0))
    to_api.connect(output_endpoint(cores.run_dir))
    try:
        yield to_core, to_api
    finally:
        to_core.close(linger=1000)
        to_api.close(linger=1000)


def _until(ok: Callable[[], bool], what: str, timeout_s: float = 30.0) -> None:
    deadline = time.monotonic() + timeout_s
    while not ok():
        assert time.monotonic() < deadline, what
        time.sleep(0.05)


def test_a_core_killed_mid_request_fails_its_requests_and_comes_back(cores: CoreClient, local: LLMEngine) -> None:
    victim = cores.pids()[0]
    assert victim is not None
    results: list[object] = []
    for i in range(6):
        cores.add_request("The river runs", LONG, f"adapter-{i}" if False else "sea-r8", f"kill-{i}",
                          waiter=results.append)
    os.kill(victim, signal.SIGKILL)
    deadline = time.monotonic() + 60
    while len(results) < 6 and time.monotonic() < deadline:
        time.sleep(0.05)
    assert len(results) == 6, "a request on the killed core never ended"
    failed = [r for r in results if r.finish_reason == "error"]  # type: ignore[attr-defined]
    assert failed and all(isinstance(r.error, Unavailable) for r in failed)  # type: ignore[attr-defined]
    _wait_up(cores, 2)
    assert cores.pids()[0] not in (None, victim)
    here = local.generate(["Seven small boats"], GREEDY, ["sea-r8"])[0]
    again = cores.generate(["Seven small boats"] * 4, GREEDY, ["sea-r8"] * 4)  # adapters registered again
    assert all(o.token_ids == here.token_ids for o in again)


def test_a_stalled_core_does_not_block_the_caller(cores: CoreClient) -> None:
    pid = cores.pids()[1]
    assert pid is not None
    os.kill(pid, signal.SIGSTOP)
    try:
        started = time.monotonic()
        for i in range(50):
            cores.add_request([5, 6, 7], GREEDY, None, f"stalled-{i}", waiter=lambda _: None)
        assert time.monotonic() - started < 1.0
    finally:
        os.kill(pid, signal.SIGCONT)


def test_the_cores_report_their_kv_cache_and_prefix_cache_hits(cores: CoreClient) -> None:
    prompt = "The harbour master rings the bell at dawn, and the boats go out"
    cores.generate([prompt, prompt], GREEDY, ["sea-r8", "sea-r8"])  # one core: the second finds the first's blocks
    cores.generate([prompt], GREEDY, ["sea-r8"])
    deadline = time.monotonic() + 60
    while (stats := cores.metrics.engine_stats()).get("prefix_cache_hit_tokens_total", 0) == 0:
        assert time.monotonic() < deadline, f"no prefix-cache hit reported: {stats}"
        time.sleep(0.1)
    assert stats["prefix_cache_blocks"] > 0
    assert stats["prefix_cache_query_tokens_total"] >= stats["prefix_cache_hit_tokens_total"]
    assert stats["kv_blocks_used"] <= stats["kv_blocks"]


def test_an_adapter_action_is_done_once_every_core_applied_it_and_a_refusal_crosses(cores: CoreClient) -> None:
    _wait_up(cores, 2)
    cores.control_adapter("sea-r8", AdapterAction.PIN).result(timeout=60)
    with pytest.raises(Overloaded, match="no device slot"):  # two slots: a second pin would leave none
        cores.control_adapter("count-r4", AdapterAction.PIN).result(timeout=60)
    cores.control_adapter("sea-r8", AdapterAction.UNPIN).result(timeout=60)
    cores.control_adapter("count-r4", AdapterAction.PIN).result(timeout=60)
    cores.control_adapter("count-r4", AdapterAction.UNPIN).result(timeout=60)


def test_a_refresh_counts_every_request_answered_before_it(cores: CoreClient) -> None:
    def lookups() -> float:
        cores.refresh_metrics(timeout_s=30)
        device = cores.metrics.store_metrics()["device"]
        return device["hits"] + device["misses"]

    _wait_up(cores, 2)
    before = lookups()
    cores.generate(["The river runs"], GREEDY, ["food-r16"])
    assert lookups() == before + 1  # at once, not at the cores' next report a second later


def test_an_operator_pin_survives_its_cores_restarting(cores: CoreClient) -> None:
    _wait_up(cores, 2)
    cores.control_adapter("sea-r8", AdapterAction.PIN).result(timeout=60)
    victims = cores.pids()
    for pid in victims:
        assert pid is not None
        os.kill(pid, signal.SIGKILL)
    _until(lambda: all(p not in (None, *victims) for p in cores.pids()), "the killed cores were not started again", 60)
    _wait_up(cores, 2)
    # the restarted cores hold the pin again: with two slots, a second pin would leave none
    with pytest.raises(Overloaded, match="no device slot"):
        cores.control_adapter("count-r4", AdapterAction.PIN).result(timeout=60)
    cores.control_adapter("sea-r8", AdapterAction.UNPIN).result(timeout=60)


def test_a_cache_salt_crosses_to_the_core_and_keeps_its_blocks_to_requests_under_it(cores: CoreClient) -> None:
    def hits_of(salt: str | None) -> float:
        before = hit_tokens()
        cores.generate([prompt], dataclasses.replace(GREEDY, cache_salt=salt), ["count-r4"])
        return hit_tokens() - before

    def hit_tokens() -> float:
        cores.refresh_metrics(timeout_s=30)
        return cores.metrics.engine_stats()["prefix_cache_hit_tokens_total"]

    _wait_up(cores, 2)
    prompt = "The lamplighter climbs the tower stair and counts each step aloud until the lantern room"
    assert hits_of("alice-secret") == 0
    assert hits_of("mallory-secret") == 0 and hits_of(None) == 0  # another salt, or none: nothing shared
    assert hits_of("alice-secret") > 0
