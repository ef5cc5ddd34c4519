"""The cost model (node/cost.py) and `loranode cost`: one loranode against N dedicated base-model
copies, from datasheet bandwidth, a GPU price and the measured multi-adapter overhead."""

from __future__ import annotations

import json
import math
from pathlib import Path

import pytest
from typer.testing import CliRunner

from node.cli import app
from node.cost import GPUS, Measured, ModelBytes, Workload, dedicated, llama_3_8b, loranode, mix
from node.errors import ConfigError

H100 = GPUS["h100"]
LLAMA = llama_3_8b(16)
PLAIN = Measured(1.0, 1.0, "test")


def _work(n: int, concurrency: float, spec: str = "uniform") -> Workload:
    return Workload(n, concurrency, mix(n, spec), 2048)


def test_mixes_are_shares_and_a_zipf_mix_is_hot_at_the_head() -> None:
    zipf = mix(10, "zipf:1.1")
    assert math.isclose(sum(zipf), 1.0) and list(zipf) == sorted(zipf, reverse=True) and zipf[0] > 3 * zipf[-1]
    assert mix(4, "uniform") == (0.25,) * 4
    with pytest.raises(ConfigError):
        mix(4, "pareto")


def test_dedicated_copies_hold_a_gpu_each_and_one_loranode_serves_them_all() -> None:
    work = _work(50, 32)
    one, many = loranode(H100, work, LLAMA, PLAIN), dedicated(H100, work, LLAMA, PLAIN)
    assert (one.num_gpus, many.num_gpus) == (1, 50)
    assert many.memory_bytes > 50 * LLAMA.weights > one.memory_bytes
    kv = 32 * 2048 * LLAMA.kv_per_token  # 32 sequences use at most 32 device slots; the rest wait in host memory
    assert one.memory_bytes == LLAMA.weights + 32 * LLAMA.adapter + kv
    assert one.usd_per_million_tokens * 10 < many.usd_per_million_tokens
    # each stream is slower on the shared GPU (a bigger batch per step), by the modeled step times
    assert one.ms_per_token > many.ms_per_token
    slower = loranode(H100, work, LLAMA, Measured(1.0, 2.0, "test"))
    assert math.isclose(slower.tokens_per_s * 2, one.tokens_per_s)
    half = Measured(0.5, 1.0, "test")  # half the datasheet bandwidth: half the tokens, twice the $
    assert math.isclose(dedicated(H100, work, LLAMA, half).usd_per_million_tokens, 2 * many.usd_per_million_tokens)


def test_a_thousand_adapters_take_only_the_device_slots_a_batch_can_use() -> None:
    """An operator's question: 1,000 customers' adapters (84 GB at rank 16) on one 80 GB GPU."""
    work = _work(1000, 64, "zipf:1.1")
    one, many = loranode(H100, work, LLAMA, PLAIN), dedicated(H100, work, LLAMA, PLAIN)
    assert 1000 * LLAMA.adapter > H100.memory_bytes
    assert (one.num_gpus, many.num_gpus) == (1, 1000)
    assert one.memory_bytes == LLAMA.weights + 64 * LLAMA.adapter + 64 * 2048 * LLAMA.kv_per_token


def test_traffic_beyond_one_gpus_kv_memory_takes_more_gpus_on_both_sides() -> None:
    work = _work(2, 2000)
    one, many = loranode(H100, work, LLAMA, PLAIN), dedicated(H100, work, LLAMA, PLAIN)
    assert one.num_gpus > 1 and many.num_gpus > 2
    huge = ModelBytes(weights=200 * 10**9, adapter=10**6, kv_per_token=10**5)
    with pytest.raises(ConfigError, match="do not fit"):
        loranode(H100, work, huge, PLAIN)


def test_the_cli_prints_the_model_with_its_inputs(tmp_path: Path, tiny_model: Path) -> None:
    measured = tmp_path / "cost.json"
    measured.write_text(json.dumps({"bandwidth_efficiency": 0.4, "adapter_overhead": 1.25, "source": "this test"}))
    runner = CliRunner()
    out = runner.invoke(app, ["cost", "--adapters", "20", "--concurrency", "16", "--gpu", "h200",
                              "--price-per-hour", "5", "--measured", str(measured)])
    assert out.exit_code == 0, out.output
    for fact in ("20 adapters", "16 sequences", "H200", "4.80 TB/s", "$5.00/h", "x1.250", "40% of datasheet",
                 "this test",
                 "loranode", "dedicated copies", "$ per M tokens"):
        assert fact in out.output, fact
    data = json.loads(runner.invoke(app, ["cost", "--json", "--model", str(tiny_model), "--rank", "4",
                                          "--measured", str(tmp_path / "none.json")]).output)
    assert data["inputs"]["measured"]["source"].startswith("not measured")
    assert data["inputs"]["measured"]["adapter_overhead"] == 1.0
    assert 0 < data["inputs"]["model_bytes"]["weights"] < 10**8
    assert data["dedicated"]["num_gpus"] == 100 and data["loranode"]["num_gpus"] == 1
    assert runner.invoke(app, ["cost", "--gpu", "tpu"]).exit_code != 0


def test_the_model_predicts_the_gpu_bench_step_it_was_fitted_beside() -> None:
    """bench/gpu.py measured Llama-3-8B shapes on an H200 at batch 64 and 128 tokens of context; the
    model, given the efficiency and overhead bench/cost.py takes from the same file, predicts the
    64-adapter step within 10 %."""
    root = Path(__file__).resolve().parent.parent / "bench" / "results"
    gpu_rows = json.loads((root / "gpu.json").read_text())["rows"]
    measured = json.loads((root / "cost.json").read_text())
    figures = Measured(measured["bandwidth_efficiency"], measured["adapter_overhead"], measured["source"])
    step_ms = next(r["step_ms"] for r in gpu_rows if (r["batch"], r["adapters"], r["int8"]) == (64, 64, False))
    work = Workload(64, 64, mix(64, "uniform"), 128)
    predicted = loranode(GPUS["h200"], work, LLAMA, figures).ms_per_token
    assert abs(predicted / step_ms - 1) < 0.10, (predicted, step_ms)
