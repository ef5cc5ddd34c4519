"""The Grafana dashboard the `monitoring` profile provisions reads metrics the node emits: every query
names only metrics in docs/metrics.md (the list tests/api/test_metrics.py checks a live node emits),
through the datasource Grafana is provisioned with, and Prometheus scrapes the API compose runs."""

from __future__ import annotations

import json
import re
from pathlib import Path

import yaml

from tests.api.test_metrics import documented

ROOT = Path(__file__).resolve().parent.parent
MONITORING = ROOT / "deploy" / "monitoring"
DASHBOARD = MONITORING / "grafana" / "dashboards" / "loranode.json"
NAME = re.compile(r"\bloranode_\w+")


def _series_names() -> set[str]:
    """What a scrape holds for each documented metric (a histogram's _bucket, _sum and _count)."""
    names = set()
    for name, (kind, _) in documented().items():
        names |= {f"{name}_bucket", f"{name}_sum", f"{name}_count"} if kind == "histogram" else {name}
    return names


def _queries() -> list[str]:
    panels = json.loads(DASHBOARD.read_text())["panels"]
    return [t["expr"] for p in panels for t in p["targets"]]


def test_every_dashboard_query_names_only_metrics_the_node_emits() -> None:
    queries, known = _queries(), _series_names()
    assert len(queries) >= 15
    unknown = {name for q in queries for name in NAME.findall(q)} - known
    assert not unknown, unknown
    assert all(NAME.search(q) for q in queries)  # no query that reads nothing of the node's


def test_the_dashboard_covers_every_documented_metric() -> None:
    used = {name for q in _queries() for name in NAME.findall(q)}
    documented_names = {n for n in _series_names() if not n.endswith(("_sum", "_count"))}
    assert not documented_names - used, documented_names - used


def test_grafana_reads_the_provisioned_prometheus_which_scrapes_the_api() -> None:
    provisioned = yaml.safe_load((MONITORING / "grafana/provisioning/datasources/prometheus.yml").read_text())
    uid = provisioned["datasources"][0]["uid"]
    panels = json.loads(DASHBOARD.read_text())["panels"]
    assert {p["datasource"]["uid"] for p in panels} == {uid}
    assert {t["datasource"]["uid"] for p in panels for t in p["targets"]} == {uid}
    scrape = yaml.safe_load((MONITORING / "prometheus.yml").read_text())["scrape_configs"][0]
    assert scrape["metrics_path"] == "/metrics" and scrape["static_configs"][0]["targets"] == ["api:8000"]
    provider = yaml.safe_load((MONITORING / "grafana/provisioning/dashboards/loranode.yml").read_text())
    assert provider["providers"][0]["options"]["path"] == "/var/lib/grafana/dashboards"
    compose = yaml.safe_load((ROOT / "docker-compose.yml").read_text())["services"]
    mounts = compose["grafana"]["volumes"]
    assert "./deploy/monitoring/grafana/dashboards:/var/lib/grafana/dashboards:ro" in mounts
    assert compose["prometheus"]["profiles"] == compose["grafana"]["profiles"] == ["monitoring"]
