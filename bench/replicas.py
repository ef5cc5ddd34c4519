"""API replicas behind HAProxy (the shipped deploy/haproxy config): two replicas against one, and
adapter-affinity hashing against round robin, for the same Zipf traffic over many adapters.

Setup: anvil with the contracts, a tiny model, `--adapters` adapters (rank 8 on q and v, each its own
weights, about 64 KiB) registered on chain, a funded dApp, PostgreSQL, and two `loranode api`
processes (`python -m node api --port P`, each with its engine core process: `--in-process` keeps the
engine in the API's process) on the same database, each with a host cache for
`--host-adapters` adapters and a disk cache of its own.

Each replica has a CPU of its own, as it would on a machine of its own (`--pinning cpu`, the default;
bench/cpu_pin.py): its API process and engine cores are confined to one CPU and its engine core runs one
torch thread (LORANODE_ENGINE_THREADS=1); the client, HAProxy and PostgreSQL run on any CPU. The
one-replica arm gets the same one-CPU replica. `--pinning free` runs the replicas unconfined with torch's
default threads (on a 2-CPU box one replica then already takes most of the box, and two replicas share
what one had); `--pinning both` adds the one- and two-replica arms with the confinement lifted from the
same one-thread replicas, in the same interleaved rounds. Three balancers in front of them at once:

    one      HAProxy -> replica a only              (hash on the adapter)
    hash     HAProxy -> replicas a and b            (hash on the adapter, bounded load: the shipped config)
    rr       HAProxy -> replicas a and b            (`balance roundrobin`, all else the same)

Each arm runs `--lanes` lanes of streamed paid completions back to back, the adapter of each request
drawn from Zipf(`--zipf`) over all adapters, for `--seconds` after `--warmup` seconds; the arms
alternate for `--rounds` rounds and each keeps its best round. The client is one asyncio loop on raw
HTTP/1.1 keep-alive connections with every request's voucher signed before the timed part
(bench/zipf_client.py), and the indexer runs in a process of its own, so that the replicas get the CPU.
Per arm: completion tokens/s, requests/s, p50/p99 time to first token (first streamed event, as the
client sees it), the share of requests each replica served (HAProxy's X-Served-By), affinity (the
share of requests served by the replica that served their adapter most), the adapter hit rate:
1 - (adapter loads into host memory, read from each replica's /metrics) / requests served, the CPU
ms per completion token of each replica's API process and of its engine cores, HAProxy, PostgreSQL,
the indexer, anvil and this client (bench/cpu_meter.py: a figure the load of a shared box moves far
less than tokens/s), and the CPUs each of them kept busy with what the rest of the box took (other
users' processes) and left idle: the two-over-one ratio is the replicas' CPUs ratio times their CPU per
token ratio, and `box_ceiling_two_over_one` is what an idle box of this many CPUs allows at the CPU per
token measured (one replica alone on a CPU; two sharing all CPUs with the client, HAProxy, PostgreSQL).

    python bench/replicas.py [--adapters 1000] [--lanes 32] [--seconds 20] [--rounds 2] [--pinning cpu|free|both]
                             [--baseline-config old-haproxy.cfg]   # hash (and rr) again with that file
                             [--arms rr]                           # only some arms (the ratios need all three)
Prints a table (with `uptime` beside it: the machine is shared) and writes bench/results/replicas.json.
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
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import httpx
from prometheus_client.parser import text_string_to_metric_families

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from bench.api import _fresh_postgres  # noqa: E402
from bench.cpu_meter import CPUMeter, descendants, postgres_backends  # noqa: E402
from bench.cpu_pin import one_cpu_each, pin_at_start, pin_tree, tree_cpus, usable_cpus  # noqa: E402
from bench.replicas_setup import setup  # noqa: E402
from bench.zipf_client import Result, ZipfTraffic  # noqa: E402
from node.chain.anvil import free_port  # noqa: E402
from node.client.payer import Payer  # noqa: E402
from node.devkit.balancer import Balancer  # noqa: E402
from node.devkit.local_node import FIRST_USER, LocalNode, settings_env  # noqa: E402

RESULTS = ROOT / "bench" / "results" / "replicas.json"


@dataclass
class Arm:
    name: str
    balancer: Balancer
    replicas: list[str]  # base URLs behind it
    pids: dict[str, int]  # each replica's API process (its engine cores are its children)
    cpus: dict[str, set[int]] | None = None  # each replica's CPUs during this arm; None: left as they are
    rounds: list[dict[str, Any]] = field(default_factory=list)


def start_replica(node: LocalNode, model: Path, work: Path, name: str, host_bytes: int, slots: int,
                  engine_process: bool = True, cpus: set[int] | None = None) -> tuple[subprocess.Popen[bytes], str]:
    """A replica; with `cpus`, it and the engine cores it starts run on those CPUs, each core one thread."""
    settings = node.settings.model_copy(update={
        "model_path": model, "port": free_port(), "adapter_cache_dir": work / f"cache-{name}",
        "max_adapter_host_bytes": host_bytes, "max_adapter_slots": slots,
        "engine_process": engine_process, "engine_threads": 1 if cpus else None})
    env = {**os.environ, **settings_env(settings)}
    log = (work / f"api-{name}.log").open("wb")
    # a session of its own, as a replica on a machine of its own: the kernel shares CPU time between
    # sessions (autogroups), and this client's session is not the replica's
    proc = subprocess.Popen([sys.executable, "-m", "node", "api"], env=env, stdout=log, stderr=subprocess.STDOUT,
                            start_new_session=True, preexec_fn=pin_at_start(cpus) if cpus else None)
    url = f"http://127.0.0.1:{settings.port}"
    deadline = time.monotonic() + 180
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise SystemExit(f"replica {name} exited:\n{(work / f'api-{name}.log').read_text()[-2000:]}")
        try:
            if httpx.get(f"{url}/ready", timeout=2).status_code == 200:
                return proc, url
        except httpx.HTTPError:
            pass
        time.sleep(0.5)
    raise SystemExit(f"replica {name} was not ready")


def tier_misses(url: str) -> Counter[str]:
    """Adapter lookups each tier of this replica could not answer: host misses are loads into host
    memory (from its disk cache or the source), device misses loads into a device slot."""
    out = Counter[str]()
    for family in text_string_to_metric_families(httpx.get(f"{url}/metrics", timeout=10).text):
        if family.name == "loranode_adapter_tier_misses":
            out.update({s.labels["tier"]: int(s.value) for s in family.samples if s.labels.get("tier")})
    return out


def misses(urls: list[str]) -> Counter[str]:
    return sum((tier_misses(u) for u in urls), Counter[str]())


def _pct(xs: list[float], q: float) -> float:
    xs = sorted(xs)
    return 1000 * xs[int(q * (len(xs) - 1))] if xs else float("nan")


def confine(arm: Arm) -> dict[str, list[int]]:
    """Each replica of the arm (every thread of its API process and cores) on the arm's CPUs; what they are now."""
    now: dict[str, list[int]] = {}
    for name, pid in arm.pids.items():
        if arm.cpus is not None:
            pin_tree(pid, arm.cpus[name])
        sets = {tuple(c) for c in tree_cpus(pid).values()}
        assert len(sets) == 1, f"replica {name}'s processes run on different CPUs: {tree_cpus(pid)}"
        now[name] = list(sets.pop())
    return now


