"""The paid HTTP path against the engine in-process, data-parallel engine cores, and the cost of paying.

Same engine, same load: N requests (P-token prompts, M new tokens, one of A adapters each) through
(1) `LLMEngine.generate` in this process and (2) the live API over loopback HTTP with a signed voucher
per request and a receipt committed per response (L lanes in parallel), its engine in a core process
of its own (`engine_process`, the default of `loranode api`; `--in-process` puts it in the API's
process instead), with the same torch threads as (1). The HTTP client runs in a process
of its own, as a dApp does (it would otherwise take the API process's GIL from the engine thread), on
aiohttp; it learns each lane's charged total and opens each lane's connection before the clock starts.
The two arms alternate for `--rounds` rounds and each keeps its best (the machine is shared).

Then data parallelism: the same load through `CoreClient.generate` on one engine core and on two
(`--threads-per-core` torch threads each, 1 by default), alternated. Time to first token (p50/p99)
is measured on streamed requests for the engine in-process, over HTTP, and on one and two cores.

Then the payment path alone, per request on the configured database: voucher check (stateless),
hold, and charge + receipt commit; next to it, in the same run, the floor a durable commit puts
under any charge: one bare INSERT + COMMIT (the WAL flush) on the same database.

    python bench/api.py [--quick] [--rounds 3] [--in-process] [--threads-per-core 1] [--engine-threads N]
                        [--database-url postgresql+psycopg://postgres@127.0.0.1:5432/test]
Prints a table and writes bench/results/api.json.
"""

from __future__ import annotations

import argparse
import functools
import json
import os
import statistics
import subprocess
import sys
import tempfile
import threading
import time
import uuid
from pathlib import Path
from typing import Any

import torch

# torch's OpenMP threads sleep between parallel regions, in this process (the in-process engine) as in
# the core processes (node/engine/core_supervisor.py): same threads, same policy (set
# OMP_WAIT_POLICY in the environment to measure another).
os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")
ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "bench"))

import engine_cores  # noqa: E402  (bench/engine_cores.py, beside this file)
from api_client import STOP_NEVER, client_process  # noqa: E402
from cpu_meter import CPUMeter, postgres_backends  # noqa: E402

from node.api.wiring import engine_config, store_config  # noqa: E402
from node.client.payer import Payer  # noqa: E402
from node.devkit import make_tiny_model, train_tiny_adapter  # noqa: E402
from node.devkit.corpus import STYLES  # noqa: E402
from node.devkit.local_node import FIRST_USER, LocalNode  # noqa: E402
from node.engine import LLMEngine, SamplingParams  # noqa: E402
from node.engine.core_client import CoreClient  # noqa: E402
from node.engine.core_process import adapter_store  # noqa: E402
from node.lora.content_hash import adapter_weights_sha256, base_model_id, dataset_content_hash  # noqa: E402
from node.lora.provider import AdapterSource  # noqa: E402

TTFT_CONCURRENCY = 16  # streamed requests in flight while time to first token is measured


def _fresh_postgres(url: str) -> str:
    import psycopg

    name = f"loranode_bench_{uuid.uuid4().hex[:8]}"
    with psycopg.connect(url.replace("postgresql+psycopg://", "postgresql://"), autocommit=True) as conn:
        conn.execute(f'CREATE DATABASE "{name}"')
    return url.rpartition("/")[0] + "/" + name


def setup(work: Path, db_url: str | None, num_adapters: int) -> tuple[LocalNode, list[int], Path]:
    node = LocalNode.start_chain(work, database_url=db_url, prompt_token_price=10**9, completion_token_price=10**9,
                                 max_num_seqs=64, max_in_flight=1024, max_adapter_slots=max(num_adapters, 1),
                                 indexer_process=True)  # `loranode indexer`, as deployed: not in the API's process
    model = make_tiny_model(work / "model", hidden_size=256, num_layers=4, num_heads=8, num_kv_heads=4,
                            vocab_size=2000)
    text = work / "data.txt"
    text.write_text(STYLES["sea"])
    c = node.contracts(FIRST_USER)
    ds = c.datasets.register(dataset_content_hash(text), text.as_uri(), c.client.address)
    owner = node.contracts(FIRST_USER + 1)
    ids = []
    for i in range(num_adapters):
        out = train_tiny_adapter(model, work / f"adapter-{i}", [STYLES["sea"]], rank=8, steps=1, seed=i).path
        ids.append(owner.adapters.register(base_model_id(model), adapter_weights_sha256(out), out.as_uri(), [ds],
                                           [10_000], 1_000))
    payer = node.contracts(FIRST_USER + 2)
    payer.token.mint(payer.client.address, 10**24)
    payer.escrow.deposit(node.contracts(0).client.address, 10**24, payer.token)
    node.wait_for_mirror()
    return node, ids, model


