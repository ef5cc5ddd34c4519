"""`python -m tests.faults.dying_worker POINT`: `loranode worker`, which SIGKILLs itself at POINT.

The points are the gaps between the settlement outbox's durable steps (node/settlement/service.py and its steps):

    opened     the epoch row and its receipts are committed (OPEN), nothing built
    built      lanes, split and trees committed (BUILT), nothing signed
    signed     the settle intent is signed and saved, nothing broadcast
    broadcast  the settle is broadcast (anvil mines it at once), the outbox still says BUILT
    submitted  the outbox says SUBMITTED
    confirmed  the outbox says CONFIRMED (mined, not yet final)

SIGKILL from inside the process at exactly that point: no `finally`, no atexit, no Celery shutdown.
"""

from __future__ import annotations

import os
import signal
import sys
from collections.abc import Callable
from typing import Any

from node.chain.tx_manager import TxManager
from node.db.models import EpochState
from node.settlement.build_step import BuildStep
from node.settlement.service import SettlementService


def _die() -> None:
    os.kill(os.getpid(), signal.SIGKILL)


def _after(cls: type, name: str, when: Callable[..., bool] = lambda *_a, **_k: True) -> None:
    real = getattr(cls, name)

    def wrapper(self: Any, *args: Any, **kwargs: Any) -> Any:
        result = real(self, *args, **kwargs)
        if when(result, *args, **kwargs):
            _die()
        return result

    setattr(cls, name, wrapper)


def _before(cls: type, name: str) -> None:
    def wrapper(self: Any, *args: Any, **kwargs: Any) -> Any:
        _die()

    setattr(cls, name, wrapper)


def _saved(state: EpochState) -> Callable[..., bool]:
    return lambda _result, _epoch_id, saved, **_kw: saved is state


POINTS: dict[str, Callable[[], None]] = {
    "opened": lambda: _after(SettlementService, "_close", lambda epoch_id: epoch_id is not None),
    "built": lambda: _after(BuildStep, "build"),
    "signed": lambda: _before(TxManager, "_broadcast"),
    "broadcast": lambda: _after(TxManager, "_broadcast"),
    "submitted": lambda: _after(SettlementService, "_save", _saved(EpochState.SUBMITTED)),
    "confirmed": lambda: _after(SettlementService, "_save", _saved(EpochState.CONFIRMED)),
}


def main(point: str) -> None:
    POINTS[point]()
    from node.cli import app

    app(["worker"])


if __name__ == "__main__":
    main(sys.argv[1])