def measure(arm: Arm, traffic: ZipfTraffic, lanes: list[int], warmup: float, seconds: float,
            db_url: str, shared: dict[str, list[int | None]]) -> dict[str, Any]:
    cpus = confine(arm)
    asyncio.run(traffic.run(arm.balancer.url, traffic.presign(lanes, 0), warmup))  # signed as it goes
    signed = traffic.presign(lanes, traffic.per_lane)
    inline = traffic.signed_inline
    before = misses(arm.replicas)
    groups: dict[str, Any] = {}
    for name, pid in arm.pids.items():
        groups |= {f"replica {name} API": [pid], f"replica {name} cores": descendants(pid)}
    meter = CPUMeter({**groups, "haproxy": [arm.balancer.proc.pid if arm.balancer.proc else None],
                      "postgres": postgres_backends(db_url), **shared, "client (this process)": [os.getpid()]})
    failed = len(traffic.failures)
    started = time.monotonic()
    with meter:
        results = asyncio.run(traffic.run(arm.balancer.url, signed, seconds))
    wall = time.monotonic() - started
    used = {lane: traffic.per_lane - len(q) for lane, q in signed.items()}
    traffic.per_lane = max(traffic.per_lane, int(1.5 * max(used.values())) + 10)
    loads = misses(arm.replicas) - before
    ok = [r for r in results if r[0] == 200]
    tokens = sum(r[3] for r in ok)
    busy = {n: (meter.seconds[f"replica {n} API"] + meter.seconds[f"replica {n} cores"]) / wall for n in arm.pids}
    return {"requests": len(results), "served": len(ok), "wall_s": wall, "cpus": cpus,
            "served_by": {n: sum(r[4] == n for r in ok) / max(len(ok), 1) for n in arm.pids},
            "affinity": affinity(ok),
            "cpu_busy": busy, "cpus_used": cpus_used(meter, wall), "signed_in_loop": traffic.signed_inline - inline,
            "tokens_per_s": tokens / wall, "requests_per_s": len(ok) / wall,
            "ttft_p50_ms": _pct([r[1] for r in ok], 0.5), "ttft_p99_ms": _pct([r[1] for r in ok], 0.99),
            "latency_p50_ms": 1000 * statistics.median([r[2] for r in ok]) if ok else float("nan"),
            "host_loads": loads["host"], "device_loads": loads["device"],
            "hit_rate": 1 - loads["host"] / max(len(ok), 1),
            "cpu_ms_per_token": {k: 1000 * v / max(tokens, 1) for k, v in meter.seconds.items()},
            "statuses": {str(s): sum(r[0] == s for r in results) for s in sorted({r[0] for r in results})},
            "failures": traffic.failures[failed:]}


