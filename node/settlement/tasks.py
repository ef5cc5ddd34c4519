"""Thin settlement tasks: ids in, the service does the work, named transient errors are retried.

A task only ever advances the outbox through SettlementService, which is idempotent and locked per
node, so a duplicate delivery (acks_late after a worker died) or a retry never settles twice.
"""

from __future__ import annotations

import logging

import requests
from celery import Celery, Task, shared_task
from sqlalchemy.exc import OperationalError

from node.errors import ChainError, NodeError, Unavailable
from node.settlement.runtime import SettlementRuntime

log = logging.getLogger(__name__)
TRANSIENT = (OperationalError, requests.ConnectionError, requests.Timeout, Unavailable)
_RUNTIMES: dict[int, SettlementRuntime] = {}


def runtime(app: Celery) -> SettlementRuntime:
    """This process's runtime for `app`, built on first use."""
    found = _RUNTIMES.get(id(app))
    if found is None:
        found = _RUNTIMES[id(app)] = SettlementRuntime.from_settings(app.conf.loranode_settings)
    return found


def _service_for(task: Task, node: str) -> SettlementRuntime:
    rt = runtime(task.app)
    if rt.service.node.lower() != node.lower():
        raise ChainError("this worker settles another node", node=node, operator=rt.service.node)
    return rt


@shared_task(name="loranode.settlement.tick", bind=True, acks_late=True, autoretry_for=TRANSIENT,
             retry_backoff=True, retry_backoff_max=60, max_retries=None)
def tick(self: Task, node: str) -> str | None:
    """Advance `node`'s epoch in flight one step, or close a new one when the policy says so."""
    try:
        state = _service_for(self, node).service.tick()
    except NodeError as exc:
        if isinstance(exc, TRANSIENT):
            raise
        log.error("settlement tick for %s failed: %s %s", node, exc, exc.facts)
        return None
    return None if state is None else state.value


@shared_task(name="loranode.settlement.close_epoch", bind=True, acks_late=True, autoretry_for=TRANSIENT,
             retry_backoff=True, max_retries=None)
def close_epoch(self: Task, node: str) -> int | None:
    """Close an epoch of `node` now, whatever the policy (receipts must be waiting, none in flight)."""
    return _service_for(self, node).service.close_epoch()
