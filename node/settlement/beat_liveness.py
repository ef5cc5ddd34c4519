"""Whether the settlement beat is doing its work: the files it keeps in the data dir, and the check on them.

Celery's beat writes its schedule file (`celerybeat-schedule`, with whatever suffix the dbm module adds)
when it starts and then at least every `BEAT_SYNC_S` while it sends ticks; `loranode beat` first writes
its pid (`celerybeat.pid`). The beat is live when that pid is a running process and the schedule was
written since the pid file, within the limit. The files outlive the process (the data dir is a volume),
so a fresh schedule alone proves nothing: a beat that stopped a second ago, or one before it, left it.
"""

from __future__ import annotations

import os
import time
from pathlib import Path

from node.errors import Unavailable

SCHEDULE_NAME = "celerybeat-schedule"
PID_NAME = "celerybeat.pid"
BEAT_SYNC_S = 180.0  # celery beat writes its schedule file at least this often while it sends ticks


def schedule_path(data_dir: Path) -> Path:
    return data_dir / SCHEDULE_NAME


def mark_started(data_dir: Path) -> None:
    """Name this process as the beat that writes the schedule in `data_dir` (before it opens the schedule)."""
    (data_dir / PID_NAME).write_text(f"{os.getpid()}\n")


def check_beat(data_dir: Path, limit_s: float) -> float:
    """The age of the schedule the running beat wrote, in seconds; Unavailable, with why, if it is not live."""
    files = list(data_dir.glob(SCHEDULE_NAME + "*"))
    if not files:
        raise Unavailable(f"no beat schedule file in {data_dir}: the beat has not started")
    pid_file = data_dir / PID_NAME
    try:
        pid, started_at = int(pid_file.read_text().strip()), pid_file.stat().st_mtime
    except FileNotFoundError:
        raise Unavailable(f"no beat has started here ({pid_file} is missing): the schedule file is an earlier "
                          "beat's") from None
    except ValueError:
        pid = 0
    if pid <= 0:
        raise Unavailable(f"{pid_file} does not hold a process id")
    if not _is_running(pid):
        raise Unavailable(f"the beat that wrote the schedule file (pid {pid}) is not running", pid=pid)
    written_at = max(f.stat().st_mtime for f in files)
    if written_at < started_at:
        raise Unavailable(f"the beat (pid {pid}) has not written its schedule since it started: the file is an "
                          "earlier beat's", pid=pid)
    age = time.time() - written_at
    if age > limit_s:
        raise Unavailable(f"the beat's schedule file is {age:.0f} s old (limit {limit_s:.0f} s)", age_s=round(age))
    return age


def _is_running(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # it exists, under another user
        return True
    return True