def affinity(ok: list[Result]) -> float:
    """The share of requests served by the replica that served their adapter most (1.0: every adapter on one)."""
    per_adapter: dict[int, Counter[str]] = {}
    for r in ok:
        per_adapter.setdefault(r[5], Counter())[r[4]] += 1
    return sum(max(c.values()) for c in per_adapter.values()) / max(len(ok), 1)


def cpus_used(meter: CPUMeter, wall: float) -> dict[str, float]:
    """CPUs each group kept busy on average during the run (CPU seconds / wall seconds), what the rest of
    the box took (other users' processes, steal) and what stayed idle; they add up to the box's CPUs."""
    out = {k: v / wall for k, v in meter.seconds.items()}
    out["other processes"] = max(meter.box_seconds / wall - sum(out.values()), 0.0)
    out["idle"] = max((os.cpu_count() or 1) - meter.box_seconds / wall, 0.0)
    return out


def replicas_cpu(r: dict[str, Any]) -> float:
    """CPU ms per token of the replicas (API processes and their engine cores) in one arm's run."""
    return sum(v for k, v in r["cpu_ms_per_token"].items() if k.startswith("replica"))


def uptime() -> str:
    return subprocess.run(["uptime"], capture_output=True, text=True).stdout.strip()


LABELS = {"one": "1 replica (hash)", "hash": "2 replicas, hash on adapter", "rr": "2 replicas, round robin",
          "one free": "1 replica, CPUs free", "hash free": "2 replicas, hash, CPUs free",
          "hash baseline": "2 replicas, hash, --baseline-config", "rr baseline": "2 replicas, rr, --baseline-config"}


def make_arms(own: dict[str, set[int]] | None, with_free: bool, baseline: Path | None, work: Path,
              urls: dict[str, str], pids: dict[str, int], names: set[str]) -> list[Arm]:
    """The arms over replicas a and b, each on its CPUs in `own` (None: left unconfined); `with_free`
    adds the one- and two-replica arms with the same replicas on every CPU, `baseline` a hash and a round
    robin arm whose HAProxy runs that file in place of deploy/haproxy/haproxy.cfg; only the arms in `names`."""
    servers = {n: u.removeprefix("http://") for n, u in urls.items()}
    one = Balancer({"a": servers["a"]}, work / "lb-one").start()
    hashed = Balancer(servers, work / "lb-hash").start()
    arms = [Arm("one", one, [urls["a"]], {"a": pids["a"]}, own),
            Arm("hash", hashed, list(urls.values()), pids, own),
            Arm("rr", Balancer(servers, work / "lb-rr", balance="roundrobin").start(), list(urls.values()), pids, own)]
    if baseline is not None:
        arms.append(Arm("hash baseline", Balancer(servers, work / "lb-baseline", config=baseline).start(),
                        list(urls.values()), pids, own))
        arms.append(Arm("rr baseline", Balancer(servers, work / "lb-rr-baseline", balance="roundrobin",
                                                config=baseline).start(), list(urls.values()), pids, own))
    if with_free:
        every = {n: set(usable_cpus()) for n in urls}
        arms += [Arm("one free", one, [urls["a"]], {"a": pids["a"]}, every),
                 Arm("hash free", hashed, list(urls.values()), pids, every)]
    for arm in arms:
        if arm.name.split()[0] not in names:
            arm.balancer.stop()
    arms = [arm for arm in arms if arm.name.split()[0] in names]
    for arm in arms:
        arm.balancer.wait_states({n: "UP" for n in arm.balancer.servers})
    return arms


