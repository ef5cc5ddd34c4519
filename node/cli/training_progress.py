"""The progress of `loranode adapter train`: a live bar on a terminal, a line per tenth of the run otherwise."""

from __future__ import annotations

import signal
import threading
from collections.abc import Iterator
from contextlib import contextmanager
from datetime import timedelta
from types import FrameType, TracebackType
from typing import TYPE_CHECKING

from rich.console import Console
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn, TimeRemainingColumn

if TYPE_CHECKING:
    from node.training.lora_trainer import StepReport, TrainingPlan


class TrainingProgress:
    """A `TrainingObserver` that shows steps, tokens/s, loss and the time left."""

    def __init__(self, console: Console) -> None:
        self.console = console
        self.is_live = console.is_terminal
        self.progress = Progress(
            TextColumn("step"), MofNCompleteColumn(), BarColumn(), TextColumn("{task.fields[rate]} tok/s"),
            TextColumn("loss {task.fields[loss]}"), TextColumn("ETA"), TimeRemainingColumn(), TimeElapsedColumn(),
            console=console, disable=not self.is_live,
        )
        self.task = self.progress.add_task("train", total=None, rate="-", loss="-")
        self.every = 1
        self.start_step = 0

    def __enter__(self) -> TrainingProgress:
        self.progress.start()
        return self

    def __exit__(self, kind: type[BaseException] | None, error: BaseException | None, tb: TracebackType | None) -> None:
        self.progress.stop()

    def on_start(self, plan: TrainingPlan) -> None:
        self.progress.update(self.task, total=plan.total_steps, completed=plan.start_step)
        self.every = max(1, (plan.total_steps - plan.start_step) // 10)
        self.start_step = plan.start_step
        resumed = f", resumed at step {plan.start_step}" if plan.start_step else ""
        self.console.print(f"training on {plan.num_tokens:,} tokens: {plan.packing()}, {plan.total_steps:,} steps "
                           f"({plan.steps_per_epoch:,} per epoch){resumed}", markup=False)

    def on_step(self, report: StepReport) -> None:
        self.progress.update(self.task, completed=report.step, rate=f"{report.tokens_per_s:,.0f}",
                             loss=f"{report.loss:.3f}")
        done_here = report.step - self.start_step
        if self.is_live or not (done_here == 1 or done_here % self.every == 0 or report.step == report.total_steps):
            return
        left = (report.total_steps - report.step) * report.elapsed_s / max(done_here, 1)
        self.console.print(f"step {report.step}/{report.total_steps}  {report.tokens_per_s:,.0f} tok/s  "
                           f"loss {report.loss:.3f}  ETA {timedelta(seconds=round(left))}", markup=False)


@contextmanager
def stop_on_ctrl_c(stop: threading.Event, console: Console) -> Iterator[None]:
    """The first Ctrl-C sets `stop` (the trainer ends the step in progress and checkpoints it, so no
    work is lost and a resumed run ends as an uninterrupted one would); a second one stops at once."""
    if threading.current_thread() is not threading.main_thread():
        yield  # signal handlers belong to the main thread: Ctrl-C behaves as Python's default
        return

    def first(signum: int, frame: FrameType | None) -> None:
        stop.set()
        signal.signal(signal.SIGINT, signal.default_int_handler)
        console.print("stopping after this step to write a checkpoint (Ctrl-C again stops now)", markup=False)

    previous = signal.signal(signal.SIGINT, first)
    try:
        yield
    finally:
        signal.signal(signal.SIGINT, previous)
