"""A replica's clock set by the shared server's (node/shared_clock.py): read once a minute, followed
when the replica's own clock is stepped, and the last difference kept while the server cannot be read."""

from __future__ import annotations

from node.shared_clock import REFRESH_S, RETRY_S, SharedClock


class Server:
    def __init__(self, now: float) -> None:
        self.now, self.is_up, self.reads = now, True, 0

    def __call__(self) -> float:
        if not self.is_up:
            raise ConnectionError("the server is not there")
        self.reads += 1
        return self.now


def test_a_replica_runs_on_the_shared_clock_and_follows_a_step_of_its_own_within_a_refresh() -> None:
    own, server, mono = [1_000.0], Server(1_090.0), [0.0]
    clock = SharedClock(lambda: own[0], server, "server", monotonic=lambda: mono[0])
    assert clock() == 1_090.0 and server.reads == 1
    own[0] += 30
    server.now += 30
    mono[0] += 30
    assert clock() == 1_120.0 and server.reads == 1  # between reads: its own clock plus the difference
    own[0] -= 50  # NTP steps this replica's clock back
    mono[0] += REFRESH_S
    assert clock() == 1_120.0 and server.reads == 2


def test_while_the_server_cannot_be_read_the_last_difference_holds_and_none_at_first() -> None:
    own, server, mono = [1_000.0], Server(1_090.0), [0.0]
    server.is_up = False
    clock = SharedClock(lambda: own[0], server, "server", monotonic=lambda: mono[0])
    assert clock() == 1_000.0  # never read: the replica's own clock
    server.is_up = True
    mono[0] += RETRY_S
    assert clock() == 1_090.0
    server.is_up = False
    own[0] += 10
    mono[0] += REFRESH_S
    assert clock() == 1_100.0  # the read failed: the last difference
    server.is_up, server.now = True, 2_000.0
    mono[0] += RETRY_S
    assert clock() == 2_000.0


def test_a_difference_in_steps_of_the_resolution() -> None:
    clock = SharedClock(lambda: 0.0, lambda: 12.34, "server", resolution_s=1 / 16)
    assert clock() == 12.3125


def test_a_background_clock_never_waits_on_a_read_that_hangs() -> None:
    """The ledger's clock is read by the API's event loop: a database that stopped answering (a partition: no
    timeout but TCP's) must not hold it. The read runs on a thread; the caller goes on with the last difference."""
    import threading

    release, started = threading.Event(), threading.Event()

    def hanging() -> float:
        started.set()
        release.wait(10)
        return 2_000.0

    mono = [0.0]
    clock = SharedClock(lambda: 1_000.0, lambda: 1_090.0, "database", monotonic=lambda: mono[0], background=True)
    clock.measure()  # at start, in the caller's thread
    clock.reference = hanging
    mono[0] += REFRESH_S
    assert clock() == 1_090.0  # the read hangs on its thread; the last difference meanwhile
    assert started.wait(5)
    assert clock() == 1_090.0
    release.set()
    for _ in range(500):  # the read ends: the new difference
        if clock() == 2_000.0:
            break
        threading.Event().wait(0.01)
    assert clock() == 2_000.0
