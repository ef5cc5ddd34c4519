"""Starts the engine core processes, watches them, and starts a core again when it dies.

One watcher thread per core waits on its process. A core that exits while the node runs is reported
(`on_exit`: the client fails its requests in flight and stops routing to it) and started again after
a back-off that doubles while it keeps dying (up to `MAX_BACKOFF_S`); it serves again once its Ready
frame arrives (`CoreClient`). A core that dies before its first Ready fails `start` instead: a bad
model folder or config is reported at start, not retried forever.

A core that is up but silent for `stall_timeout_s` (a step that hangs: it sends a frame at least every
`metrics_interval_s` while it runs, `heard` records them) is stalled: the watchdog kills it, and it is
reported and started again as a core that died, so its requests in flight end instead of waiting on it.
"""

from __future__ import annotations

import logging
import os
import pickle
import subprocess
import sys
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import node
from node.engine.core_process import CoreSpec, start_error_file
from node.errors import ConfigError

log = logging.getLogger(__name__)
MAX_BACKOFF_S = 30.0
STABLE_S = 30.0  # a core that ran this long before dying restarts at once


@dataclass
class CoreProcess:
    core: int
    incarnation: int = 0
    proc: subprocess.Popen[bytes] | None = None
    is_up: bool = False  # between its Ready and its exit (the client's router decides where requests go)
    ever_ready: threading.Event = field(default_factory=threading.Event)
    started_at: float = 0.0
    exited_incarnation: int = 0  # set (before `on_exit`) when that incarnation's process is gone
    heard_at: float = 0.0  # the last frame from the running incarnation (monotonic)
    stalled_incarnation: int = 0  # the incarnation the watchdog killed for its silence


