"""An operator's adapter action sent to several engine cores, done once each core has answered.

`CoreControls.open` records which cores an action went to and hands back its id and future; each
core's `AdapterControlled` answer (`answer`) takes that core off the list, keeping the first refusal;
when none is left the future ends, with that refusal if there was one. A core that stops first is
answered for with `answer_all` (Unavailable), so no action waits on a core that will never answer. An
answer for an id nobody waits for (a pin given again to a restarted core) is dropped.
"""

from __future__ import annotations

import threading
from concurrent.futures import Future
from dataclasses import dataclass

from node.errors import NodeError


@dataclass
class _Control:
    future: Future[None]
    cores: set[int]
    error: NodeError | None = None


class CoreControls:
    def __init__(self) -> None:
        self._controls: dict[int, _Control] = {}
        self._lock = threading.Lock()

    def open(self, control_id: int, cores: set[int]) -> Future[None]:
        done: Future[None] = Future()
        with self._lock:
            self._controls[control_id] = _Control(done, set(cores))
        return done

    def answer(self, control_id: int, core: int, error: NodeError | None) -> None:
        with self._lock:
            control = self._controls.get(control_id)
            if control is None or core not in control.cores:
                return
            control.cores.discard(core)
            control.error = control.error or error
            if control.cores:
                return
            del self._controls[control_id]
        if control.error is None:
            control.future.set_result(None)
        else:
            control.future.set_exception(control.error)

    def answer_all(self, core: int, error: NodeError) -> None:
        """Every action that core had not answered: answered with `error`."""
        with self._lock:
            waiting = [cid for cid, control in self._controls.items() if core in control.cores]
        for control_id in waiting:
            self.answer(control_id, core, error)
