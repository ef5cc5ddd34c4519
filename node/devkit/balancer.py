"""HAProxy in front of API replicas on this machine, with the configuration the repository ships
(deploy/haproxy/haproxy.cfg) and a second file naming the replicas (what docker compose gets from
deploy/haproxy/compose-servers.cfg). For the tests and bench/replicas.py; needs the `haproxy` binary
(Debian package `haproxy`, 2.6 or later).

    with Balancer({"a": "127.0.0.1:8001", "b": "127.0.0.1:8002"}, workdir) as lb:
        lb.url                 # http://127.0.0.1:<port>: what clients call
        lb.states()            # {"a": "UP", "b": "DOWN"}: what the health checks say now

`balance="roundrobin"` keeps everything else and sends requests round robin instead of by adapter
(the baseline bench/replicas.py measures affinity against); `config=` another file in place of the
shipped one (an earlier version, to measure a change against).
"""

from __future__ import annotations

import csv
import io
import os
import shutil
import subprocess
import time
from dataclasses import dataclass, field
from pathlib import Path
from types import TracebackType

import httpx

from node.chain.anvil import free_port
from node.errors import ConfigError, Unavailable

SHIPPED_CONFIG = Path(__file__).resolve().parents[2] / "deploy" / "haproxy" / "haproxy.cfg"


def haproxy_binary() -> str:
    found = shutil.which("haproxy") or next((p for p in ("/usr/sbin/haproxy", "/usr/local/sbin/haproxy")
                                             if os.access(p, os.X_OK)), None)
    if found is None:
        raise ConfigError("haproxy is not installed (Debian: apt-get install -y haproxy)")
    return found


def servers_config(servers: dict[str, str], stats_port: int, balance: str | None = None,
                   backends: tuple[tuple[str, str], ...] = (("api", "replicas"), ("api_affine", "affine"))) -> str:
    """The backends of the shipped defaults (`name from defaults`: the bounded one and light load's)
    with these replicas in the same order, and a stats page on loopback."""
    lines: list[str] = []
    for i, (backend, defaults) in enumerate(backends):
        lines.append(f"backend {backend} from {defaults}")
        if balance is not None:
            lines.append(f"    balance {balance}")
        # the first backend checks each replica; the others follow its checks (one /ready per second, not two)
        check = "check" if i == 0 else f"track {backends[0][0]}/"
        lines += [f"    server {name} {address} {check}{name if i else ''}" for name, address in servers.items()]
        lines.append("")
    lines += ["frontend stats from replicas", f"    bind 127.0.0.1:{stats_port}", "    stats enable",
              "    stats uri /stats", "    stats refresh 1s", ""]
    return "\n".join(lines)


@dataclass
class Balancer:
    servers: dict[str, str]  # server name -> host:port of a replica
    workdir: Path
    balance: str | None = None  # None: the shipped hash on the adapter; e.g. "roundrobin"
    config: Path = SHIPPED_CONFIG  # the defaults and frontend (another file: a config to compare against)
    port: int = field(default_factory=free_port)
    stats_port: int = field(default_factory=free_port)
    proc: subprocess.Popen[bytes] | None = None

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    @property
    def log_path(self) -> Path:
        return self.workdir / "haproxy.log"

    def start(self, timeout_s: float = 20.0) -> Balancer:
        self.workdir.mkdir(parents=True, exist_ok=True)
        servers = self.workdir / "servers.cfg"
        # a config of before the light-load backend (--baseline-config) names only `api`
        backends = (("api", "replicas"),) + ((("api_affine", "affine"),) if "defaults affine" in self.config.read_text()
                                              else ())
        servers.write_text(servers_config(self.servers, self.stats_port, self.balance, backends))
        env = {**os.environ, "LORANODE_BALANCER_BIND": f"127.0.0.1:{self.port}"}
        argv = [haproxy_binary(), "-db", "-f", str(self.config), "-f", str(servers)]
        with self.log_path.open("ab") as log:
            self.proc = subprocess.Popen(argv, env=env, stdout=log, stderr=subprocess.STDOUT)
        deadline = time.monotonic() + timeout_s
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise ConfigError("haproxy exited at start", log=self.log_path.read_text()[-2_000:])
            try:
                self.states()
                return self
            except httpx.HTTPError:
                time.sleep(0.1)
        raise ConfigError(f"haproxy did not answer in {timeout_s}s", log=self.log_path.read_text()[-2_000:])

    def states(self) -> dict[str, str]:
        """Each replica's state as the health checks see it (UP, DOWN, ...)."""
        resp = httpx.get(f"http://127.0.0.1:{self.stats_port}/stats;csv", timeout=5)
        resp.raise_for_status()
        rows = csv.DictReader(io.StringIO(resp.text.lstrip("# ")))
        return {r["svname"]: r["status"].split()[0] for r in rows
                if r["pxname"] == "api" and r["svname"] in self.servers}

    def wait_states(self, expected: dict[str, str], timeout_s: float = 30.0) -> None:
        deadline = time.monotonic() + timeout_s
        while time.monotonic() < deadline:
            if {n: s for n, s in self.states().items() if n in expected} == expected:
                return
            time.sleep(0.2)
        raise Unavailable(f"haproxy's servers are {self.states()}, not {expected} after {timeout_s}s")

    def stop(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(timeout=10)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait(timeout=10)

    def __enter__(self) -> Balancer:
        return self.start()

    def __exit__(self, kind: type[BaseException] | None, exc: BaseException | None,
                 tb: TracebackType | None) -> None:
        self.stop()
