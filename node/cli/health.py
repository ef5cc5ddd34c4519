"""`loranode health indexer|worker|beat`: a container's liveness check (docker-compose.yml runs them).

Each asks the thing that shows the process is doing its work, not only that it runs: the indexer's
last step that reached the chain (in the database), the settlement worker answering a ping over the
broker, the beat's schedule file written recently by the beat running now. Exit 0 when healthy, non-zero
(with the reason on stderr) when not.
"""

from __future__ import annotations

import socket
from datetime import UTC, datetime

import typer

from node.cli.console import console
from node.config import load_settings
from node.errors import Unavailable

app = typer.Typer(help="Liveness checks for the node's processes (exit 0 when healthy).", no_args_is_help=True)


@app.command()
def indexer(max_age_s: float = typer.Option(None, help="Oldest acceptable step (default LORANODE_MAX_MIRROR_LAG_S).")
            ) -> None:
    """The indexer reached the chain within --max-age-s.

    The API refuses paid work past the same age."""
    from node.db import queries
    from node.db.session import make_engine, session_factory

    settings = load_settings()
    limit = settings.max_mirror_lag_s if max_age_s is None else max_age_s
    factory = session_factory(make_engine(settings.resolved_database_url(), pooled=False))
    with factory() as session:
        head = queries.mirror_head(session)
    if head is None or head.checked_at is None:
        raise Unavailable("the indexer has not reached the chain yet")
    if head.halted_reason:
        raise Unavailable(f"the indexer halted: {head.halted_reason}")
    age = (datetime.now(UTC) - head.checked_at).total_seconds()
    if age > limit:
        raise Unavailable(f"the indexer last reached the chain {age:.0f} s ago (limit {limit:.0f} s)",
                          age_s=round(age), stalled=head.stalled_reason)
    console.print(f"indexer ok: block {head.last_block}, {age:.1f} s ago")


@app.command()
def worker(timeout_s: float = typer.Option(5.0, help="How long to wait for the answer.")) -> None:
    """The settlement worker on this host answers a ping over the broker."""
    from node.settlement.celery_app import make_celery

    name = f"settlement@{socket.gethostname()}"
    replies = make_celery(load_settings()).control.ping(destination=[name], timeout=timeout_s)
    if not any(name in reply for reply in replies or []):
        raise Unavailable(f"the worker {name} did not answer a ping in {timeout_s} s")
    console.print(f"worker ok: {name}")


@app.command()
def beat(max_age_s: float = typer.Option(None, help="Oldest acceptable schedule file "
                                                      "(default: 3 minutes plus two settlement intervals).")
         ) -> None:
    """The running beat wrote its schedule file recently.

    It does while it sends settlement ticks; a file a stopped or an earlier beat left in the data dir
    does not count."""
    from node.settlement.beat_liveness import BEAT_SYNC_S, check_beat

    settings = load_settings()
    age = check_beat(settings.data_dir, BEAT_SYNC_S + 2 * settings.settlement_interval_s
                     if max_age_s is None else max_age_s)
    console.print(f"beat ok: schedule written {age:.1f} s ago")
