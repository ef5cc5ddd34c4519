"""The engine over the tiered store: loads never stall the batch, hot adapters are not starved by a
burst of cold ones, a broken adapter fails alone, and more adapters than slots still give the outputs
of one-adapter-at-a-time runs."""

from __future__ import annotations

import functools
import shutil
import threading
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file

from node.engine import EngineConfig, LLMEngine, SamplingParams
from node.engine.sequence import RequestOutput
from node.errors import AdapterFormatError, AdapterIntegrityError, AdapterSourceError
from node.lora.adapter import LoRATargetSpec, LoRAWeights, load_lora_adapter
from node.lora.content_hash import adapter_weights_sha256
from node.lora.provider import AdapterSource, LoadState
from node.lora.store import AdapterStore, StoreConfig
from node.models.config import ModelConfig
from node.protocol.hexstr import to_hex
from tests.fixtures.adapters import AdapterHTTPServer
from tests.fixtures.models import TinyAdapters

GREEDY = SamplingParams(max_tokens=8, temperature=0, ignore_eos=True)
PROMPTS = ["The river runs past", "Seven small boats left", "Rain fell softly on", "Bees move from"]
WEIGHTS, CONFIG = "adapter_model.safetensors", "adapter_config.json"


def _store(tiny_model: Path, root: Path, max_rank: int = 16, num_host: int = 100,
           **overrides: float) -> AdapterStore[LoRAWeights]:
    model = ModelConfig.from_folder(tiny_model)
    target = LoRATargetSpec.of(model.num_layers, model.module_shapes())
    parse = functools.partial(load_lora_adapter, target=target, max_rank=max_rank)
    config = StoreConfig(cache_dir=root / "cache", max_disk_bytes=1 << 30,
                         max_host_bytes=num_host * 300_000, **{"retry_after_s": 60.0, **overrides})
    return AdapterStore(config, parse, lambda w: w.nbytes)


@pytest.fixture
def store(tiny_model: Path, tmp_path: Path) -> Iterator[AdapterStore[LoRAWeights]]:
    with _store(tiny_model, tmp_path) as s:
        yield s


def _engine(tiny_model: Path, store: AdapterStore[LoRAWeights], slots: int = 4) -> LLMEngine:
    return LLMEngine(EngineConfig(model_path=tiny_model, max_num_seqs=16, max_model_len=128,
                                  max_adapter_slots=slots, max_lora_rank=16), provider=store)


def _register(store: AdapterStore[LoRAWeights], name: str, uri: str | Path, folder: Path | None = None) -> None:
    digest = to_hex(adapter_weights_sha256(folder or Path(uri)))
    store.register(name, AdapterSource(str(uri), digest))


def _perturbed(src: Path, dst: Path, seed: int) -> Path:
    """A copy of an adapter with its B matrices scaled and jittered: a distinct adapter, same shapes."""
    dst.mkdir(parents=True)
    gen = torch.Generator().manual_seed(seed)
    tensors = load_file(str(src / WEIGHTS))
    out = {k: (t * 3 + 0.05 * torch.randn(t.shape, generator=gen)) if "lora_B" in k else t.clone()
           for k, t in tensors.items()}
    save_file(out, str(dst / WEIGHTS))
    shutil.copy(src / CONFIG, dst / CONFIG)
    return dst


@dataclass
class _Finished:
    """Waiter callbacks: each output with when it finished and what the store said then."""

    store: AdapterStore[LoRAWeights]
    watched: str = ""
    outputs: dict[str, RequestOutput] = field(default_factory=dict)
    at: dict[str, float] = field(default_factory=dict)
    watched_state: dict[str, LoadState] = field(default_factory=dict)
    done: threading.Condition = field(default_factory=threading.Condition)

    def __call__(self, output: RequestOutput) -> None:
        with self.done:
            self.outputs[output.request_id] = output
            self.at[output.request_id] = time.monotonic()
            if self.watched:
                self.watched_state[output.request_id] = self.store.state(self.watched)
            self.done.notify_all()

    def wait(self, n: int, timeout_s: float = 60.0) -> None:
        with self.done:
            assert self.done.wait_for(lambda: len(self.outputs) >= n, timeout_s), self.outputs.keys()


def _sequential(engine: LLMEngine, prompts: list[str], adapters: list[str | None]) -> list[list[int]]:
    """The same requests run one adapter at a time (each group alone in the engine)."""
    tokens: dict[int, list[int]] = {}
    for adapter in dict.fromkeys(adapters):
        idx = [i for i, a in enumerate(adapters) if a == adapter]
        for i, out in zip(idx, engine.generate([prompts[i] for i in idx], GREEDY, [adapter] * len(idx)),
                          strict=True):
            tokens[i] = out.token_ids
    return [tokens[i] for i in range(len(prompts))]