Engine = LLMEngine | CoreClient


def local_engine(node: LocalNode, ids: list[int]) -> LLMEngine:
    """An engine in this process with the API's config, its adapters registered as the API does."""
    svc = node.services
    assert svc is not None
    config = engine_config(node.settings)
    engine = LLMEngine(config, provider=adapter_store(store_config(node.settings), config))
    register(engine, node, ids)
    return engine


def register(engine: Engine, node: LocalNode, ids: list[int]) -> None:
    svc = node.services
    assert svc is not None
    for adapter_id in ids:
        view = svc.catalog.resolve(str(adapter_id)).lineage
        engine.provider.register(str(adapter_id), AdapterSource(view.uri, view.weights_sha256))


def in_process(engine: Engine, ids: list[int], n: int, prompt: list[int], new: int) -> tuple[float, int]:
    params = SamplingParams(max_tokens=new, temperature=0, stop=(STOP_NEVER,))
    t = time.perf_counter()
    outs = engine.generate([prompt] * n, params, [str(ids[i % len(ids)]) for i in range(n)])
    wall = time.perf_counter() - t
    return wall, sum(o.num_completion_tokens for o in outs)


def in_process_beside_python(engine: Engine, ids: list[int], n: int, prompt: list[int], new: int,
                             busy_ms: float = 1.0, every_ms: float = 5.0) -> float:
    """In-process tokens/s while another thread of the process runs `busy_ms` of pure Python every
    `every_ms` (what the API's loop and thread pool add per request, in kind): how much of the
    engine's step waits for the GIL. Compare with `in_process` in the same run."""
    stop = threading.Event()

    def neighbour() -> None:
        while not stop.is_set():
            end = time.perf_counter() + busy_ms / 1000
            while time.perf_counter() < end:
                pass
            time.sleep((every_ms - busy_ms) / 1000)

    thread = threading.Thread(target=neighbour, daemon=True)
    thread.start()
    try:
        wall, tokens = in_process(engine, ids, n, prompt, new)
    finally:
        stop.set()
        thread.join()
    return tokens / wall


def over_http_from_a_client_process(node: LocalNode, key: str, ids: list[int], n: int, prompt: list[int], new: int,
                                    lanes: int, meter: CPUMeter | None = None) -> tuple[float, int, float]:
    """`over_http` run by `python bench/api_client.py SPEC`: (wall s, tokens, client CPU s); `meter`
    reads the node's processes around the timed part only."""
    spec = {"base_url": node.base_url, "key": key, "ids": ids, "n": n, "prompt": prompt, "new": new, "lanes": lanes,
            "keep_alive_s": node.settings.keep_alive_s}
    return client_process(spec, meter)


def ttft_over_http_from_a_client_process(node: LocalNode, ids: list[int], n: int, prompt: list[int],
                                         new: int) -> dict[str, float]:
    spec = {"base_url": node.base_url, "key": node.anvil.keys[FIRST_USER + 2], "ids": ids, "n": n, "prompt": prompt,
            "new": new, "lanes": TTFT_CONCURRENCY, "ttft": True, "keep_alive_s": node.settings.keep_alive_s}
    return engine_cores.percentiles(client_process(spec)["ttft_ms"])


def _issue_out(issue: Any, fee: int) -> Any:
    return issue(fee, "out")


