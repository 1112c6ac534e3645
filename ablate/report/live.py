"""A running study's progress: a live display in a terminal, plain log lines without one."""

from __future__ import annotations

import math
import threading
import time
from collections.abc import Callable

from rich.console import Console
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TaskID, TextColumn, TimeElapsedColumn

from ablate.study.records import EpochEnded, Event, Note, TrialEnded, TrialStarted
from ablate.vocabulary import Outcome


class StudyDisplay:
    """Live progress of a study: trials done / running / left, and each running trial's epoch."""

    def __init__(self, console: Console, total: int, done: int):
        self.progress = Progress(
            TextColumn("{task.description}"), BarColumn(), MofNCompleteColumn(),
            TextColumn("{task.fields[info]}", markup=False), TimeElapsedColumn(), console=console,
        )
        self.total = total
        self.done = done
        self.overall = self.progress.add_task("[bold]trials", total=total, completed=done, info="")
        self.running: dict[int, TaskID] = {}
        self.lock = threading.Lock()
        self._refresh()

    def _refresh(self) -> None:
        left = max(0, self.total - self.done - len(self.running))
        self.progress.update(self.overall, completed=self.done,
                             info=f"running {len(self.running)}, left {left}")

    def __call__(self, event: Event) -> None:
        with self.lock:
            if isinstance(event, TrialStarted):
                self.running[event.trial] = self.progress.add_task(
                    f"  #{event.trial} {event.label}", total=event.epochs, info="")
            elif isinstance(event, EpochEnded) and event.trial in self.running:
                v = event.value
                shown = f"{v:.3f}" if math.isfinite(v) else str(v)
                self.progress.update(self.running[event.trial], completed=event.epoch + 1,
                                     info=f"{event.metric} {shown}")
            elif isinstance(event, Note):
                self.progress.console.print(f"  {event.message}")
            elif isinstance(event, TrialEnded) and event.trial in self.running:
                self.progress.remove_task(self.running.pop(event.trial))
                if event.state in (Outcome.COMPLETE, Outcome.PRUNED):
                    self.done += 1
                if event.state != Outcome.COMPLETE:
                    self.progress.console.print(f"  #{event.trial} {event.label}: {event.state}"
                                                + (f" ({event.reason})" if event.reason else ""))
            self._refresh()


class LogLines:
    """A study's progress without a terminal (nohup, a scheduler, docker logs): one plain line per trial
    event: started; every tenth of its epochs, with the headline metric; ended, with outcome, reason and
    duration."""

    def __init__(self, write: Callable[[str], None], total: int, done: int):
        self.write = write
        self.total = total
        self.done = done
        self.started: dict[int, tuple[float, int, str]] = {}
        self.lock = threading.Lock()

    def __call__(self, event: Event) -> None:
        with self.lock:
            if isinstance(event, TrialStarted):
                self.started[event.trial] = (time.monotonic(), event.epochs, event.label)
                self.write(f"trial #{event.trial} {event.label}: started ({event.epochs} epochs, pid {event.pid})")
            elif isinstance(event, EpochEnded) and event.trial in self.started:
                _, epochs, label = self.started[event.trial]
                every = max(1, epochs // 10)
                if (event.epoch + 1) % every == 0 and event.epoch + 1 < epochs:
                    self.write(f"trial #{event.trial} {label}: epoch {event.epoch + 1}/{epochs} "
                               f"{event.metric} {_num(event.value, 4)}")
            elif isinstance(event, Note):
                self.write(event.message)
            elif isinstance(event, TrialEnded):
                began = self.started.pop(event.trial, (time.monotonic(), 0, event.label))[0]
                if event.state in (Outcome.COMPLETE, Outcome.PRUNED):
                    self.done += 1
                value = f", last value {_num(event.value, 4)}" if event.value is not None else ""
                why = f": {event.reason}" if event.reason else ""
                self.write(f"trial #{event.trial} {event.label}: {event.state}{why}{value}, "
                           f"{time.monotonic() - began:.1f} s ({self.done}/{self.total} done)")


def _num(x: float, digits: int = 3) -> str:
    return f"{x:.{digits}f}" if math.isfinite(x) else "n/a"
