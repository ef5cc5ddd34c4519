"""The Celery app of the settlement worker, its beat schedule, and the entry points the CLI calls.

Broker: `Settings.resolved_broker_url()` (Redis in production; `sqla+sqlite:///<data>/broker.db` for an
embedded node). Tasks ack late and are requeued if a worker dies mid-task (Redis: after the visibility
timeout; the embedded broker may drop a tick a SIGKILLed worker held, and beat sends the next one);
they are idempotent, so a task run twice does no harm. No result backend: the outbox is the state.
"""

from __future__ import annotations

from celery import Celery

from node.config import Settings
from node.settlement.beat_liveness import mark_started, schedule_path
from node.settlement.runtime import operator_address

TICK_TASK = "loranode.settlement.tick"
CLOSE_TASK = "loranode.settlement.close_epoch"


def make_celery(settings: Settings) -> Celery:
    broker = settings.resolved_broker_url()
    app = Celery("loranode", broker=broker, include=["node.settlement.tasks"])
    if broker.startswith(("redis://", "rediss://")):  # a task unacked this long is delivered again
        app.conf.broker_transport_options = {"visibility_timeout": 600}
    app.conf.update(
        task_acks_late=True,
        task_reject_on_worker_lost=True,
        worker_prefetch_multiplier=1,
        task_ignore_result=True,
        broker_connection_retry_on_startup=True,
        timezone="UTC",
        beat_schedule_filename=str(schedule_path(settings.data_dir)),
        beat_schedule={"settlement-tick": {"task": TICK_TASK, "schedule": settings.settlement_interval_s,
                                           "args": (operator_address(settings),),
                                           "options": {"expires": 2 * settings.settlement_interval_s}}},
    )
    app.conf.loranode_settings = settings
    return app


def declare_broker_queue(app: Celery, attempts: int = 3) -> None:
    """The embedded SQL broker creates a queue's row (and its tables) on first use, so a worker and a
    beat starting together can both insert it and one dies on the UNIQUE constraint. Declare the queue
    before starting, retrying the race's named errors: the loser then finds the row the winner wrote."""
    if not str(app.conf.broker_url).startswith("sqla+"):
        return
    from sqlalchemy.exc import IntegrityError, OperationalError

    queue = app.amqp.queues[app.conf.task_default_queue]
    for attempt in range(1, attempts + 1):
        try:
            with app.connection_for_write() as conn:
                queue(conn.default_channel).declare()
            return
        except (IntegrityError, OperationalError):  # another process created the row or table meanwhile
            if attempt == attempts:
                raise


def run_worker(settings: Settings, *, loglevel: str | None = None) -> None:
    """`loranode worker`: reconcile the operator's open transactions, then consume settlement tasks."""
    from node.settlement.tasks import runtime

    app = make_celery(settings)
    settings.data_dir.mkdir(parents=True, exist_ok=True)
    runtime(app).service.reconcile()
    declare_broker_queue(app)
    app.worker_main(["worker", "--pool=solo", "--concurrency=1", "--without-gossip", "--without-mingle",
                     "--without-heartbeat", f"--loglevel={loglevel or settings.log_level}",
                     "--hostname=settlement@%h"])


def run_beat(settings: Settings, *, loglevel: str | None = None) -> None:
    """`loranode beat`: send a settlement tick for the operator's node every interval."""
    app = make_celery(settings)
    settings.data_dir.mkdir(parents=True, exist_ok=True)
    mark_started(settings.data_dir)  # `loranode health beat` then tells this beat's schedule from an earlier one's
    declare_broker_queue(app)
    app.start(["beat", f"--loglevel={loglevel or settings.log_level}"])
