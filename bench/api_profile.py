"""Where the API process's Python goes per paid request: py-spy samples of the live API (engine in a
core process of its own) under bench/api.py's HTTP load, each sample put in the first area its stack
names from the innermost frame out (JSON, voucher check, hold, charge, receipt signing, tokenization,
the engine's wire, SSE, HTTP, asyncio, ...), as milliseconds per request of the thread holding the GIL,
with each process's CPU seconds per request beside them (bench/cpu_meter.py). On a busy box a thread
may be descheduled while it holds the GIL (psycopg's pipeline waits with it, too), so the samples add up
to more than the process's CPU: read them as shares of it.

    python bench/api_profile.py [--requests 256] [--rate 250] [--redis-url redis://127.0.0.1:6379/15]
(--redis-url: the free-work budgets count in that Redis, as replicas sharing one do)
Prints a table and writes bench/results/api_profile.json (needs py-spy; run as a user that may ptrace).
"""

from __future__ import annotations

import argparse
import collections
import json
import os
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT / "bench"))

import api  # noqa: E402  (bench/api.py)
import api_client  # noqa: E402  (bench/api_client.py)
from cpu_meter import CPUMeter, postgres_backends  # noqa: E402

from node.devkit.local_node import FIRST_USER  # noqa: E402

# (area, substrings of a py-spy frame "function (path:line)"); a sample goes to the area of its innermost
# frame that names one (the order of this table breaks ties within one frame only)
AREAS: list[tuple[str, tuple[str, ...]]] = [
    ("JSON encode/decode", ("json/", "orjson", "model_validate_json", "pydantic", "jsonable_encoder",
                            "json_dumps", "serialize_response")),
    ("voucher check", ("voucher_check.py", "protocol/voucher.py")),
    ("receipt signing", ("receipt_issuer.py", "protocol/receipt.py", "eip712.py")),
    ("hold (database)", ("reserve (node/payment/ledger.py", "hold (node/payment/service.py")),
    ("charge + receipt commit (database)", ("commit (node/payment/ledger.py", "finish (node/payment/service.py")),
    ("database driver", ("psycopg", "sqlalchemy", "lane_pg.py")),
    ("free-work budgets (and their Redis)", ("hang_up_budget.py", "shared_budget.py", "cold_load.py", "redis/")),
    ("tokenization", ("tokenizers", "transformers/", "encode_completion", "_tokenize")),
    ("engine wire (ZeroMQ, msgspec)", ("core_client.py", "wire.py", "zmq/", "delta_stream.py")),
    ("SSE chunks", ("choice.py", "_sse (node/api/generation.py")),
    ("metrics", ("prometheus_client", "node/api/metrics.py")),
    ("rest of the paid path (node/api)", ("node/api/",)),
    ("HTTP (uvicorn, h11/httptools, starlette, fastapi)", ("uvicorn/", "h11/", "httptools", "starlette/",
                                                          "fastapi/", "anyio/")),
    ("asyncio event loop", ("asyncio/", "uvloop")),
    ("threads (to_thread hops)", ("concurrent/futures", "threading.py")),
]


def area_of(stack: list[str]) -> str:
    for frame in reversed(stack):  # innermost first
        for area, marks in AREAS:
            if any(m in frame for m in marks):
                return area
    return "other"


def read_raw(path: Path) -> collections.Counter[str]:
    """py-spy's raw (collapsed) output: one `frame;frame;... count` line per distinct stack."""
    counts: collections.Counter[str] = collections.Counter()
    for line in path.read_text().splitlines():
        stack, _, n = line.rpartition(" ")
        if stack and n.isdigit():
            counts[area_of(stack.split(";"))] += int(n)
    return counts


class Sampled:
    """py-spy sampling this process (the API) while the CPU meter runs: from the client's "ready" on
    (its lanes learnt, its connections open), so the samples are of the timed requests only."""

    def __init__(self, out: Path, rate: int, meter: CPUMeter) -> None:
        self.out, self.rate, self.meter = out, rate, meter
        self.spy: subprocess.Popen[bytes] | None = None

    def __enter__(self) -> Sampled:
        self.spy = subprocess.Popen([shutil.which("py-spy") or str(Path(sys.executable).parent / "py-spy"), "record",
                                     "-p", str(os.getpid()), "--format", "raw", "--gil", "--nonblocking",
                                     "--rate", str(self.rate), "-o", str(self.out)], stdout=subprocess.DEVNULL,
                                    stderr=subprocess.DEVNULL)
        self.meter.__enter__()
        return self

    def __exit__(self, *exc: object) -> None:
        self.meter.__exit__(None, None, None)
        assert self.spy is not None
        self.spy.send_signal(2)  # SIGINT: py-spy writes what it has
        self.spy.wait(timeout=60)


