"""Shared fixtures live in tests/fixtures/, one module per concern, loaded here as plugins."""

from __future__ import annotations

import os

import pytest
import torch

# Without a GPU, Triton kernels run in Triton's interpreter (tests/lora/test_triton_ops.py). Triton
# reads this when it is first imported, so it is set here, before any test module can import it.
if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")

# The nodes tests start run their engine in the API's process (fast to start), unless the run says
# otherwise: `LORANODE_ENGINE_PROCESS=1 pytest tests/api tests/adversarial` runs them with the engine
# in a core process of its own, as `loranode api` does by default. Tests of the core process itself
# ask for it whatever the run says.
os.environ.setdefault("LORANODE_ENGINE_PROCESS", "0")

pytest_plugins = [
    "tests.fixtures.chain",
    "tests.fixtures.database",
    "tests.fixtures.contracts",
    "tests.fixtures.indexer",
    "tests.fixtures.flaky_rpc",
    "tests.fixtures.models",
    "tests.fixtures.paid_node",
    "tests.fixtures.settlement",
    "tests.fixtures.x402_node",
]

_SERVICES = {"postgres": "PostgreSQL", "redis": "Redis"}
_passed: dict[str, int] = dict.fromkeys(_SERVICES, 0)


def _services_of(item: pytest.Item) -> set[str]:
    used = set()
    params = getattr(getattr(item, "callspec", None), "params", {})
    if "postgres" in params.values() or "postgres_url" in getattr(item, "fixturenames", ()):
        used.add("postgres")
    if "redis_url" in getattr(item, "fixturenames", ()) or item.get_closest_marker("redis"):
        used.add("redis")
    return used


@pytest.hookimpl(hookwrapper=True)
def pytest_runtest_makereport(item: pytest.Item, call: pytest.CallInfo[None]):  # type: ignore[no-untyped-def]
    outcome = yield
    report = outcome.get_result()
    if report.when == "call" and report.passed:
        for service in _services_of(item):
            _passed[service] += 1


def pytest_terminal_summary(terminalreporter: pytest.TerminalReporter) -> None:
    """Say how many tests ran on the real services (CI must show they did)."""
    counts = ", ".join(f"{n} on {_SERVICES[s]}" for s, n in _passed.items())
    terminalreporter.write_line(f"loranode: tests passed against real services: {counts}")
