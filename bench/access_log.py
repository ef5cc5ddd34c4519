"""What uvicorn's access log costs the API process per request (LORANODE_ACCESS_LOG, off by default).

The same app (an empty JSON answer on POST) under uvicorn as `loranode api` runs it (uvloop, httptools,
log level INFO), once with the access log and once without, its log lines going where a container's
stdout goes (a pipe, read by another process); a client process sends `--requests` requests on
`--connections` keep-alive connections. The arms alternate for `--rounds` rounds; each keeps its least
server CPU per request (the box is shared).

    python bench/access_log.py [--requests 4000] [--connections 32] [--rounds 3]
"""

from __future__ import annotations

import argparse
import asyncio
import os
import socket
import subprocess
import sys
import time

SERVER = """
import sys, uvicorn
from starlette.applications import Starlette
from starlette.responses import JSONResponse
from starlette.routing import Route

async def answer(request):
    await request.body()
    return JSONResponse({"ok": True})

app = Starlette(routes=[Route("/v1/completions", answer, methods=["POST"])])
uvicorn.run(app, host="127.0.0.1", port=int(sys.argv[1]), log_level="info", access_log=sys.argv[2] == "on",
            loop="uvloop", http="httptools")
"""


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


async def client(port: int, requests: int, connections: int) -> None:
    import aiohttp

    body = b'{"model": "1", "prompt": "the sea", "max_tokens": 8}'
    queue: asyncio.Queue[int] = asyncio.Queue()
    for i in range(requests):
        queue.put_nowait(i)
    async with aiohttp.ClientSession(f"http://127.0.0.1:{port}",
                                     connector=aiohttp.TCPConnector(limit=connections)) as session:
        async def worker() -> None:
            while not queue.empty():
                queue.get_nowait()
                async with session.post("/v1/completions", data=body) as resp:
                    await resp.read()

        await asyncio.gather(*(worker() for _ in range(connections)))


def cpu_s(pid: int) -> float:
    with open(f"/proc/{pid}/stat") as stat:
        fields = stat.read().rpartition(")")[2].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def one_arm(access_log: str, requests: int, connections: int) -> float:
    """Server CPU ms per request."""
    port = free_port()
    server = subprocess.Popen([sys.executable, "-c", SERVER, str(port), access_log], stdout=subprocess.PIPE,
                              stderr=subprocess.STDOUT)
    sink = subprocess.Popen(["cat"], stdin=server.stdout, stdout=subprocess.DEVNULL)  # the container's log reader
    try:
        deadline = time.monotonic() + 30
        while True:
            try:
                socket.create_connection(("127.0.0.1", port), timeout=1).close()
                break
            except OSError:
                if time.monotonic() > deadline:
                    raise SystemExit("the server did not start") from None
                time.sleep(0.05)
        asyncio.run(client(port, 200, connections))  # warm up
        before = cpu_s(server.pid)
        asyncio.run(client(port, requests, connections))
        return 1000 * (cpu_s(server.pid) - before) / requests
    finally:
        server.terminate()
        server.wait()
        sink.wait()


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--requests", type=int, default=4000)
    ap.add_argument("--connections", type=int, default=32)
    ap.add_argument("--rounds", type=int, default=3)
    args = ap.parse_args()
    best: dict[str, float] = {}
    for _ in range(args.rounds):
        for arm in ("off", "on"):
            ms = one_arm(arm, args.requests, args.connections)
            best[arm] = min(best.get(arm, float("inf")), ms)
            print(f"access log {arm}: {ms:.3f} ms of server CPU per request")
    print(f"least of {args.rounds} rounds: off {best['off']:.3f} ms, on {best['on']:.3f} ms per request; the log "
          f"line costs {best['on'] - best['off']:.3f} ms; load average {os.getloadavg()[0]:.1f}, {os.cpu_count()} CPUs")


if __name__ == "__main__":
    main()
