"""bench/cpu_pin.py: a process started on one CPU keeps it, and so do the processes it starts (as a
replica's engine cores); pin_tree moves every thread of the tree, and tree_cpus reports what the kernel says."""

from __future__ import annotations

import os
import subprocess
import sys
import time

import pytest

from bench.cpu_pin import one_cpu_each, pin_at_start, pin_tree, tree, tree_cpus, usable_cpus

# a parent that starts a child, both waiting (the child has a second thread)
PARENT = ("import subprocess, sys, time; subprocess.Popen([sys.executable, '-c', "
          "'import threading, time; threading.Thread(target=time.sleep, args=(60,)).start(); time.sleep(60)']); "
          "time.sleep(60)")


def _threads(pids: list[int]) -> list[int]:
    return [int(t) for pid in pids for t in os.listdir(f"/proc/{pid}/task")]


def _wait_for_child(pid: int) -> list[int]:
    """The tree once the child and its second thread run: three threads in all."""
    deadline = time.monotonic() + 20
    while len(_threads(procs := tree(pid))) < 3 and time.monotonic() < deadline:
        time.sleep(0.05)
    return procs


def test_a_tree_started_on_one_cpu_stays_there_until_pinned_elsewhere() -> None:
    first, second = one_cpu_each(2)
    proc = subprocess.Popen([sys.executable, "-c", PARENT], preexec_fn=pin_at_start(first))
    try:
        procs = _wait_for_child(proc.pid)
        assert len(procs) == 2 and {tuple(os.sched_getaffinity(t)) for t in _threads(procs)} == {tuple(first)}
        assert pin_tree(proc.pid, second) == 3  # the parent's thread, the child's two
        assert {tuple(os.sched_getaffinity(t)) for t in _threads(procs)} == {tuple(second)}
        assert set(map(tuple, tree_cpus(proc.pid).values())) == {tuple(second)}
    finally:
        for pid in reversed(tree(proc.pid)):
            subprocess.run(["kill", str(pid)], check=False)
        proc.wait(timeout=10)


def test_more_replicas_than_cpus_is_refused() -> None:
    with pytest.raises(SystemExit, match="need"):
        one_cpu_each(len(usable_cpus()) + 1)