def payment_path(node: LocalNode, ids: list[int], payer_key: str, k: int) -> dict[str, float]:
    """Voucher check, hold, and charge + receipt commit, per request, without the engine (p50s in ms)."""
    from node.payment.service import Usage

    svc = node.services
    assert svc is not None
    adapter = svc.catalog.resolve(str(ids[0]))
    payer = Payer(payer_key, node.base_url, budget=10**15)
    checks, holds, commits = [], [], []
    for i in range(k):
        body = json.dumps({"model": str(ids[0]), "prompt": f"p{i}", "max_tokens": 8}).encode()
        header = payer.payment_header(body, lane=9_000)
        t0 = time.perf_counter()
        checked = svc.payments.check(header, body)
        t1 = time.perf_counter()
        hold = svc.payments.hold(checked, 10**10)
        t2 = time.perf_counter()
        usage = Usage(4, 8)
        issue = functools.partial(svc.generation.issuer.issue, checked.digest, adapter, usage)
        total, _ = svc.payments.finish(hold, usage, functools.partial(_issue_out, issue),  # type: ignore[arg-type]
                                       lambda r: {"receipt": r})
        t3 = time.perf_counter()
        payer.observe(9_000, total)
        checks.append((t1 - t0) * 1000)
        holds.append((t2 - t1) * 1000)
        commits.append((t3 - t2) * 1000)
    both = [a + b + c for a, b, c in zip(checks, holds, commits, strict=True)]
    return {"check_p50_ms": statistics.median(checks), "hold_p50_ms": statistics.median(holds),
            "check_and_hold_p50_ms": statistics.median(a + b for a, b in zip(checks, holds, strict=True)),
            "commit_p50_ms": statistics.median(commits), "payment_total_p50_ms": statistics.median(both),
            "payment_total_p99_ms": sorted(both)[int(0.99 * (len(both) - 1))]}


def durable_commit_floor(db_url: str | None, k: int) -> float:
    """p50 ms of one bare INSERT + COMMIT that waits for its WAL flush, on the same database: the
    floor under any durable charge (the hold's commit does not wait for it; the charge's must)."""
    if db_url is None:
        return 0.0
    import psycopg

    times = []
    with psycopg.connect(db_url.replace("postgresql+psycopg://", "postgresql://")) as conn:
        conn.execute("CREATE TABLE bench_commit_floor (x int)")
        conn.commit()
        for _ in range(k):
            t = time.perf_counter()
            conn.execute("INSERT INTO bench_commit_floor VALUES (1)")
            conn.commit()
            times.append((time.perf_counter() - t) * 1000)
        conn.execute("DROP TABLE bench_commit_floor")
        conn.commit()
    return statistics.median(times)


def best_of_rounds(node: LocalNode, engine: LLMEngine, ids: list[int], n: int, new: int, lanes: int,
                   rounds: int, db_url: str | None) -> tuple[list[dict[str, float]], dict[str, dict[str, float]]]:
    """The two arms alternated for `rounds` rounds; each row keeps its best round. Beside them, the CPU
    ms per token of each process of each arm, the least over the rounds (the load moves it little)."""
    prompt = list(range(10, 42))  # 32 tokens
    in_process(engine, ids, 8, prompt, 4)  # warm up
    key = node.anvil.keys[FIRST_USER + 2]
    best: dict[str, dict[str, float]] = {}
    cpu: dict[str, dict[str, float]] = {}
    served = node.services.engine.engine if node.services is not None else None
    for _ in range(rounds):
        meter = CPUMeter({"engine (this process)": [os.getpid()]})
        steps = engine.num_steps
        with meter:
            wall, tokens = in_process(engine, ids, n, prompt, new)
        runs = {"engine in-process": ({"wall_s": wall, "tokens": tokens, "engine_steps": engine.num_steps - steps},
                                      meter.seconds)}
        meter = CPUMeter({"api": [os.getpid()], "engine cores": served.pids if isinstance(served, CoreClient) else [],
                          "postgres": postgres_backends(db_url) if db_url else []})
        steps = served_steps(served)
        wall, tokens, client_cpu = over_http_from_a_client_process(node, key, ids, n, prompt, new, lanes, meter)
        runs["HTTP + vouchers + receipts"] = ({"wall_s": wall, "tokens": tokens, "client_cpu_s": client_cpu,
                                               "engine_steps": served_steps(served) - steps},
                                              {**meter.seconds, "client": client_cpu})
        for system, (run, seconds) in runs.items():
            run["tokens_per_s"] = run["tokens"] / run["wall_s"]
            run["tokens_per_step"] = run["tokens"] / max(run["engine_steps"], 1)
            if system not in best or run["tokens_per_s"] > best[system]["tokens_per_s"]:
                best[system] = {"system": system, **run}  # type: ignore[dict-item]
            mine = cpu.setdefault(system, {})
            for process, s in seconds.items():
                mine[process] = min(mine.get(process, float("inf")), 1000 * s / run["tokens"])
    return list(best.values()), cpu


