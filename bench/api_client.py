"""The paid HTTP client of bench/api.py, in a process of its own as a dApp's is.

`client_process(spec)` runs `python bench/api_client.py SPEC`: it learns each lane's charged total and
opens each lane's connection, says "ready", and on "go" sends the timed requests (or, with `"ttft"` in
the spec, the streamed ones whose time to first token it measures); it prints its result as JSON.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import aiohttp

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "bench"))

from cpu_meter import CPUMeter  # noqa: E402  (bench/cpu_meter.py, beside this file)

from node.client.payer import Payer  # noqa: E402

STOP_NEVER = "@@never@@"  # a stop string no tiny model writes: every request makes its max_tokens


async def over_http(client: aiohttp.ClientSession, payer: Payer, ids: list[int], n: int, prompt: list[int],
                    new: int, lanes: int) -> tuple[float, int]:
    """`n` paid requests on `lanes` lanes in parallel, on `client`'s open connections (the payer knows
    each lane's charged total, as a client in steady state does: see `know_lanes`)."""
    queue: asyncio.Queue[int] = asyncio.Queue()
    for i in range(n):
        queue.put_nowait(i)
    tokens = 0

    async def lane_worker(lane: int) -> None:
        nonlocal tokens
        while not queue.empty():
            i = queue.get_nowait()
            body = json.dumps({"model": str(ids[i % len(ids)]), "prompt": prompt, "max_tokens": new,
                               "temperature": 0, "stop": [STOP_NEVER]}).encode()
            header = payer.payment_header(body, lane)
            async with client.post("/v1/completions", data=body,
                                   headers={"X-Payment": header, "Content-Type": "application/json"}) as resp:
                resp.raise_for_status()
                payer.observe(lane, int(resp.headers["X-Charged-Total"]))
                tokens += (await resp.json())["usage"]["completion_tokens"]

    t = time.perf_counter()
    await asyncio.gather(*(lane_worker(lane) for lane in range(lanes)))
    return time.perf_counter() - t, tokens


def lane_client(base_url: str, lanes: int, keep_alive_s: float) -> aiohttp.ClientSession:
    """One keep-alive connection per lane. aiohttp (C parsers), not httpx (pure Python, ~5 ms of CPU per
    request here): this client shares the node's 2 CPUs, where a dApp's runs on a machine of its own
    (its CPU per token is reported beside the node's: `client`). An idle connection is let go a second
    before the API's keep-alive (`keep_alive_s`, LORANODE_KEEP_ALIVE_S) would close it, as a well-behaved
    client does: never a request sent on a connection the API is closing."""
    connector = aiohttp.TCPConnector(limit=lanes, keepalive_timeout=max(keep_alive_s - 1, 1))
    return aiohttp.ClientSession(base_url, connector=connector, timeout=aiohttp.ClientTimeout(total=600))


async def open_connections(client: aiohttp.ClientSession, lanes: int) -> None:
    """Open the lanes' connections before the clock starts (GET /health on each, all at once), as a client
    in steady state has them: the timed requests then cost what a request costs, not a TCP handshake."""
    async def one() -> None:
        async with client.get("/health") as resp:
            resp.raise_for_status()
            await resp.read()

    await asyncio.gather(*(one() for _ in range(lanes)))


def client_process(spec: dict[str, Any], meter: CPUMeter | None = None) -> Any:
    """Run `python bench/api_client.py SPEC`: it learns its lanes, says "ready", and starts on "go"
    (so that `meter` covers the timed requests only); returns what it prints last, as JSON."""
    proc = subprocess.Popen([sys.executable, __file__, json.dumps(spec)], stdin=subprocess.PIPE,
                            stdout=subprocess.PIPE, text=True)
    assert proc.stdin is not None and proc.stdout is not None
    try:
        while (line := proc.stdout.readline()) and line.strip() != "ready":
            pass
        with meter or contextlib.nullcontext():
            proc.stdin.write("go\n")
            proc.stdin.flush()
            last = proc.stdout.read().strip().splitlines()[-1]
        if proc.wait(timeout=1200) != 0:
            raise SystemExit(f"the client process failed ({proc.returncode})")
    finally:
        if proc.poll() is None:
            proc.kill()
    result = json.loads(last)
    return (result["wall_s"], result["tokens"], result["cpu_s"]) if "wall_s" in result else result


def client_main(spec_json: str) -> None:
    spec = json.loads(spec_json)
    payer = Payer(spec["key"], spec["base_url"], budget=10**15)
    know_lanes(payer, spec["lanes"])
    if spec.get("ttft"):
        print("ready", flush=True)
        sys.stdin.readline()
        times = asyncio.run(ttft_over_http(spec["base_url"], payer, spec["ids"], spec["n"], spec["prompt"],
                                           spec["new"], spec["lanes"], spec["keep_alive_s"]))
        print(json.dumps({"ttft_ms": times}))
        return
    print(json.dumps(asyncio.run(timed_client(spec, payer))))


async def timed_client(spec: dict[str, Any], payer: Payer) -> dict[str, float]:
    """Open the lanes' connections, say "ready", wait for "go", then send the timed requests."""
    async with lane_client(spec["base_url"], spec["lanes"], spec["keep_alive_s"]) as client:
        await open_connections(client, spec["lanes"])
        print("ready", flush=True)
        await asyncio.get_running_loop().run_in_executor(None, sys.stdin.readline)
        cpu = time.process_time()
        wall, tokens = await over_http(client, payer, spec["ids"], spec["n"], spec["prompt"], spec["new"],
                                       spec["lanes"])
        return {"wall_s": wall, "tokens": tokens, "cpu_s": time.process_time() - cpu}


async def ttft_over_http(base_url: str, payer: Payer, ids: list[int], n: int, prompt: list[int], new: int,
                         lanes: int, keep_alive_s: float) -> list[float]:
    """Time to the first text chunk (ms) of `n` paid streamed requests, `lanes` in flight."""
    queue: asyncio.Queue[int] = asyncio.Queue()
    for i in range(n):
        queue.put_nowait(i)
    times: list[float] = []

    async def lane_worker(lane: int, client: aiohttp.ClientSession) -> None:
        while not queue.empty():
            i = queue.get_nowait()
            body = json.dumps({"model": str(ids[i % len(ids)]), "prompt": prompt, "max_tokens": new, "stream": True,
                               "temperature": 0, "stop": [STOP_NEVER]}).encode()
            header = payer.payment_header(body, lane)
            started, first = time.perf_counter(), None
            async with client.post("/v1/completions", data=body,
                                   headers={"X-Payment": header, "Content-Type": "application/json"}) as resp:
                resp.raise_for_status()
                async for raw in resp.content:
                    line = raw.decode().rstrip("\n")
                    if first is None and line.startswith("data: {") and '"text":""' not in line:
                        first = time.perf_counter()
                    if line.startswith("data: {") and '"receipt"' in line:
                        payer.observe(lane, int(json.loads(line[6:])["receipt"]["chargedTotal"]))
            times.append(((first or time.perf_counter()) - started) * 1000)

    async with lane_client(base_url, lanes, keep_alive_s) as client:
        await open_connections(client, lanes)
        await asyncio.gather(*(lane_worker(lane, client) for lane in range(lanes)))
    return times


def know_lanes(payer: Payer, lanes: int) -> None:
    """Ask the node once for each lane's charged total (outside the timed runs: a client does it once
    per lane, then signs on top of the X-Charged-Total each answer brings)."""
    for lane in range(lanes):
        payer.channel(lane)


if __name__ == "__main__":
    client_main(sys.argv[1])