def ratios(best: dict[str, dict[str, Any]]) -> dict[str, float]:
    if not {"one", "hash", "rr"} <= best.keys():  # --arms left one out
        return {}
    out = {"two_over_one": best["hash"]["tokens_per_s"] / best["one"]["tokens_per_s"],
           "hash_over_rr": best["hash"]["tokens_per_s"] / best["rr"]["tokens_per_s"],
           "cpu_bound_two_over_one": 2 * replicas_cpu(best["one"]) / replicas_cpu(best["hash"]),
           # tokens/s = CPUs the replicas got / their CPU per token: the wall-clock ratio is the product of these two
           "replicas_cpus_two_over_one": sum(best["hash"]["cpu_busy"].values()) / sum(best["one"]["cpu_busy"].values()),
           "cpu_per_token_one_over_two": replicas_cpu(best["one"]) / replicas_cpu(best["hash"]),
           "box_ceiling_two_over_one": box_ceiling(best)}
    if "hash free" in best:
        out["two_over_one_free"] = best["hash free"]["tokens_per_s"] / best["one free"]["tokens_per_s"]
    return out


def box_ceiling(best: dict[str, dict[str, Any]]) -> float:
    """Two replicas over one on this box with nothing else running, at the CPU per token measured: one
    replica has a CPU to itself (the client, HAProxy and PostgreSQL fit on the other), two share all
    the box's CPUs with them: cpus x (1 / (replicas' + the rest's ms per token of two)) / (1 / one's)."""
    shared = sum(v for k, v in best["hash"]["cpu_ms_per_token"].items() if not k.startswith("replica"))
    return (os.cpu_count() or 1) * replicas_cpu(best["one"]) / (replicas_cpu(best["hash"]) + shared)


def run(args: argparse.Namespace, work: Path) -> dict[str, Any]:
    db_url = _fresh_postgres(args.database_url)
    node, ids, model, nbytes = setup(work, db_url, args.adapters)
    own = dict(zip(("a", "b"), one_cpu_each(2), strict=True)) if args.pinning != "free" else None
    procs: dict[str, subprocess.Popen[bytes]] = {}
    arms: list[Arm] = []
    try:
        urls = {}
        for name in ("a", "b"):
            procs[name], urls[name] = start_replica(node, model, work, name, args.host_adapters * nbytes,
                                                    args.slots, not args.in_process, own and own[name])
        arms = make_arms(own, args.pinning == "both", args.baseline_config, work, urls,
                         {n: p.pid for n, p in procs.items()}, set(args.arms.split(",")))
        payer = Payer(node.anvil.keys[FIRST_USER + 2], urls["a"])
        traffic = ZipfTraffic(ids, args.zipf, payer, args.max_tokens)
        lanes = list(range(args.lanes))
        # what the replicas share besides PostgreSQL and HAProxy, in processes of their own as deployed
        anvil = node.anvil._proc
        shared = {"indexer": [p.pid for p in node._procs], "anvil": [anvil.pid if anvil else None]}
        loads = [uptime()]
        for _ in range(args.rounds):
            for arm in arms:
                arm.rounds.append(measure(arm, traffic, lanes, args.warmup, args.seconds, db_url, shared))
            loads.append(uptime())
        best = {arm.name: max(arm.rounds, key=lambda r: r["tokens_per_s"]) for arm in arms}
        return {"config": vars(args), "adapter_bytes": nbytes, "uptime": loads, "best": best,
                "rounds": {arm.name: arm.rounds for arm in arms}, **ratios(best)}
    finally:
        for arm in arms:
            arm.balancer.stop()
        for proc in procs.values():
            proc.terminate()
            proc.wait(timeout=30)
        node.stop()


