"""Many short trials: a study of one-epoch trials on tiny pairs, taken by many workers at once.

For each storage it creates a study of N trials, each one epoch on about 100 pairs (on PostgreSQL a search, `ablate
tune --jobs 0` with random sampling; on SQLite a suite of two experiments over N/2 seeds, `ablate run-suite --jobs
0`, so that `ablate report` is timed too), starts W `ablate worker` processes (or, with --slurm, a SLURM job array
of W tasks) with `--array 1`, and waits for them. It prints trials per minute against one worker on the same storage
(timed on its own study of --reference trials), the overhead per trial (each worker's wall time per trial minus the
trial's own training time; target under 0.1 s; with more workers than cores that wall time is shared, so the CPU
time the workers spent per trial is printed beside it), storage errors in the workers' output, configurations
trained twice and trials lost (0 each), and the time of `ablate studies show`, `ablate report`, `ablate studies
export` and the MLflow runs page (the search-runs request the UI sends for its first page) at N trials (targets:
under 5 s each).

    python benchmarks/scale.py --postgres postgresql://postgres@127.0.0.1:5432/DB [--trials 1000] [--workers 8]
           [--sqlite-workers 2] [--reference 100] [--slurm]

The PostgreSQL database must be empty (two are made from it: NAME for Optuna, NAME_mlflow for MLflow).
"""

from __future__ import annotations

import argparse
import os
import re
import resource
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import optuna

BASE = """\
[base]
epochs = 1
batch_size = 16
data = {{ source = "{data}" }}
model = {{ hidden = [16] }}
"""
"""What every trial of both studies trains: one epoch of a small head, batch 16, on the tiny pairs."""

SEARCH = """\
kind = "search"
name = "{name}"
n_trials = {trials}
""" + BASE + """\
loss = "infonce"
[params.temperature]
type = "float"
low = 0.05
high = 0.5
[sampler]
type = "random"
seed = 0
[pruner]
type = "none"
"""

SUITE = """\
kind = "suite"
name = "{name}"
objective = "test/top1"
baseline = "mse"
seeds = {seeds}
""" + BASE + """\
[experiments.mse]
loss = "mse"
[experiments.infonce]
loss = "infonce"
"""


def ablate(*args: str, cwd: Path, env: dict[str, str]) -> tuple[float, str]:
    t0 = time.perf_counter()
    done = subprocess.run([sys.executable, "-m", "ablate", *args], cwd=cwd, env=env, capture_output=True, text=True)
    if done.returncode != 0:
        raise SystemExit(f"`ablate {' '.join(args)}` exited {done.returncode}:\n{done.stdout[-2000:]}"
                         f"{done.stderr[-2000:]}")
    return time.perf_counter() - t0, done.stdout


