"""Deltas handed to the event loop from an engine's thread: every one arrives, in order, per stream,
and those handed over while the loop is busy cost it one wake-up together."""

import asyncio
import threading

from node.engine.delta_stream import LoopInbox
from node.engine.sequence import StreamDelta


def _delta(rid: str, i: int, last: bool = False) -> StreamDelta:
    return StreamDelta(rid, [i], str(i), "length" if last else None, 1, i + 1)


def test_deltas_of_many_streams_wake_the_loop_once_and_keep_each_streams_order():
    async def run() -> tuple[dict[str, list[str]], int]:
        loop = asyncio.get_running_loop()
        inbox, wakeups = LoopInbox(loop), 0
        deliver = inbox._deliver

        def counted() -> None:
            nonlocal wakeups
            wakeups += 1
            deliver()

        inbox._deliver = counted  # type: ignore[method-assign]
        queues = {f"r{s}": asyncio.Queue[StreamDelta]() for s in range(64)}

        def steps() -> None:  # the engine's thread: 3 steps, each with every stream's delta
            for i in range(3):
                for rid, q in queues.items():
                    inbox.put(q, _delta(rid, i, last=i == 2))

        thread = threading.Thread(target=steps)
        thread.start()
        thread.join()  # (blocking the loop: all 192 deltas are handed over before it runs again)
        got: dict[str, list[str]] = {}
        for rid, q in queues.items():
            while not (got.setdefault(rid, []) and got[rid][-1] == "2"):
                got[rid].append((await q.get()).text)
        return got, wakeups

    got, wakeups = asyncio.run(run())
    assert all(texts == ["0", "1", "2"] for texts in got.values())
    assert wakeups == 1  # 192 deltas handed over while the loop was busy: one wake-up took them all


def test_a_closed_loop_refuses_the_delta_so_the_engine_aborts_the_request():
    loop = asyncio.new_event_loop()
    inbox = LoopInbox(loop)
    loop.close()
    q: asyncio.Queue[StreamDelta] = asyncio.Queue()
    try:
        inbox.put(q, _delta("r", 0))
    except RuntimeError:
        pass
    else:
        raise AssertionError("a closed loop must refuse the delta")
    assert inbox._waiting == []
