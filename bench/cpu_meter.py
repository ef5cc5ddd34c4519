"""CPU seconds each process of a benchmark spent during one timed run: a figure the machine's load
does not move (wall-clock ratios of several processes do, on a shared 2-CPU box).

    meter = CPUMeter({"api": [os.getpid()], "cores": client.pids, "postgres": postgres_backends(url)})
    with meter:
        run()
    meter.seconds   # {"api": 1.23, "cores": 4.56, "postgres": 0.4}

Each group is a list of process ids, or a callable giving one (cores restart with new ids); a process
that exits during the run is not counted (read it before it goes). Read from /proc/<pid>/stat (user + system
time of every thread of the process, in clock ticks), so no dependency and no sampling. `meter.box_seconds`
is what every CPU of the machine spent meanwhile (/proc/stat: all but idle and iowait), so that what
the groups do not account for (other users' processes) shows as box_seconds - sum(meter.seconds.values()).
"""

from __future__ import annotations

import os
from collections.abc import Callable, Iterable
from types import TracebackType

Pids = Iterable[int | None] | Callable[[], Iterable[int | None]]
TICKS_PER_S = os.sysconf("SC_CLK_TCK")


def cpu_seconds(pid: int) -> float | None:
    """user + system CPU seconds of the process so far; None if it is gone."""
    try:
        with open(f"/proc/{pid}/stat", "rb") as f:
            stat = f.read()
    except (FileNotFoundError, ProcessLookupError):
        return None
    fields = stat[stat.rindex(b")") + 2:].split()  # after "pid (comm) ": field 3 onwards
    return (int(fields[11]) + int(fields[12])) / TICKS_PER_S  # utime, stime: fields 14 and 15


def box_busy_seconds() -> float:
    """CPU seconds every CPU of the machine spent on anything but idling since boot (/proc/stat)."""
    with open("/proc/stat", "rb") as f:
        ticks = [int(t) for t in f.readline().split()[1:]]
    idle = ticks[3] + ticks[4]  # idle, iowait; guest time is counted in user already
    return (sum(ticks[:8]) - idle) / TICKS_PER_S


class CPUMeter:
    def __init__(self, groups: dict[str, Pids]) -> None:
        self.groups = groups
        self.seconds: dict[str, float] = {}
        self.box_seconds = 0.0
        self._before: dict[str, dict[int, float]] = {}
        self._box_before = 0.0

    def _read(self) -> dict[str, dict[int, float]]:
        now: dict[str, dict[int, float]] = {}
        for name, pids in self.groups.items():
            found = pids() if callable(pids) else pids
            now[name] = {pid: s for pid in found if pid is not None and (s := cpu_seconds(pid)) is not None}
        return now

    def __enter__(self) -> CPUMeter:
        self._before = self._read()
        self._box_before = box_busy_seconds()
        return self

    def __exit__(self, *_: type[BaseException] | BaseException | TracebackType | None) -> None:
        self.box_seconds = box_busy_seconds() - self._box_before
        after = self._read()
        # a process started during the run (a restarted core, a new database connection) counts whole
        self.seconds = {name: sum(s - self._before[name].get(pid, 0.0) for pid, s in after[name].items())
                        for name in self.groups}


def descendants(pid: int) -> Callable[[], list[int]]:
    """The processes `pid` started, and theirs (an API replica's engine cores)."""

    def pids() -> list[int]:
        found: list[int] = []
        todo = [pid]
        while todo:
            p = todo.pop()
            if p != pid:
                found.append(p)
            try:
                for task in os.listdir(f"/proc/{p}/task"):
                    with open(f"/proc/{p}/task/{task}/children") as f:
                        todo.extend(int(c) for c in f.read().split())
            except (FileNotFoundError, ProcessLookupError):
                continue
        return found

    return pids


def postgres_backends(url: str) -> Callable[[], list[int]]:
    """The server processes serving connections to the database of `url` (what its queries cost)."""
    import psycopg

    dsn = url.replace("postgresql+psycopg://", "postgresql://")
    name = dsn.rpartition("/")[2]

    def pids() -> list[int]:
        with psycopg.connect(dsn, autocommit=True) as conn:
            rows = conn.execute("SELECT pid FROM pg_stat_activity WHERE datname = %s AND pid <> pg_backend_pid()",
                                (name,)).fetchall()
        return [int(r[0]) for r in rows]

    return pids
