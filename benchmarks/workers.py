"""Throughput of two worker processes against one on the same kind of study (trials per minute).

Creates the temperature search (pruning off, fixed epochs) twice, in two scratch stores, and runs it
with one `ablate worker` and with two, each process limited to one torch thread. Uses the
PostgreSQL server at --postgres when it answers (a scratch database per run), else SQLite files.

    python benchmarks/workers.py [--n-trials 10] [--epochs 120] [--postgres postgresql://postgres@127.0.0.1/postgres]

Times run from the workers' start to the last one's exit, so they include each process's start-up
(importing torch and MLflow, opening the stores: several seconds).
"""

from __future__ import annotations

import argparse
import os
import subprocess
import sys
import tempfile
import time
import uuid
from pathlib import Path

import optuna

from ablate.study import studies


def scratch_storage(admin: str, workdir: Path) -> tuple[str, object]:
    try:
        import sqlalchemy

        engine = sqlalchemy.create_engine(admin, isolation_level="AUTOCOMMIT")
        conn = engine.connect()
    except Exception:
        return f"sqlite:///{workdir / 'optuna.db'}", None
    name = f"ablate_bench_{uuid.uuid4().hex[:8]}"
    conn.execute(sqlalchemy.text(f'CREATE DATABASE "{name}"'))
    return f"{admin.rsplit('/', 1)[0]}/{name}", (conn, name)


def drop(handle: object) -> None:
    if handle is None:
        return
    import sqlalchemy

    conn, name = handle  # type: ignore[misc]
    conn.execute(sqlalchemy.text(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)'))


def run(workers: int, n_trials: int, epochs: int, admin: str) -> tuple[float, int, str]:
    with tempfile.TemporaryDirectory() as tmp:
        workdir = Path(tmp)
        storage, handle = scratch_storage(admin, workdir)
        try:
            base = [sys.executable, "-m", "ablate"]
            subprocess.run([*base, "tune", "temperature", "--n-trials", str(n_trials), "--jobs", "0",
                                   "--storage", storage, "--set", f"epochs={epochs}", "--set", "pruner.type=none",
                            "--set", "stability.enabled=false"],
                           cwd=workdir, check=True, stdout=subprocess.DEVNULL)
            name = studies.load("temperature", studies.open_storage(storage)).name
            env = {**os.environ, "OMP_NUM_THREADS": "1", "MKL_NUM_THREADS": "1"}
            t0 = time.perf_counter()
            procs = [subprocess.Popen([*base, "worker", name, "--storage", storage], cwd=workdir, env=env,
                                      stdout=subprocess.DEVNULL) for _ in range(workers)]
            for p in procs:
                assert p.wait() == 0
            seconds = time.perf_counter() - t0
            study = studies.load(name, studies.open_storage(storage)).study
            done = len(study.get_trials(states=(optuna.trial.TrialState.COMPLETE,)))
            kind = storage.split(":", 1)[0]
        finally:
            drop(handle)
    return seconds, done, kind


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--n-trials", type=int, default=10)
    ap.add_argument("--epochs", type=int, default=120)
    ap.add_argument("--postgres", default="postgresql://postgres@127.0.0.1:5432/postgres")
    args = ap.parse_args()
    t1, d1, kind = run(1, args.n_trials, args.epochs, args.postgres)
    t2, d2, _ = run(2, args.n_trials, args.epochs, args.postgres)
    r1, r2 = d1 / (t1 / 60), d2 / (t2 / 60)
    print(f"temperature search, {args.n_trials} trials x {args.epochs} epochs, {kind} storage, "
          f"one torch thread per process, {os.cpu_count()} CPU cores")
    print(f"  1 worker : {d1} trials in {t1:6.1f} s = {r1:5.2f} trials/min")
    print(f"  2 workers: {d2} trials in {t2:6.1f} s = {r2:5.2f} trials/min")
    print(f"  throughput ratio 2/1: {r2 / r1:.2f}")


if __name__ == "__main__":
    main()
