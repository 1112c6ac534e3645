"""Starting a study's workers on this machine: one in this process, the others one process per job or device.

Worker processes get signals from their parent only, stop when their parent is gone, and send
their events back through a queue; SIGTERM is treated like Ctrl-C everywhere, so a stopped trial
ends FAIL in Optuna and KILLED in MLflow.
"""

from __future__ import annotations

import multiprocessing as mp
import os
import queue as queue_mod
import signal
import threading
import time
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Any

from optuna.trial import TrialState

from ablate.errors import AblateError
from ablate.stores import Stores
from ablate.study.records import WorkerFailed
from ablate.study.worker import Context, OnEvent, work
from ablate.training.devices import available_cpus, cpu_share, set_cpu_share

SPAWN_AFTER_SECONDS = 3.0
"""With --jobs auto, more worker processes start only once this process has trained for this long with
trials still waiting: starting one costs seconds (it imports torch and MLflow), more than a small study."""
WORK_FOR_ALL = 1000
"""Trial-epochs queued from which every worker process starts at once (seconds of work even for the smallest head)."""


def execute(
    ctx: Context,
    stores: Stores,
    *,
    jobs: int = 1,
    devices: Sequence[str] = (),
    on_event: OnEvent | None = None,
    spawn_after: float = 0.0,
    array: int | None = 1,
    keep_checkpoints: bool = False,
) -> bool:
    """Run the study's trials with ``jobs`` workers (one per device when devices are given).

    One worker runs in this process, on ``ctx``; the others run as separate processes, started at
    once or, with ``spawn_after``, only when trials are still waiting after that many seconds. Every
    training process gets an equal share of the CPUs this one may use. Returns False when
    interrupted (Ctrl-C or SIGTERM): every running trial then ends FAIL and its run KILLED.
    """
    devs = list(devices)
    n = max(1, len(devs) if devs else jobs)
    share = cpu_share(n)
    set_cpu_share(share)
    group = _Workers(ctx.name, stores, [devs[i] if devs else None for i in range(1, n)], share, on_event,
                     (array, keep_checkpoints, n))
    interrupted = False
    with sigterm_as_interrupt():
        try:
            if spawn_after > 0:
                group.start_later(spawn_after, lambda: bool(ctx.study.get_trials(
                    deepcopy=False, states=(TrialState.WAITING,))))
            else:
                group.start()
            work(ctx, device=devs[0] if devs else None, on_event=on_event, array=array,
                 keep_checkpoints=keep_checkpoints, workers=n)
            group.join()
        except KeyboardInterrupt:
            interrupted = True
            group.stop()
        except BaseException:
            group.stop()
            raise
    codes = [p.exitcode for p in group.procs]
    if group.errors:
        raise AblateError(group.errors[0])
    if interrupted or 130 in codes:
        return False
    failed = [c for c in codes if c not in (0, None)]
    if failed:
        raise RuntimeError(f"{len(failed)} worker process(es) exited with codes {failed}")
    return True


class _Workers:
    """The worker processes beside this one: started, relayed, joined and stopped together."""

    def __init__(self, name: str, stores: Stores, devices: list[str | None], threads: int,
                 on_event: OnEvent | None, options: tuple[int | None, bool, int]):
        self.name, self.stores, self.devices, self.threads, self.on_event = name, stores, devices, threads, on_event
        self.options = options
        self.procs: list[Any] = []
        self.errors: list[str] = []
        self._lock = threading.Lock()
        self._stopped = False
        self._reader: threading.Thread | None = None
        self._stop_reader = threading.Event()
        self._timer: threading.Timer | None = None

    def start(self) -> None:
        """Start every worker process (unless the group was stopped meanwhile)."""
        with self._lock:
            if self._stopped or self.procs or not self.devices:
                return
            mp_ctx = mp.get_context("spawn")
            events: Any = mp_ctx.Queue()
            self._reader = threading.Thread(target=_relay, args=(events, self.on_event, self._stop_reader,
                                                                 self.errors), daemon=True)
            self._reader.start()
            for device in self.devices:
                p = mp_ctx.Process(target=_process_main, daemon=False,
                                   args=(self.name, self.stores, device, self.threads, events, self.options))
                p.start()
                self.procs.append(p)

    def start_later(self, seconds: float, still_needed: Callable[[], bool]) -> None:
        """Start the processes after ``seconds`` if ``still_needed()`` then."""
        def later() -> None:
            if still_needed():
                self.start()

        self._timer = threading.Timer(seconds, later)
        self._timer.daemon = True
        self._timer.start()

    def join(self) -> None:
        """Wait for every process, then for the relay of their events."""
        if self._timer is not None:
            self._timer.cancel()
            self._timer.join()
        for p in list(self.procs):
            p.join()
        self._close()

    def stop(self) -> None:
        """SIGTERM every process (each ends its trial cleanly), then SIGKILL what is left after a grace period."""
        with self._lock:
            self._stopped = True
        if self._timer is not None:
            self._timer.cancel()
        _stop_processes(self.procs)
        self._close()

    def _close(self) -> None:
        self._stop_reader.set()
        if self._reader is not None:
            self._reader.join(timeout=5)


