"""Starts the engine core processes, watches them, and starts a core again when it dies.

One watcher thread per core waits on its process. A core that exits while the node runs is reported
(`on_exit`: the client fails its requests in flight and stops routing to it) and started again after
a back-off that doubles while it keeps dying (up to `MAX_BACKOFF_S`); it serves again once its Ready
frame arrives (`CoreClient`). A core that dies before its first Ready fails `start` instead: a bad
model folder or config is reported at start, not retried forever.
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
from node.engine.core_process import CoreSpec
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


class CoreSupervisor:
    def __init__(self, specs: list[CoreSpec], on_exit: Callable[[int, int], None]) -> None:
        self.specs = specs
        self.on_exit = on_exit  # (core, exit code): called on the watcher thread
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
        deadline = time.monotonic() + timeout_s
        for core in self.cores:
            while not core.ever_ready.wait(0.1):
                if core.proc is not None and core.proc.poll() is not None and not core.ever_ready.is_set():
                    raise ConfigError(f"engine core {core.core} exited with {core.proc.returncode} before it "
                                      "was ready (its log says why)", core=core.core)
                if time.monotonic() > deadline:
                    raise ConfigError(f"engine core {core.core} was not ready within {timeout_s:.0f} s",
                                      core=core.core)

    def ready(self, core: int, incarnation: int) -> bool:
        """A Ready frame arrived; True if it is from the process running now (it then serves)."""
        c = self.cores[core]
        if incarnation != c.incarnation or c.exited_incarnation == incarnation:
            return False
        c.is_up = True
        c.ever_ready.set()
        return True

    def _spawn(self, core: CoreProcess) -> None:
        core.incarnation += 1
        core.is_up = False
        env = {**os.environ, "PYTHONPATH": os.pathsep.join(
            [str(Path(node.__file__).resolve().parent.parent), os.environ.get("PYTHONPATH", "")])}
        proc = subprocess.Popen([sys.executable, "-m", "node.engine.core_process", str(core.core),
                                 str(core.incarnation)], stdin=subprocess.PIPE, env=env)
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
            log.error("engine core %d (pid %d) exited with %d; its requests fail, starting it again",
                      core.core, core.proc.pid, code)
            self.on_exit(core.core, code)
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
