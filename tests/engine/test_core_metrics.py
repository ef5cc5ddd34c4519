"""The cores' figures as the API reads them for a scrape: summed over the cores, and fresh when asked for."""

from __future__ import annotations

import threading
import time

from node.engine import wire
from node.engine.core_metrics import CoreMetrics


def _report(core: int, report_id: int = 0, loads: float = 0.0, kv_blocks: float = 0.0,
            num_refused: int = 0) -> wire.Metrics:
    return wire.Metrics(core, 0, 0, 0, {"device": {"num_loads": loads}}, {"kv_blocks": kv_blocks},
                        num_refused=num_refused, report_id=report_id)


def test_the_figures_are_summed_over_the_cores_and_a_core_that_exits_no_longer_counts() -> None:
    metrics = CoreMetrics()
    metrics.received(_report(0, loads=2, kv_blocks=10, num_refused=1))
    metrics.received(_report(1, loads=3, kv_blocks=5, num_refused=4))
    assert metrics.store_metrics() == {"device": {"num_loads": 5.0}}
    assert metrics.engine_stats() == {"kv_blocks": 15.0}
    assert metrics.num_refused_by_cores == 5
    metrics.forget(1)
    assert metrics.engine_stats() == {"kv_blocks": 10.0} and metrics.num_refused_by_cores == 1


def test_a_refresh_waits_for_the_answer_to_its_own_ask_not_a_report_sent_before() -> None:
    metrics = CoreMetrics()
    metrics.received(_report(0))  # a core's periodic report, before anyone asked
    report_id = metrics.next_report_id()
    threading.Timer(0.2, lambda: metrics.received(_report(0, report_id=report_id, kv_blocks=7))).start()
    started = time.monotonic()
    metrics.wait(report_id, [0], lambda core: True, timeout_s=10)
    assert 0.1 < time.monotonic() - started < 5
    assert metrics.engine_stats() == {"kv_blocks": 7.0}


def test_a_refresh_does_not_wait_for_a_core_that_is_down_and_gives_up_on_a_silent_one() -> None:
    metrics = CoreMetrics()
    report_id = metrics.next_report_id()
    started = time.monotonic()
    metrics.wait(report_id, [0], lambda core: False, timeout_s=10)
    assert time.monotonic() - started < 1
    metrics.wait(report_id, [0], lambda core: True, timeout_s=0.2)  # a stalled core: its last report stays
    assert 0.2 <= time.monotonic() - started < 5