def test_a_slow_http_load_does_not_stall_requests_for_resident_adapters(
        tiny_model: Path, tiny_adapters: TinyAdapters, store: AdapterStore[LoRAWeights], tmp_path: Path) -> None:
    slow_src = tiny_adapters.paths["sea-r8"]
    shutil.copytree(slow_src, tmp_path / "www" / "slow")
    with AdapterHTTPServer(tmp_path / "www") as server:
        server.trickle_bytes, server.trickle_sleep_s = 4096, 0.1  # ~90 kB: 2 s on the wire
        _register(store, "slow", f"{server.url}/slow", folder=slow_src)
        _register(store, "slow-local", slow_src)
        for name in ("count-r4", "food-r16"):
            _register(store, name, tiny_adapters.paths[name])
            store.get(name)
        engine = _engine(tiny_model, store)
        finished = _Finished(store, watched="slow")
        engine.start()
        try:
            engine.add_request(PROMPTS[0], GREEDY, "slow", request_id="slow", waiter=finished)
            resident = [engine.add_request(p, GREEDY, a, waiter=finished)
                        for p in PROMPTS[1:] for a in ("count-r4", "food-r16", None)]
            finished.wait(1 + len(resident))
        finally:
            engine.shutdown()
        expected = engine.generate([PROMPTS[0]], GREEDY, ["slow-local"])[0]
    for rid in resident:
        # 8 tokens, less those of a character left unfinished at the end (left out, not charged)
        assert finished.outputs[rid].finish_reason == "length" and 5 <= len(finished.outputs[rid].token_ids) <= 8
        assert finished.watched_state[rid] is LoadState.LOADING  # done while the download still ran
        assert finished.at[rid] < finished.at["slow"]
    slow = finished.outputs["slow"]
    assert slow.finish_reason == "length" and slow.token_ids == expected.token_ids
    assert server.requests["/slow/adapter_model.safetensors"] == 1


def test_a_burst_of_cold_adapters_does_not_starve_a_hot_one(
        tiny_model: Path, tiny_adapters: TinyAdapters, store: AdapterStore[LoRAWeights], tmp_path: Path) -> None:
    base = tiny_adapters.paths["count-r4"]
    cold = [f"cold{i}" for i in range(8)]
    for i, name in enumerate(cold):
        _perturbed(base, tmp_path / "www" / name, seed=i)
    with AdapterHTTPServer(tmp_path / "www") as server:
        server.trickle_bytes, server.trickle_sleep_s = 4096, 0.05  # each cold load ~0.3 s on the wire
        for name in cold:
            _register(store, name, f"{server.url}/{name}", folder=tmp_path / "www" / name)
        _register(store, "hot", tiny_adapters.paths["sea-r8"])
        store.get("hot")
        engine = _engine(tiny_model, store, slots=2)
        finished = _Finished(store)
        engine.start()
        try:
            burst = [engine.add_request(PROMPTS[i % 4], GREEDY, name, waiter=finished)
                     for i, name in enumerate(cold * 2)]
            submitted = time.monotonic()
            hot = [engine.add_request(p, GREEDY, "hot", waiter=finished) for p in PROMPTS]
            finished.wait(len(burst) + len(hot))
        finally:
            engine.shutdown()
    outs = finished.outputs
    assert all(outs[r].finish_reason == "length" for r in burst + hot)
    first_cold = min(finished.at[r] for r in burst)
    last_cold = max(finished.at[r] for r in burst)
    last_hot = max(finished.at[r] for r in hot)
    # the hot requests came after 16 cold ones, two slots only: they still finish in the first
    # part of the burst, not behind it
    assert last_hot - submitted < 0.5 * (last_cold - submitted), (last_hot - submitted, last_cold - submitted)
    assert last_hot < first_cold + 0.5 * (last_cold - first_cold)


def _pickled(folder: Path, src: Path) -> Path:
    folder.mkdir(parents=True)
    shutil.copy(src / CONFIG, folder / CONFIG)
    (folder / WEIGHTS).write_bytes(__import__("pickle").dumps({"weights": [1, 2, 3]}))
    return folder


def test_an_adapter_that_cannot_load_fails_alone(
        tiny_model: Path, tiny_adapters: TinyAdapters, store: AdapterStore[LoRAWeights], tmp_path: Path) -> None:
    good = tiny_adapters.paths["sea-r8"]
    _register(store, "good", good)
    _register(store, "cold-good", tiny_adapters.paths["count-r4"])
    store.register("bad-hash", AdapterSource(str(good), "0x" + "ab" * 32))
    store.register("missing", AdapterSource(str(tmp_path / "nowhere"), "0x" + "cd" * 32))
    _register(store, "pickle", _pickled(tmp_path / "pickle", good))
    store.get("good")
    engine = _engine(tiny_model, store)
    adapters: list[str | None] = ["good", "bad-hash", None, "missing", "cold-good", "pickle", "good"]
    prompts = [PROMPTS[i % 4] for i in range(len(adapters))]
    outs = engine.generate(prompts, GREEDY, adapters)  # type: ignore[arg-type]
    errors = {a: o.error for a, o in zip(adapters, outs, strict=True) if o.finish_reason == "error"}
    assert set(errors) == {"bad-hash", "missing", "pickle"}
    assert isinstance(errors["bad-hash"], AdapterIntegrityError) and "0x" + "ab" * 32 in str(errors["bad-hash"])
    assert isinstance(errors["missing"], AdapterSourceError) and "nowhere" in str(errors["missing"])
    assert isinstance(errors["pickle"], AdapterFormatError) and "pickle" in str(errors["pickle"])
    ok = [i for i, a in enumerate(adapters) if a not in errors]
    alone = _sequential(engine, [prompts[i] for i in ok], [adapters[i] for i in ok])
    assert [outs[i].token_ids for i in ok] == alone
    assert all(outs[i].finish_reason == "length" for i in ok)
    assert store.state("bad-hash") is LoadState.FAILED and store.state("good") is LoadState.READY