def profiled(node: Any, db_url: str, spec: dict[str, Any], out: Path,
             rate: int) -> tuple[collections.Counter[str], dict[str, Any]]:
    """Run the client process `spec` against the node while py-spy samples this process (the API) over
    the timed requests (`Sampled`)."""
    core = node.services.engine.engine
    meter = CPUMeter({"api": [os.getpid()], "cores": core.pids, "postgres": postgres_backends(db_url)})
    result = api_client.client_process(spec, Sampled(out, rate, meter))  # type: ignore[arg-type]
    client = {"cpu_s": result[2]} if isinstance(result, tuple) else {}
    return read_raw(out), {"cpu_s": meter.seconds, "client": client}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--requests", type=int, default=256)
    ap.add_argument("--rate", type=int, default=250, help="py-spy samples per second")
    ap.add_argument("--database-url", default="postgresql+psycopg://postgres@127.0.0.1:5432/test")
    ap.add_argument("--raw-dir", type=Path, help="keep py-spy's raw stacks here (plain.txt, streamed.txt)")
    ap.add_argument("--redis-url", help="the budgets' counts in this Redis (node/api/shared_budget.py)")
    args = ap.parse_args()
    db_url = api._fresh_postgres(args.database_url)
    prompt, new, lanes = list(range(10, 42)), 32, min(args.requests, 128)
    report: dict[str, Any] = {"requests": args.requests, "new_tokens": new, "lanes": lanes, "rate": args.rate,
                              "budget_counts": "redis" if args.redis_url else "process"}
    with tempfile.TemporaryDirectory() as tmp:
        node, ids, model = api.setup(Path(tmp), db_url, 4)
        try:
            node.serve(model, engine_process=True, **({"broker_url": args.redis_url} if args.redis_url else {}))
            key = node.anvil.keys[FIRST_USER + 2]
            base = {"base_url": node.base_url, "key": key, "ids": ids, "prompt": prompt, "new": new, "lanes": lanes,
                    "keep_alive_s": node.settings.keep_alive_s}
            api.over_http_from_a_client_process(node, key, ids, 32, prompt, 4, lanes)  # warm up
            for mode, extra in (("plain", {}), ("streamed", {"ttft": True, "lanes": 16})):
                spec = {**base, "n": args.requests, **extra}
                raw = (args.raw_dir or Path(tmp)) / f"{mode}.txt"
                counts, cpu = profiled(node, db_url, spec, raw, args.rate)
                report[mode] = summarize(counts, cpu, args.requests, args.rate, args.requests * new)
        finally:
            node.stop()
    report["uptime"] = subprocess.run(["uptime"], capture_output=True, text=True).stdout.strip()
    print_table(report)
    out = ROOT / "bench" / "results" / "api_profile.json"
    out.write_text(json.dumps(report, indent=2) + "\n")
    print(f"wrote {out}")


def summarize(counts: collections.Counter[str], cpu: dict[str, Any], n: int, rate: int, tokens: int) -> dict[str, Any]:
    per_request_ms = {area: 1000 * c / rate / n for area, c in counts.most_common()}
    cpu_s = dict(cpu["cpu_s"])
    if "cpu_s" in cpu["client"]:
        cpu_s["client"] = cpu["client"]["cpu_s"]
    return {"python_ms_per_request": per_request_ms, "python_ms_per_request_total": sum(per_request_ms.values()),
            "cpu_ms_per_request": {k: 1000 * v / n for k, v in cpu_s.items()},
            "cpu_ms_per_token": {k: 1000 * v / tokens for k, v in cpu_s.items()}}


def print_table(report: dict[str, Any]) -> None:
    for mode in ("plain", "streamed"):
        r = report[mode]
        print(f"{mode}: API process holding the GIL, {r['python_ms_per_request_total']:.2f} ms per request")
        for area, ms in r["python_ms_per_request"].items():
            print(f"  {area:<52}{ms:>8.3f} ms")
        print("  CPU ms per request: " + ", ".join(f"{k} {v:.2f}" for k, v in r["cpu_ms_per_request"].items()))
    print(f"uptime: {report['uptime']}")


if __name__ == "__main__":
    main()