def _stop_processes(procs: list[Any], grace_seconds: float = 60.0) -> None:
    """SIGTERM every worker process (each ends its trial cleanly), then SIGKILL what is left."""
    for p in procs:
        if p.is_alive() and p.pid is not None:
            os.kill(p.pid, signal.SIGTERM)
    deadline = time.monotonic() + grace_seconds
    for p in procs:
        p.join(timeout=max(0.0, deadline - time.monotonic()))
    for p in procs:
        if p.is_alive() and p.pid is not None:
            os.kill(p.pid, signal.SIGKILL)
            p.join()


def _relay(events: Any, on_event: OnEvent | None, stop: threading.Event, errors: list[str]) -> None:
    while not stop.is_set():
        try:
            event = events.get(timeout=0.2)
        except queue_mod.Empty:
            continue
        except (EOFError, OSError):
            return
        if isinstance(event, WorkerFailed):
            errors.append(event.message)
        elif on_event is not None:
            on_event(event)


def _process_main(name: str, stores: Stores, device: str | None, threads: int, events: Any,
                  options: tuple[int | None, bool, int]) -> None:
    # Signals come from the parent only: its own process group keeps the terminal's Ctrl-C away
    # (the parent forwards one SIGTERM), and SIGINT works even where the parent ignored it.
    os.setpgrp()
    signal.signal(signal.SIGINT, signal.default_int_handler)
    parent = os.getppid()
    set_cpu_share(threads)
    try:
        with sigterm_as_interrupt():
            work(Context.open(name, stores), device=device, on_event=events.put, array=options[0],
                 keep_checkpoints=options[1], keep_going=lambda: os.getppid() == parent, workers=options[2])
    except KeyboardInterrupt:
        raise SystemExit(130) from None
    except AblateError as e:
        events.put(WorkerFailed(str(e)))
        raise SystemExit(2) from None


@contextmanager
def sigterm_as_interrupt() -> Iterator[None]:
    """Treat SIGTERM like Ctrl-C (Optuna fails a running trial cleanly only on KeyboardInterrupt)."""
    if threading.current_thread() is not threading.main_thread():
        yield
        return

    def handler(signum: int, frame: Any) -> None:
        raise KeyboardInterrupt

    previous = signal.signal(signal.SIGTERM, handler)
    try:
        yield
    finally:
        signal.signal(signal.SIGTERM, previous)


@dataclass(frozen=True)
class Plan:
    """How a command trains its queue: worker processes, their devices, threads each, when to start them."""

    workers: int
    devices: list[str]
    threads: int
    spawn_after: float = 0.0


def plan(jobs: int | None, devices: Sequence[str], pending: int, epochs: int = 0) -> Plan:
    """The plan for ``jobs`` (None: auto) workers and ``pending`` trials of up to ``epochs`` epochs.

    Auto is one worker per CUDA device where there are any, else one per CPU this process may use
    (each on one thread): projection heads are too small for a second intra-op thread to pay, and
    workers on separate trials scale almost linearly. Never more workers than trials, whatever --jobs or
    --devices ask; on the CPU the extra processes start at once when the queue holds at least
    WORK_FOR_ALL trial-epochs, else only if the study lasts longer than SPAWN_AFTER_SECONDS (a short
    command pays for one process).
    """
    devs = list(devices)[: max(1, pending)]
    if devs:
        return Plan(len(devs), devs, cpu_share(len(devs)))
    if jobs is not None:
        n = max(1, min(jobs, pending))
        return Plan(n, [], cpu_share(n))
    import torch

    if torch.cuda.is_available():
        cuda = [f"cuda:{i}" for i in range(torch.cuda.device_count())][: max(1, pending)]
        return Plan(len(cuda), cuda, cpu_share(len(cuda)))
    n = 1 if torch.backends.mps.is_available() else min(available_cpus(), max(1, pending))
    return Plan(n, [], cpu_share(n), SPAWN_AFTER_SECONDS if n > 1 and pending * epochs < WORK_FOR_ALL else 0.0)