def test_more_adapters_than_slots_give_the_outputs_of_one_adapter_at_a_time(
        tiny_model: Path, tiny_adapters: TinyAdapters, tmp_path: Path) -> None:
    names = list(tiny_adapters.paths)
    folders = dict(tiny_adapters.paths)
    for i, name in enumerate(names[:3]):
        folders[f"{name}-x"] = _perturbed(tiny_adapters.paths[name], tmp_path / f"{name}-x", seed=10 + i)
    ids = list(folders)  # 7 adapters, 2 device slots, host memory for about 3 of them
    with _store(tiny_model, tmp_path, num_host=1) as store:
        for name, folder in folders.items():
            _register(store, name, folder)
        engine = _engine(tiny_model, store, slots=2)
        adapters: list[str | None] = [ids[i % len(ids)] for i in range(2 * len(ids))] + [None]
        prompts = [PROMPTS[i % 4] for i in range(len(adapters))]
        outs = engine.generate(prompts, GREEDY, adapters)
        assert all(o.finish_reason == "length" for o in outs)
        assert [o.token_ids for o in outs] == _sequential(engine, prompts, adapters)
        assert store.metrics().host.evictions > 0
    same_prompt = {tuple(o.token_ids) for o, p in zip(outs, prompts, strict=True) if p == PROMPTS[0]}
    assert len(same_prompt) > 2  # the adapters really differ


def test_an_engine_waiting_only_on_a_load_does_not_spin(
        tiny_model: Path, tiny_adapters: TinyAdapters, store: AdapterStore[LoRAWeights], tmp_path: Path) -> None:
    src = tiny_adapters.paths["count-r4"]
    shutil.copytree(src, tmp_path / "www" / "slow")
    with AdapterHTTPServer(tmp_path / "www") as server:
        server.header_delay_s = 1.0
        _register(store, "slow", f"{server.url}/slow", folder=src)
        engine = _engine(tiny_model, store)
        steps = 0
        schedule = engine.scheduler.schedule

        def counted() -> object:
            nonlocal steps
            steps += 1
            return schedule()

        engine.scheduler.schedule = counted  # type: ignore[method-assign]
        started = time.monotonic()
        out = engine.generate([PROMPTS[0]], GREEDY, ["slow"])[0]
        elapsed = time.monotonic() - started
    assert out.finish_reason == "length" and elapsed >= 1.0
    # at most a step every ~10 ms while the load runs, however long a busy machine makes it take (a
    # spinning loop makes tens of thousands a second), plus 8 tokens
    assert steps < 50 + 150 * elapsed, (steps, elapsed)


def test_a_request_behind_a_full_batch_finds_its_adapter_loaded_and_on_the_device(
        tiny_model: Path, tiny_adapters: TinyAdapters, store: AdapterStore[LoRAWeights]) -> None:
    for name in ("hot", "cold"):
        _register(store, name, tiny_adapters.paths["sea-r8" if name == "hot" else "count-r4"])
    store.get("hot")
    engine = LLMEngine(EngineConfig(model_path=tiny_model, max_num_seqs=1, max_model_len=128,
                                    max_adapter_slots=4, max_lora_rank=16), provider=store)
    first = engine.add_request(PROMPTS[0], GREEDY, "hot")
    waiting = engine.add_request(PROMPTS[1], GREEDY, "cold")
    engine.step()  # "first" runs alone; "waiting" cannot be admitted (max_num_seqs 1)
    assert store.state("cold") in (LoadState.LOADING, LoadState.READY)  # its load started meanwhile
    store.prefetch("cold").result(timeout=10)
    engine.step()  # the step copies it into a free device slot, still before admission
    assert [s.request_id for s in engine.scheduler.waiting] == [waiting]
    assert "cold" in engine.runner.slots.slot_of
    outputs = {}
    while engine.has_unfinished():
        outputs.update({o.request_id: o for o in engine.step()})
    assert outputs[first].finish_reason == outputs[waiting].finish_reason == "length"
    assert outputs[waiting].token_ids == engine.generate([PROMPTS[1]], GREEDY, ["cold"])[0].token_ids
