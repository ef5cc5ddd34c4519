"""The node's processes as an operator runs them (`python -m node api|indexer|worker|beat`), each with
its own log file, so that a test can SIGKILL one and start it again."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
from dataclasses import dataclass, field
from pathlib import Path

REPO_ROOT = Path(__file__).resolve().parents[2]


@dataclass
class NodeProcess:
    """One long-running process; `argv` is run by this Python from the repository root."""

    name: str
    argv: tuple[str, ...]
    env: dict[str, str]
    log_path: Path
    proc: subprocess.Popen[bytes] | None = None
    num_starts: int = field(default=0)

    def start(self) -> NodeProcess:
        assert not self.is_alive, f"{self.name} is already running"
        self.log_path.parent.mkdir(parents=True, exist_ok=True)
        log = open(self.log_path, "ab")  # noqa: SIM115 - the child keeps it
        log.write(f"\n--- start {self.num_starts + 1} of {self.name}: {' '.join(self.argv)}\n".encode())
        log.flush()
        self.proc = subprocess.Popen([sys.executable, *self.argv], env=self.env, cwd=REPO_ROOT, stdout=log,
                                     stderr=subprocess.STDOUT)
        log.close()
        self.num_starts += 1
        return self

    @property
    def is_alive(self) -> bool:
        return self.proc is not None and self.proc.poll() is None

    @property
    def pid(self) -> int:
        assert self.proc is not None
        return self.proc.pid

    def kill(self) -> int:
        """SIGKILL: no cleanup, no goodbye. Returns the exit status (-9)."""
        assert self.proc is not None
        self.proc.send_signal(signal.SIGKILL)
        return self.proc.wait(timeout=30)

    def stop(self, timeout_s: float = 15.0) -> None:
        """SIGTERM, then SIGKILL if it does not exit in time."""
        if not self.is_alive:
            return
        assert self.proc is not None
        self.proc.terminate()
        try:
            self.proc.wait(timeout=timeout_s)
        except subprocess.TimeoutExpired:
            self.kill()

    def wait_exit(self, timeout_s: float) -> int:
        assert self.proc is not None
        try:
            return self.proc.wait(timeout=timeout_s)
        except subprocess.TimeoutExpired as exc:
            raise AssertionError(f"{self.name} did not exit in {timeout_s}s\n{self.log_tail()}") from exc

    def log_tail(self, num_chars: int = 4_000) -> str:
        if not self.log_path.exists():
            return f"[{self.name}: no log]"
        return f"[{self.name} log tail]\n" + self.log_path.read_text(errors="replace")[-num_chars:]


def node_command(kind: str) -> tuple[str, ...]:
    """`loranode <kind>` as a module run (the same code path as the installed CLI)."""
    return ("-m", "node", kind)


def child_env(settings_env: dict[str, str], **extra: str) -> dict[str, str]:
    env = {**os.environ, **settings_env, "PYTHONUNBUFFERED": "1", "HF_HUB_OFFLINE": "1", **extra}
    env.pop("LORANODE_CONFIG", None)
    return env
