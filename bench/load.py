"""A bounded load test on loopback: many lanes of paid requests against a live `loranode api` process.

Setup: anvil with the contracts, N adapters trained on a tiny model and registered, two funded dApps,
the indexer, and `python -m node api` as its own process (so its resident memory is its own). Then:
1. baseline: one lane, back to back, for a short while (unloaded latency and throughput);
2. load: L lanes per dApp, each sending requests back to back for --duration seconds (every 5th
   request streamed), over all adapters;
3. audit against the database: every 200 has its receipt, no receipt lacks a 200, and each lane's
   charged total == the sum of its receipts' fees == the sum of the fees the clients were told.

    python bench/load.py [--duration 300] [--lanes 16] [--adapters 4] [--max-tokens 16]
                         [--database-url postgresql+psycopg://postgres@127.0.0.1:5432/test | sqlite]
Prints a table and writes bench/results/load.json; exits 1 if the audit finds a lost or extra receipt.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from collections import Counter, defaultdict
from pathlib import Path
from typing import Any

import httpx
from sqlalchemy import select

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from bench.api import _fresh_postgres, setup  # noqa: E402
from bench.load_client import LoadClient, LoadShape, Outcome  # noqa: E402
from node.chain.anvil import free_port  # noqa: E402
from node.client.payer import Payer  # noqa: E402
from node.db.models import Lane, Receipt, Voucher  # noqa: E402
from node.db.session import make_engine, session_factory  # noqa: E402
from node.devkit.local_node import FIRST_USER, LocalNode, settings_env  # noqa: E402

DAPPS = (FIRST_USER + 2, FIRST_USER + 3)


def start_api(node: LocalNode, model: Path, log: Path) -> tuple[subprocess.Popen[bytes], str]:
    settings = node.settings.model_copy(update={"model_path": model, "port": free_port()})
    env = {**os.environ, **settings_env(settings)}
    proc = subprocess.Popen([sys.executable, "-m", "node", "api"], env=env, stdout=log.open("wb"),
                            stderr=subprocess.STDOUT)
    url = f"http://127.0.0.1:{settings.port}"
    deadline = time.monotonic() + 120
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise SystemExit("the API exited:\n" + "\n".join(log.read_text().splitlines()[-15:]))
        try:
            if httpx.get(f"{url}/ready", timeout=2).status_code == 200:
                return proc, url
        except httpx.HTTPError:
            pass
        time.sleep(0.5)
    proc.terminate()
    raise SystemExit("the API did not become ready")


def rss_mib(pid: int) -> float:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) / 1024
    return float("nan")


def fund_second_dapp(node: LocalNode) -> None:
    c = node.contracts(DAPPS[1])
    c.token.mint(c.client.address, 10**24)
    c.escrow.deposit(node.contracts(0).client.address, 10**24, c.token)
    node.wait_for_mirror()


async def timed_load(client: LoadClient, lanes: list[tuple[Payer, int]], duration_s: float,
                     pid: int) -> tuple[list[Outcome], float, list[float]]:
    samples: list[float] = []

    async def sample_rss() -> None:
        while True:
            samples.append(rss_mib(pid))
            await asyncio.sleep(5)

    sampler = asyncio.create_task(sample_rss())
    started = time.monotonic()
    outcomes = await client.run(lanes, duration_s)
    wall = time.monotonic() - started
    sampler.cancel()
    samples.append(rss_mib(pid))
    return outcomes, wall, samples


def summarize(outcomes: list[Outcome], wall_s: float) -> dict[str, Any]:
    ok = [o for o in outcomes if o.status == 200]
    latencies = sorted(o.latency_s for o in ok) or [float("nan")]
    statuses = Counter(o.status for o in outcomes)
    tokens = sum(o.completion_tokens for o in ok)
    return {"requests": len(outcomes), "served": len(ok), "streamed": sum(o.streamed for o in ok),
            "wall_s": wall_s, "tokens": tokens, "tokens_per_s": tokens / wall_s, "requests_per_s": len(ok) / wall_s,
            "p50_ms": 1000 * statistics.median(latencies), "p99_ms": 1000 * latencies[int(0.99 * (len(latencies) - 1))],
            "statuses": {str(k): v for k, v in sorted(statuses.items())},
            "error_rate": 1 - len(ok) / max(len(outcomes), 1)}


def audit(db_url: str, node: str, outcomes: list[Outcome]) -> dict[str, Any]:
    """Every 200 has its receipt; every receipt has its 200; charged totals == receipts == what clients saw."""
    factory = session_factory(make_engine(db_url, pooled=False))
    with factory() as s:
        receipts = {r: (p, lane, fee) for r, p, lane, fee in s.execute(
            select(Receipt.receipt_hash, Voucher.payer, Voucher.lane, Receipt.fee)
            .join(Voucher, Voucher.voucher_hash == Receipt.voucher_hash).where(Receipt.node == node.lower()))}
        charged = {(p, lane): total for p, lane, total in s.execute(
            select(Lane.payer, Lane.lane, Lane.charged_total).where(Lane.node == node.lower()))}
    ok = [o for o in outcomes if o.status == 200]
    seen = {o.receipt_id for o in ok}
    by_lane_db: dict[tuple[str, int], int] = defaultdict(int)
    for payer, lane, fee in receipts.values():
        by_lane_db[(payer, lane)] += fee
    by_lane_client: dict[tuple[str, int], int] = defaultdict(int)
    for o in ok:
        by_lane_client[(o.payer.lower(), o.lane)] += o.fee
    lanes = set(charged) | set(by_lane_db) | set(by_lane_client)
    mismatched = sorted(f"{p}:{lane}" for p, lane in lanes
                        if not charged.get((p, lane), 0) == by_lane_db[(p, lane)] == by_lane_client[(p, lane)])
    return {"responses_200": len(ok), "receipts_in_db": len(receipts),
            "lost_receipts": len(seen - set(receipts)), "receipts_without_a_200": len(set(receipts) - seen),
            "duplicate_receipt_ids": len(ok) - len(seen), "lanes": len(lanes), "lanes_mismatched": mismatched,
            "charged_total": sum(charged.values()), "sum_of_receipt_fees": sum(by_lane_db.values())}


def run(args: argparse.Namespace, work: Path) -> dict[str, Any]:
    db_url = None if args.database_url == "sqlite" else _fresh_postgres(args.database_url)
    node, ids, model = setup(work, db_url, args.adapters)
    api = None
    try:
        fund_second_dapp(node)
        api, url = start_api(node, model, work / "api.log")
        keys = node.anvil.keys
        payers = [Payer(keys[d], url, budget=10**15) for d in DAPPS]
        client = LoadClient(url, LoadShape(adapter_ids=tuple(ids), max_tokens=args.max_tokens))
        warmup = asyncio.run(client.run([(payers[0], 0)], 3.0))  # every adapter loads once
        baseline, base_wall, _ = asyncio.run(timed_load(client, [(payers[0], 1)], args.baseline, api.pid))
        lanes = [(p, 100 + lane) for p in payers for lane in range(args.lanes)]
        rss_start = rss_mib(api.pid)
        outcomes, wall, rss = asyncio.run(timed_load(client, lanes, args.duration, api.pid))
        result = {"duration_s": args.duration, "lanes": len(lanes), "dapps": len(payers), "adapters": args.adapters,
                  "max_tokens": args.max_tokens, "database": "sqlite" if db_url is None else "postgresql",
                  "baseline": summarize(baseline, base_wall), "load": summarize(outcomes, wall),
                  "rss_mib": {"start": rss_start, "end": rss[-1], "max": max(rss)}}
        result["audit"] = audit(node.settings.resolved_database_url(), node.contracts(0).client.address,
                                [*warmup, *baseline, *outcomes])
        return result
    finally:
        if api is not None:
            api.terminate()
            api.wait(timeout=30)
        node.stop()


def report(result: dict[str, Any]) -> None:
    base, load, rss, a = result["baseline"], result["load"], result["rss_mib"], result["audit"]
    print(f"{'phase':<22}{'lanes':>6}{'requests':>10}{'tokens/s':>10}{'req/s':>8}{'p50 ms':>9}{'p99 ms':>9}"
          f"{'errors':>8}  statuses")
    for name, lanes, r in (("baseline (1 lane)", 1, base), ("load", result["lanes"], load)):
        print(f"{name:<22}{lanes:>6}{r['requests']:>10}{r['tokens_per_s']:>10.1f}{r['requests_per_s']:>8.2f}"
              f"{r['p50_ms']:>9.0f}{r['p99_ms']:>9.0f}{r['error_rate']:>8.2%}  {r['statuses']}")
    print(f"load / baseline: tokens/s {result['throughput_ratio']:.2f}x, p50 latency {result['p50_ratio']:.2f}x")
    print(f"API RSS: start {rss['start']:.0f} MiB, end {rss['end']:.0f} MiB, max {rss['max']:.0f} MiB")
    print(f"audit: {a['responses_200']} answers with a receipt, {a['receipts_in_db']} receipts in the database, "
          f"lost {a['lost_receipts']}, without an answer {a['receipts_without_a_200']}, "
          f"{len(a['lanes_mismatched'])} of {a['lanes']} lanes mismatched; "
          f"charged {a['charged_total']} == receipts {a['sum_of_receipt_fees']}")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--duration", type=float, default=300.0, help="seconds of load (default 300)")
    ap.add_argument("--baseline", type=float, default=15.0, help="seconds of the one-lane baseline")
    ap.add_argument("--lanes", type=int, default=16, help="lanes per dApp (two dApps)")
    ap.add_argument("--adapters", type=int, default=4)
    ap.add_argument("--max-tokens", type=int, default=16)
    ap.add_argument("--database-url", default="postgresql+psycopg://postgres@127.0.0.1:5432/test",
                    help="a PostgreSQL server URL (a fresh database is made on it); 'sqlite' for SQLite")
    args = ap.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        result = run(args, Path(tmp))
    result["throughput_ratio"] = result["load"]["tokens_per_s"] / result["baseline"]["tokens_per_s"]
    result["p50_ratio"] = result["load"]["p50_ms"] / result["baseline"]["p50_ms"]
    report(result)
    out = ROOT / "bench" / "results" / "load.json"
    out.write_text(json.dumps(result, indent=2) + "\n")
    print(f"wrote {out}")
    a = result["audit"]
    if a["lost_receipts"] or a["receipts_without_a_200"] or a["duplicate_receipt_ids"] or a["lanes_mismatched"]:
        raise SystemExit("audit failed: a receipt was lost or a charge does not match its receipts")


if __name__ == "__main__":
    main()
