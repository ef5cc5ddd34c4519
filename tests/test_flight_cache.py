"""The single-flight LRU: one load however many ask at once, a failed load told to every asker and tried
again, values a load says not to keep answered but not remembered, and the size bound kept."""

from __future__ import annotations

import threading
import time
from concurrent.futures import ThreadPoolExecutor

import pytest

from node.flight_cache import FlightCache

NUM_ASKING = 16


class Loads:
    """A load that counts its calls and gives `key * 10`, kept unless the key is negative."""

    def __init__(self, pause_s: float = 0.0) -> None:
        self.keys: list[int] = []
        self.pause_s = pause_s
        self.lock = threading.Lock()

    def __call__(self, key: int) -> tuple[int, bool]:
        with self.lock:
            self.keys.append(key)
        time.sleep(self.pause_s)
        return key * 10, key >= 0


def test_concurrent_askers_of_one_key_cost_one_load() -> None:
    cache: FlightCache[int, int] = FlightCache(100, lambda _: 1)
    loads, start = Loads(pause_s=0.2), threading.Barrier(NUM_ASKING)

    def ask(_: int) -> int:
        start.wait()
        return cache.get(7, loads)

    with ThreadPoolExecutor(NUM_ASKING) as pool:
        assert set(pool.map(ask, range(NUM_ASKING))) == {70}
    assert loads.keys == [7]
    assert cache.get(7, loads) == 70 and loads.keys == [7], "kept"


def test_at_most_max_loading_keys_load_at_once() -> None:
    cache: FlightCache[int, int] = FlightCache(100, lambda _: 1, max_loading=2)
    in_flight, most = 0, 0
    lock = threading.Lock()

    def load(key: int) -> tuple[int, bool]:
        nonlocal in_flight, most
        with lock:
            in_flight += 1
            most = max(most, in_flight)
        time.sleep(0.05)
        with lock:
            in_flight -= 1
        return key, True

    with ThreadPoolExecutor(8) as pool:
        assert list(pool.map(lambda k: cache.get(k, load), range(8))) == list(range(8))
    assert most == 2


def test_a_failed_load_reaches_every_asker_and_the_next_ask_loads_again() -> None:
    cache: FlightCache[int, int] = FlightCache(100, lambda _: 1)
    started, release = threading.Event(), threading.Event()

    def failing(key: int) -> tuple[int, bool]:
        started.set()
        release.wait(5)
        raise ConnectionError("the database went away")

    with ThreadPoolExecutor(2) as pool:
        leader = pool.submit(cache.get, 1, failing)
        started.wait(5)
        follower = pool.submit(cache.get, 1, Loads())  # follows the leader: never loads itself
        time.sleep(0.05)
        release.set()
        for asked in (leader, follower):
            with pytest.raises(ConnectionError):
                asked.result(5)
    assert cache.get(1, Loads()) == 10


def test_a_value_not_to_keep_is_answered_and_loaded_again_next_time() -> None:
    cache: FlightCache[int, int] = FlightCache(100, lambda _: 1)
    loads = Loads()
    assert (cache.get(-1, loads), cache.get(-1, loads)) == (-10, -10)
    assert loads.keys == [-1, -1] and len(cache) == 0


def test_the_least_recently_used_go_first_to_keep_within_the_size() -> None:
    cache: FlightCache[int, int] = FlightCache(30, lambda value: value // 10)  # key k weighs k
    loads = Loads()
    for key in (10, 15, 5):
        cache.get(key, loads)
    assert cache.size == 30
    cache.get(10, loads)  # used: 15 is now the least recent
    cache.get(12, loads)  # 15 goes: 5 + 10 + 12
    assert (len(cache), cache.size) == (3, 27)
    cache.get(10, loads)  # kept: no load
    cache.get(15, loads)  # 5 and 12 go: 10 + 15
    assert (len(cache), cache.size) == (2, 25)
    cache.get(10, loads)
    assert loads.keys == [10, 15, 5, 12, 15]
    cache.get(31, loads)
    cache.get(31, loads)
    assert loads.keys[-2:] == [31, 31] and cache.size == 25, "a value larger than the whole size is never kept"
