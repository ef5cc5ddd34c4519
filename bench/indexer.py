"""Backfill throughput of the chain indexer: registry and escrow events from anvil into PostgreSQL.

Generates N events on a fresh anvil (datasets, adapters, deposits, thaws; many transactions per
block), then indexes them from an empty database and reports events/s with the RPC time and the
database time apart. Baseline in the same run: fetching and decoding the same logs with no database
(the RPC-bound ceiling); SQLite is shown too.

    python bench/indexer.py [--quick] [--events N] [--postgres URL]
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
import uuid
from dataclasses import dataclass
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

import psycopg
from eth_abi import encode as abi_encode
from eth_utils import keccak
from web3 import Web3

from node.chain.anvil import Anvil
from node.chain.deploy import Deployment, deploy_all
from node.chain.events import decode_log
from node.chain.indexer import IndexedContracts, Indexer, IndexerConfig
from node.chain.rpc import Rpc
from node.db.session import make_engine, session_factory, upgrade

RESULTS = Path(__file__).resolve().parent / "results" / "indexer.json"
DEFAULT_PG = "postgresql+psycopg://postgres@127.0.0.1:5432/test"
BATCH = 400  # transactions per JSON-RPC batch


@dataclass(frozen=True)
class Run:
    name: str
    events: int
    wall_s: float
    rpc_s: float
    db_s: float

    @property
    def events_per_s(self) -> float:
        return self.events / self.wall_s


def generate(chain: Anvil, num_events: int) -> Deployment:
    """Deploy, then send num_events event-emitting transactions with automine off, mined in blocks."""
    w3 = Web3(Web3.HTTPProvider(chain.rpc_url, request_kwargs={"timeout": 120}))
    chain.rpc("evm_setBlockGasLimit", hex(3_000_000_000))  # thousands of transactions per block
    accounts = w3.eth.accounts
    dep = deploy_all(w3, chain.keys[0], guardian=accounts[0], treasury=accounts[0], protocol_bps=100,
                     node_bps=500, thaw_period_s=60, challenge_period_s=60)
    senders, node = accounts[1:], accounts[0]
    _send(chain, w3, [Tx(a, dep.token, "mint(address,uint256)", (a, 10**30)) for a in senders]
          + [Tx(a, dep.token, "approve(address,uint256)", (dep.escrow, 2**256 - 1)) for a in senders])
    n = num_events // 10

    def who(i: int) -> str:
        return str(senders[i % len(senders)])
    _send(chain, w3, [Tx(who(i), dep.dataset_registry, "register(bytes32,string,address)",
                         (Web3.keccak(text=f"d{i}"), f"ipfs://d{i}", who(i))) for i in range(4 * n)]
          + [Tx(who(i), dep.escrow, "deposit(address,uint256)", (node, 10**18 + i)) for i in range(4 * n)])
    adapter = "register(bytes32,bytes32,string,uint256[],uint16[],uint16)"
    _send(chain, w3, [Tx(who(i), dep.adapter_registry, adapter,
                         (Web3.keccak(text="base"), Web3.keccak(text=f"a{i}"), f"file:///a{i}",
                          [1 + i % (4 * n), 1 + (i + 1) % (4 * n)], [5_000, 5_000], 1_000)) for i in range(n)]
          + [Tx(who(i), dep.escrow, "thaw(address,uint256)", (node, i + 1))
             for i in range(num_events - 9 * n)])
    return dep


@dataclass(frozen=True)
class Tx:
    sender: str
    to: str
    signature: str
    args: tuple[Any, ...]

    def calldata(self) -> str:
        types = self.signature[self.signature.index("(") + 1:-1].split(",")
        return "0x" + (keccak(text=self.signature)[:4] + abi_encode(types, list(self.args))).hex()


def _send(chain: Anvil, w3: Web3, txs: list[Tx]) -> None:
    """Send from anvil's unlocked accounts in JSON-RPC batches, then mine until the pool is empty."""
    chain.rpc("evm_setAutomine", False)
    nonces = {a: w3.eth.get_transaction_count(a, "pending") for a in {t.sender for t in txs}}
    for i in range(0, len(txs), BATCH):
        calls = []
        for t in txs[i:i + BATCH]:
            calls.append(("eth_sendTransaction", [{"from": t.sender, "to": t.to, "gas": hex(400_000),
                                                   "nonce": hex(nonces[t.sender]), "data": t.calldata()}]))
            nonces[t.sender] += 1
        errors = [a for a in w3.provider.make_batch_request(calls) if "error" in a]
        if errors:
            raise RuntimeError(f"sending failed: {errors[0]}")
    while True:
        pool = w3.provider.make_request("txpool_status", [])["result"]
        if int(pool["pending"], 16) + int(pool["queued"], 16) == 0:
            break
        chain.rpc("evm_mine")
    chain.rpc("evm_setAutomine", True)


