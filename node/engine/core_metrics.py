"""The engine cores' figures as the API process last heard them: each core's `Metrics` report.

A core reports about once a second, and at once when asked (`ReportMetrics` with a `report_id`, which
its next report carries back): `wait` blocks until every core asked has reported at least that id, or
has stopped, so a scrape right after it counts every request answered before it. The figures are
summed over the cores: the adapter stores' counters (`store_metrics`), the engines' `engine_stats`,
and the frames the cores refused. A core that exits takes its last report with it (`forget`).
"""

from __future__ import annotations

import itertools
import threading
from collections.abc import Callable

from node.engine import wire


class CoreMetrics:
    def __init__(self) -> None:
        self._reports: dict[int, wire.Metrics] = {}
        self._reported = threading.Condition()  # a report arrived
        self._report_ids = itertools.count(1)  # 0 is what a core reports before it was ever asked

    def next_report_id(self) -> int:
        return next(self._report_ids)

    def received(self, report: wire.Metrics) -> None:
        with self._reported:
            self._reports[report.core] = report
            self._reported.notify_all()

    def forget(self, core: int) -> None:
        with self._reported:
            self._reports.pop(core, None)

    def wait(self, report_id: int, cores: list[int], is_up: Callable[[int], bool], timeout_s: float) -> None:
        """Until each of `cores` has reported `report_id` (or a later one) or is down, at most `timeout_s`."""
        def answered(core: int) -> bool:
            report = self._reports.get(core)
            return (report is not None and report.report_id >= report_id) or not is_up(core)

        with self._reported:
            self._reported.wait_for(lambda: all(answered(core) for core in cores), timeout_s)

    def store_metrics(self) -> dict[str, dict[str, float]]:
        """The adapter stores' counters (tier -> stat), summed over the cores, as last reported."""
        total: dict[str, dict[str, float]] = {}
        for report in self._last():
            for tier, stats in report.adapter_store.items():
                into = total.setdefault(tier, {})
                for name, value in stats.items():
                    into[name] = into.get(name, 0.0) + value
        return total

    def engine_stats(self) -> dict[str, float]:
        """The cores' `engine_stats`, summed, as last reported (about once a second)."""
        total: dict[str, float] = {}
        for report in self._last():
            for name, value in report.engine.items():
                total[name] = total.get(name, 0.0) + value
        return total

    @property
    def num_refused_by_cores(self) -> int:
        """Frames the cores refused (malformed, or not applicable), as their last reports said."""
        return sum(report.num_refused for report in self._last())

    def _last(self) -> list[wire.Metrics]:
        with self._reported:
            return list(self._reports.values())
