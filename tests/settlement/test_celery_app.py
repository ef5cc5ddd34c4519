"""The embedded broker's queue, declared by a worker and a beat starting at the same moment."""

from __future__ import annotations

import multiprocessing
import sqlite3
from pathlib import Path

from node.config import load_settings
from node.settlement.celery_app import declare_broker_queue, make_celery


def _declare(data_dir: Path) -> None:
    declare_broker_queue(make_celery(load_settings(data_dir=data_dir)))


def test_processes_declaring_the_embedded_queue_together_all_start(tmp_path: Path) -> None:
    procs = [multiprocessing.get_context("fork").Process(target=_declare, args=(tmp_path,)) for _ in range(6)]
    for p in procs:
        p.start()
    for p in procs:
        p.join(timeout=60)
    assert [p.exitcode for p in procs] == [0] * 6
    rows = sqlite3.connect(tmp_path / "broker.db").execute("SELECT name FROM kombu_queue").fetchall()
    assert rows == [("celery",)]
