"""Tensor parallelism (2 ranks, gloo) beyond the fast Llama case of test_tp_runner.py, all `slow`: Mistral
with 8 KV heads, Qwen2 (q/k/v bias, tied embeddings, a vocabulary padded to split), one KV head
replicated on both ranks, Qwen3 (per-head q/k norms), Phi-3 (q/k/v and gate/up fused in its
checkpoint), Gemma 2 (soft-caps, sliding window) and Gemma 3 (local and global layers), each
token-identical to one rank and to transformers + peft; int8 weights on every rank; and an engine
core whose rank dies fails its requests and is started again by its supervisor."""

from __future__ import annotations

import os
import signal
import time
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file

from node.devkit import make_tiny_model, train_tiny_adapter
from node.devkit.corpus import STYLES
from node.devkit.tiny_adapter import ALL_TARGETS
from node.engine import EngineConfig, LLMEngine
from node.engine.sequence import RequestOutput
from tests.engine.test_tp_runner import CONFIG, GREEDY, LONG, PROMPTS, _check_same_answers, _engine, _generate
from tests.fixtures.models import TinyAdapters
from tests.models.test_phi3 import PHI3_TARGETS


@pytest.fixture(scope="module")
def one_rank(tiny_model: Path, tiny_adapters: TinyAdapters) -> LLMEngine:
    return _engine(tiny_model, tiny_adapters.paths, 1)


def _shape_model(tmp_path: Path, shape: str) -> tuple[Path, dict[str, Path]]:
    kwargs = {"mistral-gqa-8kv": dict(arch="mistral", hidden_size=128, num_heads=16, num_kv_heads=8),
              "qwen2-bias-tied": dict(arch="qwen2", num_kv_heads=2, tie_embeddings=True, vocab_size=511),
              "llama-1kv-replicated": dict(arch="llama", num_kv_heads=1),
              "qwen3-qk-norms": dict(arch="qwen3", random_norms=True),
              "phi3-fused": dict(arch="phi3"),
              "gemma2-softcaps": dict(arch="gemma2", attn_logit_softcapping=2.0, final_logit_softcapping=4.0,
                                      query_pre_attn_scalar=24, sliding_window=6, random_norms=True),
              "gemma3-local-global": dict(arch="gemma3_text", query_pre_attn_scalar=24, sliding_window=6,
                                          layer_types=["sliding_attention", "full_attention"], random_norms=True),
              }[shape]
    folder = make_tiny_model(tmp_path / "model", **kwargs, seed=3)  # type: ignore[arg-type]
    fused = kwargs["arch"] == "phi3"  # peft trains Phi-3's fused projections: all seven of ours, or q/k/v and o
    adapters = {
        "all7-r4": train_tiny_adapter(folder, tmp_path / "a", [STYLES["sea"]], rank=4, steps=1, seed=1,
                                      target_modules=PHI3_TARGETS if fused else ALL_TARGETS).path,
        "qvo-r16": train_tiny_adapter(folder, tmp_path / "b", [STYLES["food"]], rank=16, steps=1, seed=2,
                                      target_modules=("qkv_proj", "o_proj") if fused else ("q_proj", "v_proj",
                                                                                           "o_proj")).path,
    }
    return folder, adapters


@pytest.mark.slow
@pytest.mark.parametrize("shape", ["mistral-gqa-8kv", "qwen2-bias-tied", "llama-1kv-replicated", "qwen3-qk-norms",
                                   "phi3-fused", "gemma2-softcaps", "gemma3-local-global"])
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


def _mirrored_row_parallel(folder: Path) -> Path:
    """The model with each row of o and down holding its left half's values (mirrored, negated) on the
    right: every row's largest magnitude is on both ranks, so int8's scale per output row is the same
    whether a rank quantizes its half or one device the whole."""
    path = folder / "model.safetensors"
    weights = load_file(path)
    for name, tensor in weights.items():
        if name.endswith(("o_proj.weight", "down_proj.weight")):
            half = tensor.shape[1] // 2
            tensor[:, half:] = -tensor[:, :half].flip(1)
    save_file(weights, path, metadata={"format": "pt"})
    return folder


@pytest.mark.slow
def test_int8_weights_are_quantized_on_every_rank(tmp_path: Path) -> None:
    """Each rank quantizes its own slices: the split int8 model's logits are the int8 model's on one device
    (up to the CPU int8 kernel's bfloat16 activations, summed in another order), where a worker left in
    float would put them as far from it as the float model is. (Greedy answers are not compared: the
    bfloat16 rounding flips near ties.)"""
    folder = _mirrored_row_parallel(make_tiny_model(tmp_path / "model", arch="llama", seed=3))

    def first_logits(size: int, scheme: str) -> torch.Tensor:
        engine = LLMEngine(EngineConfig(model_path=folder, tensor_parallel_size=size, weight_quantization=scheme,
                                        **CONFIG))  # type: ignore[arg-type]
        try:
            outputs, logits = _generate(engine, PROMPTS, [None] * len(PROMPTS))
        finally:
            engine.shutdown()
        return torch.stack([logits[o.request_id][0] for o in outputs])  # the prompts' last positions

    floats, int8, split = first_logits(1, "none"), first_logits(1, "int8"), first_logits(2, "int8")
    quantization_error = (int8 - floats).abs().max().item()
    assert quantization_error > 0.01
    assert (split - int8).abs().max().item() < 0.5 * quantization_error
