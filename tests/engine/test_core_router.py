"""Routing requests to data-parallel cores: an adapter stays on its core, no core holds more than its
bounded share, and a core that is down gets nothing."""

from __future__ import annotations

import math
import random
from collections import Counter

import pytest

from node.engine.core_router import CoreRouter
from node.errors import Unavailable


def _zipf_adapters(n: int, num_adapters: int, seed: int = 0, s: float = 1.1) -> list[str]:
    rng = random.Random(seed)
    weights = [1 / (k ** s) for k in range(1, num_adapters + 1)]
    return [f"adapter-{k}" for k in rng.choices(range(num_adapters), weights=weights, k=n)]


def _serve(router: CoreRouter, adapters: list[str], in_flight: int) -> list[int]:
    """Route `adapters` in order with `in_flight` requests outstanding (oldest finishes first)."""
    placed: list[int] = []
    for i, adapter in enumerate(adapters):
        if i >= in_flight:
            router.release(placed[i - in_flight])
        core = router.pick(adapter)
        assert router.loads[core] + 1 <= router.bound()
        router.acquire(core)
        placed.append(core)
    return placed


@pytest.mark.parametrize("num_cores", [2, 4])
def test_zipf_traffic_mostly_lands_on_each_adapters_home_core_within_the_load_bound(num_cores: int) -> None:
    router = CoreRouter(num_cores, load_factor=1.25)
    adapters = _zipf_adapters(20_000, 1_000)
    placed = _serve(router, adapters, in_flight=32)
    at_home = sum(core == router.home(a) for a, core in zip(adapters, placed, strict=True)) / len(adapters)
    assert at_home >= 0.7, at_home
    spread = Counter(placed)
    assert min(spread.values()) / max(spread.values()) >= 0.5, spread  # no core starves
    # the hottest adapter (about 1/8 of the traffic) spills, but only to a few cores, not to all
    hot = Counter(core for a, core in zip(adapters, placed, strict=True) if a == "adapter-0")
    assert hot.most_common(1)[0][0] == router.home("adapter-0")


def test_the_bound_holds_for_one_adapter_alone() -> None:
    router = CoreRouter(3, load_factor=1.25)
    for _ in range(30):
        router.acquire(router.pick("the-only-one"))
    assert max(router.loads) <= math.ceil(1.25 * 30 / 3)
    assert router.loads[router.home("the-only-one")] == max(router.loads)


def test_a_core_that_is_down_gets_nothing_and_none_up_is_unavailable() -> None:
    router = CoreRouter(2)
    home = router.home("a")
    router.set_up(home, False)
    assert all(router.pick(f"x{i}") != home for i in range(100))
    router.set_up(1 - home, False)
    with pytest.raises(Unavailable):
        router.pick("a")


def test_requests_without_an_adapter_go_to_the_least_loaded_core() -> None:
    router = CoreRouter(2)
    router.acquire(0)
    assert router.pick(None) == 1
