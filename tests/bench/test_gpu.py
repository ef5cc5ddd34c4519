"""bench/gpu.py and scripts/gpu_check.sh, checked on the CPU: a lent GPU's minutes are scarce, so a row
or a test path broken on the CPU side must show up here, not there."""

from __future__ import annotations

import re
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]


@pytest.mark.slow
@pytest.mark.filterwarnings("ignore:Conversion of an array with ndim > 0:DeprecationWarning")  # the interpreter
def test_the_cpu_smoke_run_runs_every_row(monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]) -> None:
    """Every row on a tiny model (Triton in its interpreter); the smoke run stops at the first row that
    raises. fp8 is refused off a Hopper-class GPU with the reason, and says so; the GPU figures in
    bench/results/gpu.json are left alone."""
    from bench import gpu

    results = ROOT / "bench" / "results" / "gpu.json"
    before = results.read_bytes() if results.exists() else None
    monkeypatch.setattr(sys, "argv", ["bench/gpu.py", "--cpu-smoke"])
    gpu.main()
    out = capsys.readouterr().out
    checks = dict(re.findall(r"(\w+/(?:gather|segment)) ([0-9.e+-]+)", out))
    assert len(checks) == 8 and all(float(v) < 2e-2 for v in checks.values()), checks  # 4 groups x 2 forms
    for weights in ("bf16", "int8", "int4"):
        for batch, adapters in ((1, 0), (4, 0), (4, 4)):  # the smoke run's batch is 4
            assert re.search(rf"{weights} batch +{batch} adapters +{adapters}: +[0-9.]+ ms", out), (weights, batch)
    assert "fp8: not run: fp8 weights need a CUDA GPU of compute capability 8.9" in out
    for row in ("paged decode attention, one layer", "LoRA alone, batch 4 x 4", "engine vs transformers + peft"):
        assert row in out
    assert (results.read_bytes() if results.exists() else None) == before  # the card's figures stay


def test_the_device_check_names_test_files_and_wheels_that_exist() -> None:
    """gpu_check.sh runs named test files (a renamed one would fail on the card, not here) and
    installs the carried wheels scripts/gpu_wheels.sh downloads, torchao and xgrammar among them."""
    check = (ROOT / "scripts" / "gpu_check.sh").read_text()
    files = re.findall(r"tests/[\w/]+\.py", check)
    assert len(files) >= 8 and all((ROOT / f).is_file() for f in files), files
    wheels = (ROOT / "scripts" / "gpu_wheels.sh").read_text()
    pyproject = (ROOT / "pyproject.toml").read_text()
    torchao = re.search(r'"torchao==([\d.]+)"', pyproject)
    assert torchao and f"torchao=={torchao[1]}" in wheels and "xgrammar==" in wheels