def print_table(result: dict[str, Any]) -> None:
    print(f"{'arm':<30}{'tokens/s':>10}{'req/s':>8}{'TTFT p50':>10}{'TTFT p99':>10}{'hit rate':>10}{'affinity':>10}"
          f"{'loads host/dev':>16}  {'served by':<16}{'CPU busy':<18}statuses")
    for key, r in result["best"].items():
        shares = " ".join(f"{n} {v:.0%}" for n, v in r["served_by"].items())
        busy = " ".join(f"{n} {v:.2f}" for n, v in r["cpu_busy"].items())
        print(f"{LABELS[key]:<30}{r['tokens_per_s']:>10.1f}{r['requests_per_s']:>8.2f}{r['ttft_p50_ms']:>8.0f}ms"
              f"{r['ttft_p99_ms']:>8.0f}ms{r['hit_rate']:>10.1%}{r['affinity']:>10.1%}"
              f"{r['host_loads']:>10}/{r['device_loads']:<5}  {shares:<16}{busy:<18}"
              f"{r['statuses']}")
    for key, r in result["best"].items():
        for failure in r["failures"]:
            print(f"  failed, {LABELS[key]}: {failure}")
    if "two_over_one" not in result:
        return
    free = f"; CPUs free: {result['two_over_one_free']:.2f}x" if "two_over_one_free" in result else ""
    print(f"two replicas / one: {result['two_over_one']:.2f}x tokens/s{free}; hash / round robin: "
          f"{result['hash_over_rr']:.2f}x tokens/s (pinning: {result['config']['pinning']})")
    for key, r in result["best"].items():
        cpus = " ".join(f"{n} {c}" for n, c in r["cpus"].items())
        print(f"  CPU ms per token, {LABELS[key]} ({cpus}): "
              + ", ".join(f"{k} {v:.2f}" for k, v in r["cpu_ms_per_token"].items()))
    for key, r in result["best"].items():
        print(f"  CPUs used, {LABELS[key]}: " + ", ".join(f"{k} {v:.2f}" for k, v in r["cpus_used"].items())
              + f" (requests signed in the timed loop: {r['signed_in_loop']})")
    print(f"  CPU-bound two replicas / one (2 x the replicas' CPU per token of one / of two): "
          f"{result['cpu_bound_two_over_one']:.2f}x; two / one = the replicas' CPUs "
          f"{result['replicas_cpus_two_over_one']:.2f}x x their CPU per token "
          f"{result['cpu_per_token_one_over_two']:.2f}x;"
          f" ceiling of this box idle (client, HAProxy, PostgreSQL on the same CPUs): "
          f"{result['box_ceiling_two_over_one']:.2f}x")


def keep_logs(work: Path, to: Path) -> None:
    for log in [*work.glob("api-*.log"), *work.glob("lb-*/haproxy.log")]:
        target = to / log.relative_to(work)
        target.parent.mkdir(parents=True, exist_ok=True)
        target.write_bytes(log.read_bytes())


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--adapters", type=int, default=1000)
    ap.add_argument("--host-adapters", type=int, default=100, help="adapters each replica's host cache holds")
    ap.add_argument("--slots", type=int, default=16, help="adapter slots on each replica's device")
    ap.add_argument("--zipf", type=float, default=1.1)
    ap.add_argument("--in-process", action="store_true",
                    help="each replica's engine in its API process (default: a core process, as loranode api)")
    ap.add_argument("--lanes", type=int, default=32,
                    help="requests in flight: enough that two replicas each run a batch, not a few requests")
    ap.add_argument("--max-tokens", type=int, default=16)
    ap.add_argument("--warmup", type=float, default=5.0)
    ap.add_argument("--seconds", type=float, default=20.0)
    ap.add_argument("--rounds", type=int, default=2)
    ap.add_argument("--pinning", choices=("cpu", "free", "both"), default="cpu",
                    help="cpu: each replica on a CPU of its own, engines one thread (as on machines of their own); "
                         "free: unconfined, torch's default threads; both: cpu, and its arms again unconfined")
    ap.add_argument("--baseline-config", type=Path, default=None,
                    help="also a hash and a round robin arm whose HAProxy runs this file instead of the shipped one")
    ap.add_argument("--arms", default="one,hash,rr",
                    help="which arms to run, comma-separated (e.g. rr: round robin alone; the ratios need all three)")
    ap.add_argument("--keep", type=Path, default=None, help="keep the replicas' and HAProxy's logs in this folder")
    ap.add_argument("--database-url", default="postgresql+psycopg://postgres@127.0.0.1:5432/test")
    ap.add_argument("--out", type=Path, default=RESULTS)
    args = ap.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        try:
            result = run(args, Path(tmp))
        finally:
            if args.keep is not None:
                keep_logs(Path(tmp), args.keep)
    print_table(result)
    for line in result["uptime"]:
        print(f"uptime: {line}")
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(result, indent=2, default=str) + "\n")
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
