"""CPUs of their own for the processes a benchmark compares, as if each ran on a machine of its own.

On a shared 2-CPU box "two replicas against one" means nothing while one replica (its API process and an
engine core with torch's default of one thread per CPU) can already take both CPUs: the second replica
only takes half of what the first had. Confining each replica's process tree to one CPU, and its engine
core to one thread (LORANODE_ENGINE_THREADS=1), gives each the same resources it would have alone, and
the one-replica arm the same one-CPU replica. What the replicas share (the client, HAProxy, PostgreSQL)
is left free to run on any CPU.

    cpus = one_cpu_each(2)                                  # [{0}, {1}]
    proc = subprocess.Popen(argv, preexec_fn=pin_at_start(cpus[0]))   # its children inherit the set
    pin_tree(proc.pid, cpus[0])                             # again, for every thread it and its children run
    tree_cpus(proc.pid)                                     # {pid: [0], ...}: what the kernel says now

Linux only (sched_setaffinity and /proc).
"""

from __future__ import annotations

import os
from collections.abc import Callable

from bench.cpu_meter import descendants


def usable_cpus() -> list[int]:
    """The CPUs this process may run on, in order."""
    return sorted(os.sched_getaffinity(0))


def one_cpu_each(n: int) -> list[set[int]]:
    """A CPU of its own for each of `n` process trees (the first `n` this process may use)."""
    cpus = usable_cpus()
    if len(cpus) < n:
        raise SystemExit(f"{n} replicas pinned to a CPU each need {n} CPUs; this process may use {cpus}")
    return [{cpu} for cpu in cpus[:n]]


def pin_at_start(cpus: set[int]) -> Callable[[], None]:
    """For subprocess.Popen(preexec_fn=...): the child, and all it starts, runs on `cpus` from its first instruction."""

    def pin() -> None:
        os.sched_setaffinity(0, cpus)

    return pin


def _threads(pid: int) -> list[int]:
    try:
        return [int(t) for t in os.listdir(f"/proc/{pid}/task")]
    except (FileNotFoundError, ProcessLookupError):
        return []


def tree(pid: int) -> list[int]:
    """`pid` and every process under it."""
    return [pid, *descendants(pid)()]


def pin_tree(pid: int, cpus: set[int]) -> int:
    """Every thread of `pid` and of the processes under it on `cpus` (sched_setaffinity sets one
    thread's); returns how many threads were set. A thread that ends meanwhile is skipped."""
    count = 0
    for proc in tree(pid):
        for tid in _threads(proc):
            try:
                os.sched_setaffinity(tid, cpus)
                count += 1
            except ProcessLookupError:
                continue
    return count


def tree_cpus(pid: int) -> dict[int, list[int]]:
    """The CPUs each process of the tree may run on now (its main thread's set)."""
    out: dict[int, list[int]] = {}
    for proc in tree(pid):
        try:
            out[proc] = sorted(os.sched_getaffinity(proc))
        except ProcessLookupError:
            continue
    return out
