"""The paid HTTP path against the engine in-process, and the cost of paying per request.

Same engine, same load: N requests (P-token prompts, M new tokens, one of A adapters each) through
(1) `LLMEngine.generate` in-process and (2) the live API over loopback HTTP with a signed voucher per
request and a receipt committed per response (L lanes in parallel). Then the payment path alone:
voucher check + hold, and charge + receipt commit, timed per request on the configured database.

    python bench/api.py [--quick] [--database-url postgresql+psycopg://postgres@127.0.0.1:5432/test]
Prints a table and writes bench/results/api.json.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import statistics
import sys
import tempfile
import time
import uuid
from pathlib import Path

import httpx

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from node.client.payer import Payer  # noqa: E402
from node.devkit import make_tiny_model, train_tiny_adapter  # noqa: E402
from node.devkit.corpus import STYLES  # noqa: E402
from node.devkit.local_node import FIRST_USER, LocalNode  # noqa: E402
from node.engine import SamplingParams  # noqa: E402
from node.lora.content_hash import adapter_weights_sha256, base_model_id, dataset_content_hash  # noqa: E402

STOP_NEVER = "@@never@@"


def _fresh_postgres(url: str) -> str:
    import psycopg

    name = f"loranode_bench_{uuid.uuid4().hex[:8]}"
    with psycopg.connect(url.replace("postgresql+psycopg://", "postgresql://"), autocommit=True) as conn:
        conn.execute(f'CREATE DATABASE "{name}"')
    return url.rpartition("/")[0] + "/" + name


def setup(work: Path, db_url: str | None, num_adapters: int) -> tuple[LocalNode, list[int], Path]:
    node = LocalNode.start_chain(work, database_url=db_url, prompt_token_price=10**9, completion_token_price=10**9,
                                 max_num_seqs=64, max_in_flight=1024, max_adapter_slots=max(num_adapters, 1))
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


def in_process(node: LocalNode, ids: list[int], n: int, prompt: list[int], new: int) -> tuple[float, int]:
    svc = node.services
    assert svc is not None
    for adapter_id in ids:  # what the API does on a request's first sight of an adapter
        svc.catalog.resolve(str(adapter_id))
    engine = svc.engine.engine
    params = SamplingParams(max_tokens=new, temperature=0, stop=(STOP_NEVER,))
    t = time.perf_counter()
    outs = engine.generate([prompt] * n, params, [str(ids[i % len(ids)]) for i in range(n)])
    wall = time.perf_counter() - t
    return wall, sum(o.num_completion_tokens for o in outs)


async def over_http(node: LocalNode, payer: Payer, ids: list[int], n: int, prompt: list[int], new: int,
                    lanes: int) -> tuple[float, int]:
    """`n` paid requests on `lanes` lanes in parallel (the payer knows each lane's charged total, as a
    client in steady state does: see `know_lanes`)."""
    queue: asyncio.Queue[int] = asyncio.Queue()
    for i in range(n):
        queue.put_nowait(i)
    tokens = 0

    async def lane_worker(lane: int, client: httpx.AsyncClient) -> None:
        nonlocal tokens
        while not queue.empty():
            i = queue.get_nowait()
            body = json.dumps({"model": str(ids[i % len(ids)]), "prompt": prompt, "max_tokens": new,
                               "temperature": 0, "stop": [STOP_NEVER]}).encode()
            header = payer.payment_header(body, lane)
            resp = await client.post("/v1/completions", content=body,
                                     headers={"X-Payment": header, "Content-Type": "application/json"})
            resp.raise_for_status()
            payer.observe(lane, int(resp.headers["X-Charged-Total"]))
            tokens += resp.json()["usage"]["completion_tokens"]

    limits = httpx.Limits(max_connections=lanes, max_keepalive_connections=lanes)  # one connection per lane
    async with httpx.AsyncClient(base_url=node.base_url, timeout=600, limits=limits) as client:
        t = time.perf_counter()
        await asyncio.gather(*(lane_worker(lane, client) for lane in range(lanes)))
        return time.perf_counter() - t, tokens


def know_lanes(payer: Payer, lanes: int) -> None:
    """Ask the node once for each lane's charged total (outside the timed runs: a client does it once
    per lane, then signs on top of the X-Charged-Total each answer brings)."""
    for lane in range(lanes):
        payer.channel(lane)


def payment_path(node: LocalNode, ids: list[int], payer_key: str, k: int) -> dict[str, float]:
    """Voucher check + hold, and charge + receipt commit, per request, without the engine."""
    from node.payment.service import Usage

    svc = node.services
    assert svc is not None
    adapter = svc.catalog.resolve(str(ids[0]))
    payer = Payer(payer_key, node.base_url, budget=10**15)
    checks, commits = [], []
    for i in range(k):
        body = json.dumps({"model": str(ids[0]), "prompt": f"p{i}", "max_tokens": 8}).encode()
        header = payer.payment_header(body, lane=9_000)
        t0 = time.perf_counter()
        checked = svc.payments.check(header, body)
        hold = svc.payments.hold(checked, 10**10)  # type: ignore[arg-type]
        t1 = time.perf_counter()
        total, _ = svc.payments.finish(hold, adapter, Usage(4, 8), "out", lambda r: {"receipt": r})
        t2 = time.perf_counter()
        payer.observe(9_000, total)
        checks.append((t1 - t0) * 1000)
        commits.append((t2 - t1) * 1000)
    both = [a + b for a, b in zip(checks, commits, strict=True)]
    return {"check_and_hold_p50_ms": statistics.median(checks), "commit_p50_ms": statistics.median(commits),
            "payment_total_p50_ms": statistics.median(both),
            "payment_total_p99_ms": sorted(both)[int(0.99 * (len(both) - 1))]}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--quick", action="store_true")
    ap.add_argument("--database-url", default="postgresql+psycopg://postgres@127.0.0.1:5432/test",
                    help="a PostgreSQL server URL (a fresh database is made on it); 'sqlite' for SQLite")
    args = ap.parse_args()
    n, new, k, num_adapters = (32, 16, 100, 4) if args.quick else (128, 32, 500, 8)
    lanes = n  # one lane per request in flight: the same concurrency the in-process run gets
    db_url = None if args.database_url == "sqlite" else _fresh_postgres(args.database_url)
    with tempfile.TemporaryDirectory() as tmp:
        node, ids, model = setup(Path(tmp), db_url, num_adapters)
        try:
            node.serve(model)
            prompt = list(range(10, 42))  # 32 tokens
            in_process(node, ids, 8, prompt, 4)  # warm up
            wall_in, tok_in = in_process(node, ids, n, prompt, new)
            payer = Payer(node.anvil.keys[FIRST_USER + 2], node.base_url, budget=10**15)
            wall_http, tok_http = asyncio.run(over_http(node, payer, ids, n, prompt, new, lanes))
            pay = payment_path(node, ids, node.anvil.keys[FIRST_USER + 3 - 1], k)
        finally:
            node.stop()
    rows = [{"system": "engine in-process", "tokens_per_s": tok_in / wall_in, "tokens": tok_in, "wall_s": wall_in},
            {"system": "HTTP + vouchers + receipts", "tokens_per_s": tok_http / wall_http, "tokens": tok_http,
             "wall_s": wall_http}]
    ratio = rows[1]["tokens_per_s"] / rows[0]["tokens_per_s"]
    result = {"requests": n, "new_tokens": new, "lanes": lanes, "adapters": num_adapters,
              "database": "sqlite" if db_url is None else "postgresql", "rows": rows,
              "http_over_in_process": ratio, "payment": pay}
    print(f"{'system':<30}{'tokens/s':>12}{'tokens':>10}{'wall s':>10}")
    for r in rows:
        print(f"{r['system']:<30}{r['tokens_per_s']:>12.1f}{r['tokens']:>10}{r['wall_s']:>10.2f}")
    print(f"HTTP / in-process: {ratio:.3f} (target >= 0.9)")
    print(f"payment check+hold p50 {pay['check_and_hold_p50_ms']:.2f} ms, commit p50 {pay['commit_p50_ms']:.2f} ms, "
          f"total p50 {pay['payment_total_p50_ms']:.2f} ms (target < 2 ms), p99 {pay['payment_total_p99_ms']:.2f} ms "
          f"on {result['database']}")
    out = ROOT / "bench" / "results" / "api.json"
    out.write_text(json.dumps(result, indent=2) + "\n")
    print(f"wrote {out}")


if __name__ == "__main__":
    main()