def index(name: str, chain: Anvil, dep: Deployment, db_url: str) -> Run:
    upgrade(db_url)
    factory = session_factory(make_engine(db_url))
    cfg = IndexerConfig(chain_id=dep.chain_id, confirmations=0, finality_depth=64, start_block=dep.from_block,
                        initial_range=50, max_range=100_000, target_logs=5_000)
    indexer = Indexer(cfg, Rpc(chain.rpc_url, timeout_s=120), factory, IndexedContracts.from_deployment(dep))
    events, rpc_s, db_s = 0, 0.0, 0.0
    start = time.perf_counter()
    while True:
        p = indexer.run_once()
        events, rpc_s, db_s = events + p.num_events, rpc_s + p.rpc_s, db_s + p.db_s
        if p.is_caught_up:
            break
    return Run(name, events, time.perf_counter() - start, rpc_s, db_s)


def fetch_only(chain: Anvil, dep: Deployment) -> Run:
    """The same logs fetched and decoded in the same ranges, nothing stored: the RPC ceiling."""
    rpc = Rpc(chain.rpc_url, timeout_s=120)
    roles = IndexedContracts.from_deployment(dep).roles()
    from node.chain.events import SPECS

    topics = sorted({s.topic0 for s in SPECS})
    head, step, events = rpc.block_number(), 5_000 // 200 or 1, 0
    start = time.perf_counter()
    block = dep.from_block
    while block <= head:
        to = min(head, block + step - 1)
        logs = rpc.logs(block, to, sorted(roles), topics)
        events += sum(decode_log(raw, dep.chain_id) is not None for raw in logs)
        block = to + 1
    wall = time.perf_counter() - start
    return Run("fetch + decode only (no DB)", events, wall, wall, 0.0)


def _fresh_postgres(url: str) -> tuple[str, str]:
    name = f"loranode_bench_{uuid.uuid4().hex[:10]}"
    with psycopg.connect(url.replace("postgresql+psycopg://", "postgresql://"), autocommit=True) as conn:
        conn.execute(f'CREATE DATABASE "{name}"')
    return url.rsplit("/", 1)[0] + "/" + name, name


def _drop_postgres(url: str, name: str) -> None:
    with psycopg.connect(url.replace("postgresql+psycopg://", "postgresql://"), autocommit=True) as conn:
        conn.execute(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--quick", action="store_true", help="2,000 events instead of 20,000")
    ap.add_argument("--events", type=int, default=None)
    ap.add_argument("--postgres", default=os.environ.get("LORANODE_TEST_POSTGRES_URL", DEFAULT_PG))
    args = ap.parse_args()
    num = args.events or (2_000 if args.quick else 20_000)
    with Anvil(num_accounts=20) as chain:
        t0 = time.perf_counter()
        dep = generate(chain, num)
        gen_s = time.perf_counter() - t0
        runs = [fetch_only(chain, dep)]
        pg_url, name = _fresh_postgres(args.postgres)
        try:
            runs.append(index("indexer -> PostgreSQL", chain, dep, pg_url))
        finally:
            _drop_postgres(args.postgres, name)
        sqlite = Path(f"/tmp/loranode_bench_{uuid.uuid4().hex[:8]}.db")
        try:
            runs.append(index("indexer -> SQLite", chain, dep, f"sqlite:///{sqlite}"))
        finally:
            for suffix in ("", "-wal", "-shm"):
                Path(f"{sqlite}{suffix}").unlink(missing_ok=True)
    report(runs, num, gen_s)


def report(runs: list[Run], num: int, gen_s: float) -> None:
    base = runs[0].events_per_s
    print(f"indexer backfill: {num} events generated on anvil in {gen_s:.1f}s")
    print("(other s = decoding and Python between the RPC and the database)")
    print(f"{'run':30} {'events':>7} {'wall s':>7} {'rpc s':>6} {'db s':>6} {'other s':>7} {'events/s':>9} "
          f"{'vs fetch':>8}")
    for r in runs:
        print(f"{r.name:30} {r.events:7d} {r.wall_s:7.2f} {r.rpc_s:6.2f} {r.db_s:6.2f} "
              f"{r.wall_s - r.rpc_s - r.db_s:7.2f} {r.events_per_s:9.0f} {r.events_per_s / base:8.2f}")
    pg = next(r for r in runs if "PostgreSQL" in r.name)
    target = 2_000
    print(f"PostgreSQL backfill: {pg.events_per_s:.0f} events/s (target >= {target}: "
          f"{'met' if pg.events_per_s >= target else 'NOT met'})")
    RESULTS.parent.mkdir(parents=True, exist_ok=True)
    RESULTS.write_text(json.dumps({
        "events": num, "generate_s": round(gen_s, 2), "target_events_per_s": target,
        "runs": [{"name": r.name, "events": r.events, "wall_s": round(r.wall_s, 3),
                  "rpc_s": round(r.rpc_s, 3), "db_s": round(r.db_s, 3),
                  "events_per_s": round(r.events_per_s, 1),
                  "ratio_vs_fetch_only": round(r.events_per_s / base, 3)} for r in runs],
    }, indent=2) + "\n")
    print(f"wrote {RESULTS}")


if __name__ == "__main__":
    main()
