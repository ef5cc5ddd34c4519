"""Routing requests to data-parallel cores: the cores stay even in queued tokens, an adapter's requests land
where its weights already are unless that costs more than loading them again, and a core that is down
gets nothing."""

from __future__ import annotations

import random
from collections import Counter

import pytest

from node.engine.core_router import CoreRouter
from node.errors import Unavailable


def _zipf_adapters(n: int, num_adapters: int, seed: int = 0, s: float = 1.1) -> list[str]:
    rng = random.Random(seed)
    weights = [1 / (k ** s) for k in range(1, num_adapters + 1)]
    return [f"adapter-{k}" for k in rng.choices(range(num_adapters), weights=weights, k=n)]


def _serve(router: CoreRouter, requests: list[tuple[str, int]], in_flight: int,
           least_loaded: bool = False) -> tuple[list[int], float]:
    """Route (adapter, work) requests in order with `in_flight` outstanding (oldest finishes first); the cores
    chosen, and the share of requests that found their adapter warm on their core (no load)."""
    placed: list[int] = []
    hits = 0
    for i, (adapter, work) in enumerate(requests):
        if i >= in_flight:
            router.release(placed[i - in_flight], requests[i - in_flight][1])
        core = router.pick(None if least_loaded else adapter)
        assert router.loads[core] <= router.mean() + router.cold_load_tokens  # the bound
        hits += router.is_warm(core, adapter)
        router.acquire(core, work, adapter)
        placed.append(core)
    return placed, hits / len(requests)


@pytest.mark.parametrize(("num_cores", "gain"), [(2, 0.03), (4, 0.1)])
def test_zipf_traffic_finds_its_adapter_warm_more_often_than_least_loaded_routing(num_cores: int, gain: float) -> None:
    rng = random.Random(1)
    requests = [(a, rng.randint(64, 1024)) for a in _zipf_adapters(20_000, 1_000)]
    placed, hit_rate = _serve(CoreRouter(num_cores, warm_capacity=32), requests, in_flight=32)
    _, least_loaded_hit_rate = _serve(CoreRouter(num_cores, warm_capacity=32), requests, in_flight=32,
                                      least_loaded=True)
    # 32 slots a core, 1,000 adapters: half the requests find their adapter warm even routed blindly (0.49);
    # here 0.53 on 2 cores, 0.61 on 4 (0.61 and 0.71 at most, never spilling: the cores then drift apart)
    assert hit_rate >= least_loaded_hit_rate + gain, (hit_rate, least_loaded_hit_rate)
    work = Counter()
    for (_, w), core in zip(requests, placed, strict=True):
        work[core] += w
    assert min(work.values()) / max(work.values()) >= 0.8, work  # no core starves
    # the hottest adapter (about 1/8 of the traffic) is split, but only over a few cores, not all
    hot = Counter(core for (a, _), core in zip(requests, placed, strict=True) if a == "adapter-0")
    assert len(hot) <= 2 or hot.most_common(2)[1][1] > 3 * hot.most_common()[-1][1], hot


def test_a_burst_over_warm_adapters_splits_evenly() -> None:
    """The bench's burst: 128 equal requests over 8 adapters, each warm on its home core, all in flight."""
    router = CoreRouter(2, warm_capacity=8)
    adapters = [str(i + 1) for i in range(8)]
    for a in adapters:
        router.warmed(router.home(a), a)
    for i in range(128):
        adapter = adapters[i % 8]
        router.acquire(router.pick(adapter), 64, adapter)
    # an adapter warm on one core only spills once its core is a load's worth past the mean (64-token requests)
    assert abs(router.loads[0] - router.loads[1]) <= 2 * router.cold_load_tokens + 64, router.loads
    assert min(router.loads) / max(router.loads) >= 0.85, router.loads  # 80/48 with requests counted


def test_an_adapter_warm_on_one_core_stays_there_until_the_imbalance_is_worth_a_load() -> None:
    router = CoreRouter(2, cold_load_tokens=512)
    home = router.home("a")
    router.acquire(home, 100, "a")
    while router.loads[home] - router.mean() <= 512:  # the other core is idle, but a load costs more
        assert router.pick("a") == home
        router.acquire(home, 100, "a")
    assert router.pick("a") == 1 - home  # now loading it on the other core pays
    router.acquire(1 - home, 100, "a")
    # warm on both: its requests even the cores out and keep them even
    for _ in range(40):
        router.acquire(router.pick("a"), 100, "a")
    assert abs(router.loads[0] - router.loads[1]) <= 100


def test_load_is_queued_tokens_not_requests() -> None:
    router = CoreRouter(2, cold_load_tokens=0)
    big = router.home("x")
    router.acquire(big, 2_000, "x")  # one long request
    other = [router.pick(f"short-{i}") for i in range(20) if not router.acquire(router.pick(f"short-{i}"), 50)]
    assert router.loads[1 - big] >= 20 * 50 - 50 and router.loads[big] == 2_000, (router.loads, other)


def test_a_cold_adapter_goes_to_its_home_while_the_cores_are_even() -> None:
    router = CoreRouter(4)
    assert all(router.pick(f"cold-{i}") == router.home(f"cold-{i}") for i in range(100))


def test_a_core_that_is_down_gets_nothing_and_forgets_what_was_warm() -> None:
    router = CoreRouter(2)
    home = router.home("a")
    router.acquire(home, 10, "a")
    router.set_up(home, False)
    assert all(router.pick(f"x{i}") != home for i in range(100))
    router.set_up(home, True)
    assert not router.is_warm(home, "a") and router.loads[home] == 0
    router.set_up(0, False)
    router.set_up(1, False)
    with pytest.raises(Unavailable):
        router.pick("a")


def test_warmth_is_bounded_by_the_cores_slots_and_forgotten_with_the_adapter() -> None:
    router = CoreRouter(1, warm_capacity=2)
    for a in ("a", "b", "c"):
        router.warmed(0, a)
    assert [router.is_warm(0, a) for a in ("a", "b", "c")] == [False, True, True]
    router.forget("c")
    assert not router.is_warm(0, "c")


def test_requests_without_an_adapter_go_to_the_least_loaded_core() -> None:
    router = CoreRouter(2)
    router.acquire(0, 10)
    assert router.pick(None) == 1
