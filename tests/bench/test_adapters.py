"""bench/adapters.py --section store at the smallest sizes: every store it opens over the one disk
cache keeps every adapter there (the registry adapters the first run fetches included), so it
completes and the traffic never misses the disk."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]


def test_the_store_section_runs_at_tiny_sizes(tmp_path: Path) -> None:
    out = tmp_path / "adapters.json"
    run = subprocess.run([sys.executable, str(ROOT / "bench" / "adapters.py"), "--section", "store",
                          "--num-adapters", "3", "--num-host", "1", "--num-requests", "12",
                          "--num-samples", "2", "--out", str(out)],
                         capture_output=True, text=True, timeout=600)
    assert run.returncode == 0, run.stderr[-3000:]
    report = json.loads(out.read_text())
    assert report["config"]["num_store_samples"] == 2
    assert report["loads"]["store_disk_to_device_p50_ms"] > 0
    for name in ("zipf1.1", "uniform"):
        assert report["traffic"][name]["disk_hit_rate"] == 1.0
        assert report["traffic"][name]["source_fetches"] == 0