class CoreSupervisor:
    def __init__(self, specs: list[CoreSpec], on_exit: Callable[[int, str], None],
                 stall_timeout_s: float = 60.0) -> None:
        if any(stall_timeout_s <= 2 * spec.metrics_interval_s for spec in specs):
            raise ConfigError("the engine's stall timeout must exceed twice its heartbeat interval",
                              stall_timeout_s=stall_timeout_s)
        self.specs, self.stall_timeout_s = specs, stall_timeout_s
        self.on_exit = on_exit  # (core, why it is gone): called on the watcher thread
        self.cores = [CoreProcess(i) for i in range(len(specs))]
        self._stopping = threading.Event()
        self._threads: list[threading.Thread] = []

    def start(self, timeout_s: float) -> None:
        """Start every core; returns once each has reported Ready (see `ready`), or raises ConfigError."""
        for core in self.cores:
            self._spawn(core)
            thread = threading.Thread(target=self._watch, args=(core,), name=f"engine-core-{core.core}-watch",
                                      daemon=True)
            self._threads.append(thread)
            thread.start()
        watchdog = threading.Thread(target=self._watchdog, name="engine-core-watchdog", daemon=True)
        self._threads.append(watchdog)
        watchdog.start()
        deadline = time.monotonic() + timeout_s
        for core in self.cores:
            while not core.ever_ready.wait(0.1):
                if core.proc is not None and core.proc.poll() is not None and not core.ever_ready.is_set():
                    why = start_error_file(self.specs[core.core].run_dir, core.core)
                    reason = why.read_text() if why.is_file() else "its log says why"
                    raise ConfigError(f"engine core {core.core} exited with {core.proc.returncode} before it "
                                      f"was ready: {reason}", core=core.core)
                if time.monotonic() > deadline:
                    raise ConfigError(f"engine core {core.core} was not ready within {timeout_s:.0f} s",
                                      core=core.core)

    def ready(self, core: int, incarnation: int) -> bool:
        """A Ready frame arrived; True if it is from the process running now (it then serves)."""
        c = self.cores[core]
        if incarnation != c.incarnation or c.exited_incarnation == incarnation:
            return False
        c.is_up, c.heard_at = True, time.monotonic()
        c.ever_ready.set()
        return True

    def heard(self, core: int, incarnation: int) -> None:
        """A frame arrived from this core (the client's receiver thread): it is not stalled."""
        c = self.cores[core]
        if c.incarnation == incarnation:
            c.heard_at = time.monotonic()

    def _watchdog(self) -> None:
        while not self._stopping.wait(min(1.0, self.stall_timeout_s / 4)):
            for core in self.cores:
                proc, silent = core.proc, time.monotonic() - core.heard_at
                if not core.is_up or proc is None or silent <= self.stall_timeout_s or proc.poll() is not None:
                    continue
                log.error("engine core %d (pid %d) sent nothing for %.1f s: stalled; killing it", core.core,
                          proc.pid, silent)
                core.stalled_incarnation = core.incarnation
                core.is_up = False
                proc.kill()

    def _spawn(self, core: CoreProcess) -> None:
        core.incarnation += 1
        core.is_up = False
        env = {**os.environ, "PYTHONPATH": os.pathsep.join(
            [str(Path(node.__file__).resolve().parent.parent), os.environ.get("PYTHONPATH", "")])}
        # torch's OpenMP threads sleep between parallel regions instead of spinning (unless the operator
        # says otherwise): a core shares its CPUs with the API process, and on a busy box a thread that
        # spins at a barrier while its partner is descheduled burns both (docs/engine.md: measured 20x)
        env.setdefault("OMP_WAIT_POLICY", "PASSIVE")
        # Each core in a session of its own: where the kernel groups CPU time by session (autogroup, on by
        # default in most distributions), cores left in the API's session would share one group's time
        # among them and the API, so N cores got one core's CPU (docs/engine.md, bench/engine_cores.py).
        # A core still exits once the API is gone (it watches its parent), and `stop` ends every core.
        proc = subprocess.Popen([sys.executable, "-m", "node.engine.core_process", str(core.core),
                                 str(core.incarnation)], stdin=subprocess.PIPE, env=env, start_new_session=True)
        assert proc.stdin is not None
        proc.stdin.write(pickle.dumps(self.specs[core.core]))
        proc.stdin.close()
        core.proc, core.started_at = proc, time.monotonic()
        log.info("engine core %d started (pid %d, incarnation %d)", core.core, proc.pid, core.incarnation)

    def _watch(self, core: CoreProcess) -> None:
        backoff = 0.5
        while True:
            assert core.proc is not None
            code = core.proc.wait()
            core.exited_incarnation = core.incarnation
            if self._stopping.is_set():
                return
            core.is_up = False
            if not core.ever_ready.is_set():
                return  # `start` reports it
            why = (f"stalled (no frame for {self.stall_timeout_s:.0f} s) and was killed"
                   if core.stalled_incarnation == core.incarnation else f"stopped (exit {code})")
            log.error("engine core %d (pid %d) %s; its requests fail, starting it again", core.core,
                      core.proc.pid, why)
            self.on_exit(core.core, why)
            backoff = 0.0 if time.monotonic() - core.started_at > STABLE_S else min(max(backoff * 2, 0.5),
                                                                                     MAX_BACKOFF_S)
            if self._stopping.wait(backoff):
                return
            self._spawn(core)

    def pids(self) -> list[int | None]:
        return [c.proc.pid if c.proc is not None and c.proc.poll() is None else None for c in self.cores]

    def stop(self, timeout_s: float = 10.0) -> None:
        """Wait for the cores to exit (after the client sent them Shutdown), then kill what is left."""
        self._stopping.set()
        deadline = time.monotonic() + timeout_s
        for core in self.cores:
            if core.proc is None:
                continue
            try:
                core.proc.wait(max(deadline - time.monotonic(), 0.1))
            except subprocess.TimeoutExpired:
                core.proc.kill()
                core.proc.wait()
        for thread in self._threads:
            thread.join(timeout=5)