def served_steps(served: LLMEngine | CoreClient | None) -> float:
    """The forward passes the API's engine has run so far (its cores', reported at once)."""
    if isinstance(served, CoreClient):
        served.refresh_metrics(timeout_s=5.0)
        return served.metrics.engine_stats().get("steps_total", 0.0)
    return float(served.num_steps) if served is not None else 0.0


def cpu_summary(cpu: dict[str, dict[str, float]]) -> dict[str, Any]:
    """CPU ms per token of each arm, and the ratio a box with no CPU to spare would show: in-process CPU
    per token over the node's over HTTP (API + cores + PostgreSQL; the client is the dApp's machine's)."""
    base = sum(cpu["engine in-process"].values())
    http = cpu["HTTP + vouchers + receipts"]
    node_side = sum(v for k, v in http.items() if k != "client")
    return {"cpu_ms_per_token": cpu, "in_process_total": base, "http_node_total": node_side,
            "http_node_and_client_total": node_side + http.get("client", 0.0),
            "cpu_bound_ratio": base / node_side}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--quick", action="store_true")
    ap.add_argument("--rounds", type=int, default=None, help="alternating rounds per arm (default 3; --quick 1)")
    ap.add_argument("--requests", type=int, default=None,
                    help="requests per arm (default 128; --quick 32); 128 lanes at most, one per request in flight")
    ap.add_argument("--database-url", default="postgresql+psycopg://postgres@127.0.0.1:5432/test",
                    help="a PostgreSQL server URL (a fresh database is made on it); 'sqlite' for SQLite")
    ap.add_argument("--in-process", action="store_true", help="the API's engine in its own process (the old way)")
    ap.add_argument("--threads-per-core", type=int, default=1, help="torch threads per core in the two-core run")
    ap.add_argument("--engine-threads", type=int, default=None,
                    help="torch threads of the engine in both arms of HTTP vs in-process (default: torch's)")
    args = ap.parse_args()
    n, new, k, num_adapters = (32, 16, 100, 4) if args.quick else (128, 32, 500, 8)
    n = args.requests or n
    rounds = args.rounds or (1 if args.quick else 3)
    lanes = min(n, 128)  # one lane per request in flight: twice the engine's 64 sequences, so it never idles
    db_url = None if args.database_url == "sqlite" else _fresh_postgres(args.database_url)
    load_before = os.getloadavg()
    prompt = list(range(10, 42))
    with tempfile.TemporaryDirectory() as tmp:
        node, ids, model = setup(Path(tmp), db_url, num_adapters)
        try:
            if args.engine_threads:  # the in-process engine's (this process's) and the core's alike
                torch.set_num_threads(args.engine_threads)
            node.serve(model, engine_process=not args.in_process, engine_threads=args.engine_threads)
            engine = local_engine(node, ids)
            rows, cpu = best_of_rounds(node, engine, ids, n, new, lanes, rounds, db_url)
            ttft = {"engine in-process": engine_cores.ttft(engine, ids, n, prompt, new, TTFT_CONCURRENCY),
                    "HTTP + vouchers + receipts": ttft_over_http_from_a_client_process(node, ids, n, prompt, new)}
            beside = max(in_process_beside_python(engine, ids, n, prompt, new) for _ in range(rounds))
            engine.shutdown()
            cores = engine_cores.one_vs_two(node.settings, lambda e: register(e, node, ids), ids, n, prompt, new,
                                            rounds, args.threads_per_core)
            pay = payment_path(node, ids, node.anvil.keys[FIRST_USER + 3 - 1], k)
            pay["durable_commit_floor_p50_ms"] = durable_commit_floor(db_url, k)
        finally:
            node.stop()
    ratio = rows[1]["tokens_per_s"] / rows[0]["tokens_per_s"]
    result = {"requests": n, "new_tokens": new, "lanes": lanes, "adapters": num_adapters, "rounds": rounds,
              "database": "sqlite" if db_url is None else "postgresql", "engine_process": not args.in_process,
              "engine_threads": args.engine_threads or torch.get_num_threads(),
              "rows": rows, "http_over_in_process": ratio, "cpu": cpu_summary(cpu), "ttft_ms": ttft,
              "data_parallel": cores, "payment": pay,
              "gil_probe": {"busy_ms": 1.0, "every_ms": 5.0, "in_process_tokens_per_s": beside,
                            "over_in_process": beside / rows[0]["tokens_per_s"]},
              "load_average_1m": {"before": load_before[0], "after": os.getloadavg()[0]}, "cpus": os.cpu_count(),
              "uptime": subprocess.run(["uptime"], capture_output=True, text=True).stdout.strip()}
    print_table(result)
    out = ROOT / "bench" / "results" / "api.json"
    out.write_text(json.dumps(result, indent=2) + "\n")
    print(f"wrote {out}")


