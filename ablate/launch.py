"""Starting a study's workers on this machine: in this process, or one process per job or device.

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
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from typing import Any

from ablate.errors import AblateError
from ablate.records import WorkerFailed
from ablate.stores import Stores
from ablate.worker import Context, OnEvent, work


def execute(
    ctx: Context,
    stores: Stores,
    *,
    jobs: int = 1,
    devices: Sequence[str] = (),
    on_event: OnEvent | None = None,
) -> bool:
    """Run the study's trials with ``jobs`` workers (one per device when devices are given).

    One worker runs in this process, on ``ctx``; more run as separate processes, each with an equal
    share of the CPU threads. Returns False when interrupted (Ctrl-C or SIGTERM).
    """
    devs = list(devices)
    n = len(devs) if devs else jobs
    if n <= 1:
        with sigterm_as_interrupt():
            try:
                work(ctx, device=devs[0] if devs else None, on_event=on_event)
            except KeyboardInterrupt:
                return False
        return True
    return _execute_processes(ctx.name, stores, n, devs, on_event)


def _execute_processes(name: str, stores: Stores, n: int, devs: list[str], on_event: OnEvent | None) -> bool:
    ctx = mp.get_context("spawn")
    events: Any = ctx.Queue()
    threads = max(1, (os.cpu_count() or 1) // n)
    procs = [
        ctx.Process(target=_process_main, args=(name, stores, devs[i] if devs else None, threads, events),
                    daemon=False)
        for i in range(n)
    ]
    stop_reader = threading.Event()
    errors: list[str] = []
    reader = threading.Thread(target=_relay, args=(events, on_event, stop_reader, errors), daemon=True)
    reader.start()
    interrupted = False
    with sigterm_as_interrupt():
        try:
            for p in procs:
                p.start()
            for p in procs:
                p.join()
        except KeyboardInterrupt:
            interrupted = True
            _stop_processes(procs)
    stop_reader.set()
    reader.join(timeout=5)
    codes = [p.exitcode for p in procs]
    if errors:
        raise AblateError(errors[0])
    if interrupted or 130 in codes:
        return False
    failed = [c for c in codes if c not in (0, None)]
    if failed:
        raise RuntimeError(f"{len(failed)} worker process(es) exited with codes {failed}")
    return True


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


def _process_main(name: str, stores: Stores, device: str | None, threads: int, events: Any) -> None:
    # Signals come from the parent only: its own process group keeps the terminal's Ctrl-C away
    # (the parent forwards one SIGTERM), and SIGINT works even where the parent ignored it.
    os.setpgrp()
    signal.signal(signal.SIGINT, signal.default_int_handler)
    parent = os.getppid()
    import torch

    torch.set_num_threads(threads)
    try:
        with sigterm_as_interrupt():
            work(Context.open(name, stores), device=device, on_event=events.put,
                 keep_going=lambda: os.getppid() == parent)
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
