"""Where bench/api.py's HTTP burst waits, in the API process: the time from the client's start to each
request's arrival in `GenerationService.handle`, its place in the engine's queue (`EngineClient.submit`
returned: its hold committed), its output back from the engine core, its charge started, and its answer
ready; with the API's CPU per request. Arms alternate in one process on one node: the paid path's thread
count (`--payment-threads`), one HTTP burst each, after the same burst through the engine in-process.

The figures read with the wall clock's noise taken out: `admission p50` (a request's arrival to its place
in the engine's queue), `charge wait` (the engine's last output to the last charge's start: the charges
queued for a payment thread), `tail` (the engine's last output to the last answer).

    python bench/api_timeline.py [--rounds 3] [--payment-threads 6,16] [--switch-interval-ms 5]
Prints a line per burst (nothing is written).
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import tempfile
import time
from collections import defaultdict
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch

os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")
ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "bench"))

import api  # noqa: E402  (bench/api.py, beside this file)
from api_client import client_process  # noqa: E402

from node.api import engine_client, generation  # noqa: E402
from node.api.payment_threads import PaymentThreads  # noqa: E402
from node.devkit.local_node import FIRST_USER  # noqa: E402
from node.engine import core_client  # noqa: E402

MARKS: dict[str, list[float]] = defaultdict(list)


def _timed(cls: type, name: str, mark: str, after: bool) -> None:
    """Wrap `cls.name` to note perf_counter() in MARKS[mark] before (or `after`) each call."""
    original: Callable[..., Any] = getattr(cls, name)

    def timed(*args: Any, **kwargs: Any) -> Any:
        if not after:
            MARKS[mark].append(time.perf_counter())
        result = original(*args, **kwargs)
        if after:
            MARKS[mark].append(time.perf_counter())
        return result

    setattr(cls, name, timed)


def _timed_handle() -> None:
    original = generation.GenerationService.handle

    async def handle(*args: Any, **kwargs: Any) -> Any:
        MARKS["arrive"].append(time.perf_counter())
        try:
            return await original(*args, **kwargs)
        finally:
            MARKS["answer"].append(time.perf_counter())

    generation.GenerationService.handle = handle  # type: ignore[method-assign]


class _Go:
    """Notes when the client is told to start (bench/api_client.py's "go", its lanes learnt and its
    connections open) and this process's CPU time from then to the client's last answer."""

    def __enter__(self) -> _Go:
        MARKS["go"] = [time.perf_counter()]
        self.cpu_s = time.process_time()
        return self

    def __exit__(self, *exc: object) -> None:
        self.cpu_s = time.process_time() - self.cpu_s


def burst(node: Any, key: str, ids: list[int], prompt: list[int], n: int, new: int) -> dict[str, float]:
    MARKS.clear()
    spec = {"base_url": node.base_url, "key": key, "ids": ids, "n": n, "prompt": prompt, "new": new,
            "lanes": min(n, 128), "keep_alive_s": node.settings.keep_alive_s}
    go = _Go()
    wall, tokens, _client_cpu = client_process(spec, go)  # type: ignore[arg-type]
    cpu_ms = 1000 * go.cpu_s / n
    start = MARKS["go"][0]
    at = {k: sorted(1000 * (t - start) for t in v) for k, v in MARKS.items() if k != "go"}
    admission = statistics.median(s - a for a, s in zip(at["arrive"], at["submit"], strict=True))
    return {"tokens_per_s": tokens / wall, "api_cpu_ms_per_request": cpu_ms, "first_arrival_ms": at["arrive"][0],
            "last_arrival_ms": at["arrive"][-1], "first_queued_ms": at["submit"][0],
            "last_queued_ms": at["submit"][-1], "admission_p50_ms": admission,
            "last_output_ms": at["output"][-1], "charge_wait_ms": at["charge"][-1] - at["output"][-1],
            "tail_ms": at["answer"][-1] - at["output"][-1]}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--payment-threads", default="6,16", help="the arms: payment thread counts, comma-separated")
    ap.add_argument("--switch-interval-ms", type=float, default=5.0, help="sys.setswitchinterval in the API")
    ap.add_argument("--database-url", default="postgresql+psycopg://postgres@127.0.0.1:5432/test")
    args = ap.parse_args()
    arms = [int(t) for t in args.payment_threads.split(",")]
    _timed_handle()
    _timed(engine_client.EngineClient, "submit", "submit", after=True)
    _timed(core_client.CoreClient, "_on_finished", "output", after=False)
    _timed(generation.GenerationService, "_charge", "charge", after=False)
    sys.setswitchinterval(args.switch_interval_ms / 1000)
    n, new, prompt = 128, 32, list(range(10, 42))
    with tempfile.TemporaryDirectory() as tmp:
        node, ids, model = api.setup(Path(tmp), api._fresh_postgres(args.database_url), 8)
        try:
            torch.set_num_threads(1)
            node.serve(model, engine_process=True, engine_threads=1)
            engine = api.local_engine(node, ids)
            key = node.anvil.keys[FIRST_USER + 2]
            api.in_process(engine, ids, 8, prompt, 4)  # warm up both
            api.over_http_from_a_client_process(node, key, ids, 32, prompt, 4, 128)
            assert node.services is not None
            generation_service = node.services.generation
            for r in range(args.rounds):
                wall, tokens = api.in_process(engine, ids, n, prompt, new)
                print(f"round {r}: engine in-process {tokens / wall:.0f} tokens/s; load {os.getloadavg()[0]:.1f}")
                for threads in arms:
                    generation_service.threads = PaymentThreads(threads)
                    b = burst(node, key, ids, prompt, n, new)
                    print(f"  {threads:>2} payment threads: {b['tokens_per_s']:.0f} tokens/s "
                          f"({b['tokens_per_s'] * wall / tokens:.3f}x), API CPU {b['api_cpu_ms_per_request']:.2f} ms "
                          f"per request; arrivals {b['first_arrival_ms']:.0f}..{b['last_arrival_ms']:.0f} ms, "
                          f"queued {b['first_queued_ms']:.0f}..{b['last_queued_ms']:.0f} ms (admission p50 "
                          f"{b['admission_p50_ms']:.0f}), last output {b['last_output_ms']:.0f} ms, charge wait "
                          f"{b['charge_wait_ms']:.0f} ms, tail {b['tail_ms']:.0f} ms")
            engine.shutdown()
        finally:
            node.stop()


if __name__ == "__main__":
    main()