def print_table(result: dict[str, Any]) -> None:
    print(f"{'system':<30}{'tokens/s':>12}{'tokens':>10}{'wall s':>10}{'steps':>8}{'tokens/step':>13}"
          f"   (best of {result['rounds']} rounds)")
    for r in result["rows"]:
        print(f"{r['system']:<30}{r['tokens_per_s']:>12.1f}{r['tokens']:>10}{r['wall_s']:>10.2f}"
              f"{r['engine_steps']:>8.0f}{r['tokens_per_step']:>13.1f}")
    where = "its own process" if result["engine_process"] else "the API's process"
    print(f"HTTP / in-process: {result['http_over_in_process']:.3f} (target >= 0.95; the API's engine in {where})")
    for system, t in result["ttft_ms"].items():
        print(f"  time to first token, {system}: p50 {t['p50']:.1f} ms, p99 {t['p99']:.1f} ms")
    c = result["cpu"]
    for system, per in c["cpu_ms_per_token"].items():
        print(f"  CPU ms per token, {system}: " + ", ".join(f"{k} {v:.3f}" for k, v in per.items()))
    print(f"CPU-bound ratio (in-process CPU per token / the node's over HTTP: API + cores + PostgreSQL): "
          f"{c['in_process_total']:.3f} / {c['http_node_total']:.3f} = {c['cpu_bound_ratio']:.3f}")
    engine_cores.print_table(result["data_parallel"])
    probe = result["gil_probe"]
    print(f"in-process beside a thread running Python {probe['busy_ms']:.0f} ms in every {probe['every_ms']:.0f} ms: "
          f"{probe['in_process_tokens_per_s']:.1f} tokens/s, {probe['over_in_process']:.3f} of in-process")
    pay = result["payment"]
    print(f"payment p50 on {result['database']}: check {pay['check_p50_ms']:.2f} ms + hold {pay['hold_p50_ms']:.2f} ms "
          f"+ commit {pay['commit_p50_ms']:.2f} ms = {pay['payment_total_p50_ms']:.2f} ms (target < 2 ms), "
          f"p99 {pay['payment_total_p99_ms']:.2f} ms; a bare durable commit: "
          f"{pay['durable_commit_floor_p50_ms']:.2f} ms")
    load = result["load_average_1m"]
    print(f"load average (1 min) {load['before']:.1f} -> {load['after']:.1f} on {result['cpus']} CPUs; "
          f"uptime at the end: {result['uptime']}")


if __name__ == "__main__":
    main()
