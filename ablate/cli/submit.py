"""`ablate submit`: a study's workers placed by a scheduler (a SLURM job array of `ablate worker` tasks)."""

from __future__ import annotations

import os
from pathlib import Path
from typing import Annotated

import typer

from ablate import stores
from ablate.cli.app import ArrayOpt, HeartbeatOpt, StorageOpt, TrackingOpt, app, console, parse_array, stores_of
from ablate.errors import AblateError


@app.command(help=(
    "Submit workers for a study to a scheduler: a SLURM job array of N tasks, each running `ablate worker` on the "
    "study's storage and MLflow store.\n\n"
    "Create the study first (`ablate run-suite NAME --jobs 0` or `ablate tune NAME --jobs 0`, on a PostgreSQL "
    "storage). The script is written under ./slurm/ and reads the stores' URLs from its environment (no password in "
    "the file). SLURM sends SIGTERM before a task's time limit and on scancel: the running trial checkpoints and "
    "goes back to the queue, where another task, or a task submitted later, continues it."))
def submit(
    name: Annotated[str, typer.Argument(metavar="STUDY", help="The study (its name, or its spec's name for the "
                                        "newest).")],
    scheduler: Annotated[str, typer.Option(metavar="NAME", help="slurm (a job array) or kubernetes (an Indexed "
                                           "Job).")] = "slurm",
    workers: Annotated[int, typer.Option(min=1, metavar="N", help="Worker tasks (the job array's size).")] = 2,
    gpus_per_worker: Annotated[int, typer.Option(min=0, metavar="G", help="GPUs per task (--gres=gpu:G); each "
                                                 "task then trains one trial per GPU.")] = 0,
    cpus_per_worker: Annotated[int, typer.Option(min=1, metavar="C", help="CPUs per task; without GPUs, each "
                                                 "task trains C trials at once, one per CPU.")] = 1,
    mem: Annotated[str | None, typer.Option(metavar="SIZE", help="Memory per task, e.g. 16G.")] = None,
    partition: Annotated[str | None, typer.Option(metavar="NAME", help="SLURM partition.")] = None,
    time: Annotated[str | None, typer.Option(metavar="LIMIT", help="Time limit per task, e.g. 4:00:00.")] = None,
    account: Annotated[str | None, typer.Option(metavar="NAME", help="SLURM account.")] = None,
    sbatch_arg: Annotated[list[str] | None, typer.Option(metavar="ARG", help="Another #SBATCH line, e.g. "
                                                         "--qos=short (repeatable).")] = None,
    signal_before: Annotated[int, typer.Option(min=1, metavar="SECONDS", help="SIGTERM this long before the time "
                                               "limit, for the running trial to checkpoint.")] = 120,
    storage: StorageOpt = None,
    tracking_uri: TrackingOpt = None,
    heartbeat: HeartbeatOpt = stores.DEFAULT_HEARTBEAT_SECONDS,
    array: ArrayOpt = "auto",
    image: Annotated[str, typer.Option(metavar="IMAGE", help="Kubernetes: the worker image (docker/Dockerfile "
                                       "builds it).")] = "ablate:latest",
    namespace: Annotated[str, typer.Option(metavar="NS", help="Kubernetes: the namespace.")] = "default",
    secret: Annotated[str, typer.Option(metavar="NAME", help="Kubernetes: the Secret with keys storage and "
                                        "tracking-uri (the stores' URLs).")] = "ablate-stores",
    dry_run: Annotated[bool, typer.Option("--dry-run", help="Print the script; submit nothing.")] = False,
) -> None:
    """Submit workers for a study to a scheduler."""
    import shutil

    from ablate.study.schedulers import SlurmJob, check_shared, sbatch
    from ablate.study.session import StudySession

    parse_array(array)
    if scheduler not in ("slurm", "kubernetes"):
        raise AblateError(f"--scheduler {scheduler!r}: choose slurm or kubernetes")
    if scheduler == "kubernetes":
        _kubernetes(name, stores_of(storage, tracking_uri, heartbeat), workers, gpus_per_worker, cpus_per_worker, mem,
                    image, namespace, secret, signal_before, array, dry_run)
        return
    if not dry_run and shutil.which("sbatch") is None:
        raise AblateError("sbatch is not on PATH: run `ablate submit` on a SLURM login node, or use --dry-run to see "
                          "the script")
    store = stores_of(storage, tracking_uri, heartbeat)
    tracking = stores.resolve_tracking_uri(store.tracking_uri)
    check_shared(store.storage_url, "the Optuna storage", partition)
    check_shared(tracking, "the MLflow store", partition)
    session = StudySession.open(name, store, reading=True)
    if not dry_run and not session.pending():
        raise AblateError(f"study {session.name} has no trial waiting or running: there is nothing for workers to "
                          "take (run its run-suite or tune command to queue more)")
    folder = Path("slurm").resolve()
    job = SlurmJob(session.name, workers, gpus_per_worker, cpus_per_worker, mem, partition, time, account,
                   list(sbatch_arg or []), signal_before, heartbeat, array)
    text = job.script(folder, {"ABLATE_STORAGE": store.shown_storage, "MLFLOW_TRACKING_URI": stores.mask_url(tracking)})
    if dry_run:
        console.print(text, highlight=False, end="")
        return
    try:
        (folder / "logs").mkdir(parents=True, exist_ok=True)
        path = folder / f"{session.name}.sbatch"
        path.write_text(text)
    except OSError as e:
        raise AblateError(f"cannot write the batch script into {folder}: {e.strerror or e}") from None
    env = {**os.environ, "ABLATE_STORAGE": store.storage_url, "MLFLOW_TRACKING_URI": tracking}
    job_id = sbatch(path, env)
    console.print(f"submitted job {job_id}: {workers} worker task(s) for study {session.name} ({path})",
                  highlight=False)
    console.print(f"follow it: squeue -j {job_id}; ablate studies show {session.name} --storage {store.shown_storage}; "
                  f"logs in {folder / 'logs'}/{session.name}-{job_id}_*.out; stop it: scancel {job_id}",
                  highlight=False)


def _kubernetes(name: str, store: stores.Stores, workers: int, gpus: int, cpus: int, mem: str | None, image: str,
                namespace: str, secret: str, grace: int, array: str, dry_run: bool) -> None:
    """An Indexed Job of `ablate worker` pods: printed as YAML (--dry-run) or created with the Kubernetes client."""
    import yaml

    from ablate.study.schedulers import KubernetesJob, apply, local_path
    from ablate.study.session import StudySession

    tracking = stores.resolve_tracking_uri(store.tracking_uri)
    for uri, what in ((store.storage_url, "the Optuna storage"), (tracking, "the MLflow store")):
        if local_path(uri) is not None:
            raise AblateError(f"{what} {stores.mask_url(uri)} is a file on this machine, which pods cannot reach; use "
                              "a PostgreSQL URL (and an MLflow tracking server or database)")
    session = StudySession.open(name, store, reading=True)
    job = KubernetesJob(session.name, workers, image, secret, namespace, gpus, cpus, mem, grace,
                        store.heartbeat_seconds, array)
    manifest = job.manifest()
    if dry_run:
        console.print(yaml.safe_dump(manifest, sort_keys=False), highlight=False, end="")
        return
    created = apply(manifest, namespace)
    console.print(f"created Job {created} in namespace {namespace}: {workers} worker pod(s) for study {session.name}; "
                  f"follow it: kubectl -n {namespace} get pods -l ablate-study={created}; the Secret {secret} must "
                  "hold keys storage and tracking-uri", highlight=False)
