"""Tensor parallelism (2 ranks, gloo) beyond the fast Llama case of test_tp_runner.py, all `slow`: Mistral
with 8 KV heads, Qwen2 (q/k/v bias, tied embeddings, a vocabulary padded to split), one KV head
replicated on both ranks, each token-identical to one rank and to transformers + peft; and an engine
core whose rank dies fails its requests and is started again by its supervisor."""

from __future__ import annotations

import os
import signal
import time
from pathlib import Path

import pytest

from node.devkit import make_tiny_model, train_tiny_adapter
from node.devkit.corpus import STYLES
from node.engine import EngineConfig, LLMEngine
from node.engine.sequence import RequestOutput
from tests.engine.test_tp_runner import CONFIG, GREEDY, LONG, _check_same_answers, _engine
from tests.fixtures.models import TinyAdapters


@pytest.fixture(scope="module")
def one_rank(tiny_model: Path, tiny_adapters: TinyAdapters) -> LLMEngine:
    return _engine(tiny_model, tiny_adapters.paths, 1)


def _shape_model(tmp_path: Path, shape: str) -> tuple[Path, dict[str, Path]]:
    kwargs = {"mistral-gqa-8kv": dict(arch="mistral", hidden_size=128, num_heads=16, num_kv_heads=8),
              "qwen2-bias-tied": dict(arch="qwen2", num_kv_heads=2, tie_embeddings=True, vocab_size=511),
              "llama-1kv-replicated": dict(arch="llama", num_kv_heads=1)}[shape]
    folder = make_tiny_model(tmp_path / "model", **kwargs, seed=3)  # type: ignore[arg-type]
    adapters = {
        "all7-r4": train_tiny_adapter(folder, tmp_path / "a", [STYLES["sea"]], rank=4, steps=1, seed=1).path,
        "qvo-r16": train_tiny_adapter(folder, tmp_path / "b", [STYLES["food"]], rank=16, steps=1, seed=2,
                                      target_modules=("q_proj", "v_proj", "o_proj")).path,
    }
    return folder, adapters


@pytest.mark.slow
@pytest.mark.parametrize("shape", ["mistral-gqa-8kv", "qwen2-bias-tied", "llama-1kv-replicated"])
def test_other_shapes_over_two_ranks_answer_as_one_rank_and_peft(shape: str, tmp_path: Path) -> None:
    folder, adapters = _shape_model(tmp_path, shape)
    one = _engine(folder, adapters, 1)
    split = _engine(folder, adapters, 2)
    try:
        _check_same_answers(folder, adapters, split, one)
    finally:
        split.shutdown()


def _tp_workers(pid: int) -> list[int]:
    """The tensor-parallel worker processes under an engine core (spawned by multiprocessing)."""
    children = Path(f"/proc/{pid}/task/{pid}/children").read_text().split()
    return [int(c) for c in children if b"spawn_main" in Path(f"/proc/{c}/cmdline").read_bytes()]


@pytest.mark.slow
def test_an_engine_core_whose_rank_dies_fails_its_requests_and_is_started_again(
        tiny_model: Path, tiny_adapters: TinyAdapters, one_rank: LLMEngine) -> None:
    from node.engine.core_client import CoreClient

    config = EngineConfig(model_path=tiny_model, tensor_parallel_size=2, **CONFIG)  # type: ignore[arg-type]
    client = CoreClient(config, num_cores=1, num_threads=1)
    client.start()
    try:
        client.add_adapter("sea-r8", str(tiny_adapters.paths["sea-r8"]))
        core = client.pids()[0]
        assert core is not None
        (worker,) = _tp_workers(core)
        results: list[RequestOutput] = []
        for i in range(3):
            client.add_request("The river runs", LONG, "sea-r8", f"doomed-{i}", waiter=results.append)
        os.kill(worker, signal.SIGKILL)
        deadline = time.monotonic() + 120
        while (len(results) < 3 or client.num_up < 1 or client.pids()[0] in (None, core)) \
                and time.monotonic() < deadline:
            time.sleep(0.1)
        assert [r.finish_reason for r in results] == ["error"] * 3
        assert client.num_up == 1 and client.pids()[0] not in (None, core), "the core was not started again"
        expected = one_rank.generate(["Seven small boats"], GREEDY, ["sea-r8"])[0]
        again = client.generate(["Seven small boats"] * 2, GREEDY, ["sea-r8"] * 2)
        assert all(o.token_ids == expected.token_ids for o in again)
        assert len(_tp_workers(client.pids()[0])) == 1  # type: ignore[arg-type]
    finally:
        client.shutdown()
