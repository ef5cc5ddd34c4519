"""`loranode health beat`, the beat container's liveness check: healthy only while the beat that is
running now writes its schedule file; a file a stopped (or earlier) beat left behind is refused, and why."""

from __future__ import annotations

import os
import subprocess
import sys
import time
from pathlib import Path

from typer.testing import CliRunner

from node.cli import app

runner = CliRunner()
SCHEDULE, PID = "celerybeat-schedule", "celerybeat.pid"


def _health_beat(data_dir: Path, *args: str) -> tuple[int, str]:
    result = runner.invoke(app, ["health", "beat", *args], env={"LORANODE_DATA_DIR": str(data_dir)})
    return result.exit_code, result.output


def _write(path: Path, text: str, age_s: float) -> None:
    path.write_text(text)
    at = time.time() - age_s
    os.utime(path, (at, at))


def _dead_pid() -> int:
    process = subprocess.Popen([sys.executable, "-c", "pass"])
    process.wait()
    return process.pid


def test_the_running_beat_with_a_fresh_schedule_is_healthy(tmp_path: Path) -> None:
    _write(tmp_path / PID, f"{os.getpid()}\n", age_s=30)
    _write(tmp_path / SCHEDULE, "", age_s=5)
    code, output = _health_beat(tmp_path)
    assert code == 0, output
    assert "beat ok" in output


def test_no_schedule_file_is_refused(tmp_path: Path) -> None:
    code, output = _health_beat(tmp_path)
    assert code != 0 and "no beat schedule file" in output


def test_a_fresh_schedule_file_a_stopped_beat_left_is_refused(tmp_path: Path) -> None:
    pid = _dead_pid()
    _write(tmp_path / PID, f"{pid}\n", age_s=60)
    _write(tmp_path / SCHEDULE, "", age_s=1)  # written as it stopped, a second ago
    code, output = _health_beat(tmp_path)
    assert code != 0
    assert f"the beat that wrote the schedule file (pid {pid}) is not running" in output


def test_a_schedule_file_with_no_beat_named_is_refused(tmp_path: Path) -> None:
    _write(tmp_path / SCHEDULE, "", age_s=1)
    code, output = _health_beat(tmp_path)
    assert code != 0 and "no beat has started here" in output


def test_a_schedule_file_older_than_the_running_beat_is_a_previous_beats_and_refused(tmp_path: Path) -> None:
    _write(tmp_path / SCHEDULE, "", age_s=20)
    _write(tmp_path / PID, f"{os.getpid()}\n", age_s=10)  # this beat started after it was written
    code, output = _health_beat(tmp_path)
    assert code != 0 and "has not written its schedule since it started" in output


def test_a_schedule_the_running_beat_stopped_writing_is_refused_past_the_limit(tmp_path: Path) -> None:
    _write(tmp_path / PID, f"{os.getpid()}\n", age_s=600)
    _write(tmp_path / SCHEDULE, "", age_s=120)
    code, output = _health_beat(tmp_path, "--max-age-s", "60")
    assert code != 0 and "schedule file is 120 s old (limit 60 s)" in output
    assert _health_beat(tmp_path)[0] == 0  # within the default limit (3 minutes and two settlement intervals)


def test_a_pid_file_that_names_no_process_is_refused(tmp_path: Path) -> None:
    _write(tmp_path / PID, "not a pid\n", age_s=30)
    _write(tmp_path / SCHEDULE, "", age_s=5)
    code, output = _health_beat(tmp_path)
    assert code != 0 and "celerybeat.pid" in output