def create(name: str, trials: int, folder: Path, env: dict[str, str], suite: bool = False) -> str:
    """Create a study of `trials` queued one-epoch trials (a search, or a suite of two experiments) and return its
    name."""
    text = (SUITE.format(name=name, seeds=list(range((trials + 1) // 2)), data=folder / "pairs.npz") if suite else
            SEARCH.format(name=name, trials=trials, data=folder / "pairs.npz"))
    (folder / f"{name}.toml").write_text(text)
    _, out = ablate("run-suite" if suite else "tune", f"{name}.toml", "--jobs", "0", cwd=folder, env=env)
    found = re.search(rf"study ({name}-\w+) in", out)
    assert found, out
    return found.group(1)


def run_workers(study: str, workers: int, folder: Path, env: dict[str, str], slurm: bool) -> tuple[float, str]:
    """Start the workers and wait for them all; returns (wall seconds, their output)."""
    t0 = time.perf_counter()
    if slurm:
        _, out = ablate("submit", study, "--workers", str(workers), "--array", "1", cwd=folder, env=env)
        job = re.search(r"submitted job (\d+)", out).group(1)  # type: ignore[union-attr]
        while subprocess.run(["squeue", "-h", "-j", job], capture_output=True, text=True).stdout.strip():
            time.sleep(0.5)
        wall = time.perf_counter() - t0
        return wall, "".join(p.read_text() for p in (folder / "slurm" / "logs").glob(f"{study}-{job}_*.out"))
    procs = [subprocess.Popen([sys.executable, "-m", "ablate", "worker", study, "--jobs", "1", "--array", "1"],
                              cwd=folder, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
             for _ in range(workers)]
    outs = [p.communicate()[0] for p in procs]
    return time.perf_counter() - t0, "".join(outs)


def measure(label: str, study: str, workers: int, folder: Path, env: dict[str, str], slurm: bool,
            per_worker_reference: float | None) -> float:
    """Train the study with `workers` workers and print what the module docstring lists; returns trials/min."""
    before = resource.getrusage(resource.RUSAGE_CHILDREN)
    wall, out = run_workers(study, workers, folder, env, slurm)
    after = resource.getrusage(resource.RUSAGE_CHILDREN)
    cpu = after.ru_utime + after.ru_stime - before.ru_utime - before.ru_stime
    trials = optuna.load_study(study_name=study, storage=env["ABLATE_STORAGE"]).get_trials(deepcopy=False)
    complete = [t for t in trials if t.state == optuna.trial.TrialState.COMPLETE]
    owed = len([t for t in trials if t.user_attrs.get("ablate.queued")]) or len(trials)
    training = [sum(v for k, v in t.user_attrs.get("final", {}).items() if k == "epoch_seconds") for t in complete]
    per_trial = wall * workers / max(1, len(complete))
    overhead = per_trial - statistics.mean(training or [0.0])
    params = [(t.user_attrs.get("label"), round(t.params.get("temperature", -1), 12)) for t in complete]
    errors = len(re.findall(r"(?i)(error|traceback|database is locked|deadlock)", out))
    rate = 60 * len(complete) / wall
    lost = len([t for t in trials if t.state != optuna.trial.TrialState.COMPLETE])
    cpu_note = "" if slurm else f"; worker CPU per trial {cpu / max(1, len(complete)):.3f} s"
    print(f"{label}: {len(complete)} of {owed} trials in {wall:.1f} s with {workers} worker(s) on "
          f"{os.cpu_count()} cores: {rate:.0f} trials/min"
          + (f" ({rate / per_worker_reference:.2f}x one worker)" if per_worker_reference else "")
          + f"; per trial per worker {per_trial:.3f} s, of which training {statistics.mean(training or [0]):.3f} s,"
          f" overhead {overhead:.3f} s (target < 0.1 s){cpu_note}; storage errors {errors}; trained twice "
          f"{len(params) - len(set(params))}; lost {lost}",
          flush=True)
    return rate


def reads(study: str, folder: Path, env: dict[str, str], suite: bool) -> None:
    """The time of what reads a large study: studies show, export, and the MLflow UI's first runs page."""
    show, _ = ablate("studies", "show", study, cwd=folder, env=env)
    report = (ablate("report", study, "--out", str(folder / f"report-{study}"), cwd=folder, env=env)[0]
              if suite else None)
    export, _ = ablate("studies", "export", study, "--format", "csv", "--output", "trials.csv", cwd=folder, env=env)
    from mlflow import MlflowClient

    client = MlflowClient(tracking_uri=env["MLFLOW_TRACKING_URI"])
    t0 = time.perf_counter()
    exp = client.get_experiment_by_name(study.rsplit("-", 1)[0])
    client.search_runs([exp.experiment_id], max_results=100, order_by=["attributes.start_time DESC"])
    page = time.perf_counter() - t0
    shown = "" if report is None else f"report {report:.2f} s, "
    print(f"  at that size ({'a suite' if suite else 'a search'}): studies show {show:.2f} s, {shown}"
          f"export {export:.2f} s, "
          f"MLflow runs page {page:.2f} s "
          "(targets < 5 s)", flush=True)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--postgres", required=True, help="an empty PostgreSQL database URL")
    ap.add_argument("--trials", type=int, default=1000)
    ap.add_argument("--workers", type=int, default=8)
    ap.add_argument("--sqlite-workers", type=int, default=2)
    ap.add_argument("--reference", type=int, default=100, help="trials of the one-worker reference on each storage")
    ap.add_argument("--slurm", action="store_true", help="PostgreSQL workers as a SLURM job array")
    args = ap.parse_args()
    import sqlalchemy

    from ablate.specs import SyntheticSpec
    from ablate.training.data import synthetic_pairs

    admin = sqlalchemy.create_engine(args.postgres.rsplit("/", 1)[0] + "/postgres", isolation_level="AUTOCOMMIT")
    mlflow_db = args.postgres.rsplit("/", 1)[1] + "_mlflow"
    with admin.connect() as c:
        c.execute(sqlalchemy.text(f'DROP DATABASE IF EXISTS "{mlflow_db}"'))
        c.execute(sqlalchemy.text(f'CREATE DATABASE "{mlflow_db}"'))
    with tempfile.TemporaryDirectory() as tmp:
        folder = Path(tmp)
        synthetic_pairs(SyntheticSpec(n_ligands=60, n_families=12, pocket_dim=8, ligand_dim=12,
                                      latent_dim=4)).save(folder / "pairs.npz")
        base = {k: v for k, v in os.environ.items() if k not in ("ABLATE_STORAGE", "MLFLOW_TRACKING_URI")}
        stores = {
            "PostgreSQL": {**base, "ABLATE_STORAGE": args.postgres,
                           "MLFLOW_TRACKING_URI": args.postgres.rsplit("/", 1)[0] + "/" + mlflow_db},
            "SQLite": {**base, "ABLATE_STORAGE": f"sqlite:///{folder / 'optuna.db'}",
                       "MLFLOW_TRACKING_URI": f"sqlite:///{folder / 'mlflow.db'}"},
        }
        for label, env in stores.items():
            workers = args.workers if label == "PostgreSQL" else args.sqlite_workers
            slurm = args.slurm and label == "PostgreSQL"
            suite = label == "SQLite"
            one = measure(f"{label}, reference", create(f"one-{label.lower()}", args.reference, folder, env, suite),
                          1, folder, env, False, None)
            study = create(f"scale-{label.lower()}", args.trials, folder, env, suite)
            measure(f"{label}{', SLURM tasks' if slurm else ''}", study, workers, folder, env, slurm, one)
            reads(study, folder, env, suite)


if __name__ == "__main__":
    main()
