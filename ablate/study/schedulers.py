"""Placing a study's workers with a scheduler: a SLURM job array of `ablate worker` tasks.

The scheduler only places workers; Optuna's storage hands out the trials. Each task runs ``ablate worker`` on the
study's storage and MLflow store, both given through the environment (``ABLATE_STORAGE``, ``MLFLOW_TRACKING_URI``),
so no password is ever written into a script. SLURM sends SIGTERM before a task's time limit (``--signal``) and on
``scancel``: the worker ends its trial cleanly, checkpointed, and queues it again at once, for another task or a
re-submitted one to continue (``--requeue`` puts a preempted task back in the queue).
"""

from __future__ import annotations

import os
import shlex
import shutil
import socket
import subprocess
import sys
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from ablate.errors import AblateError
from ablate.stores import mask_url, sqlite_file

SHARED_FILESYSTEMS = frozenset({
    "nfs", "nfs4", "lustre", "gpfs", "beegfs", "ceph", "cephfs", "cifs", "smb3", "glusterfs", "fuse.glusterfs",
    "panfs", "wekafs", "fuse.sshfs", "fuse.cephfs", "fuse.beegfs", "afs", "9p", "virtiofs",
})
"""File systems that every node of a cluster can mount: a SQLite store on one of them is reachable by every task."""


def slurm_job() -> str | None:
    """The SLURM job this process runs in: ``JOB_TASK`` for a task of a job array, else ``JOB`` (None outside one)."""
    array, task = os.environ.get("SLURM_ARRAY_JOB_ID"), os.environ.get("SLURM_ARRAY_TASK_ID")
    if array and task:
        return f"{array}_{task}"
    return os.environ.get("SLURM_JOB_ID") or None


@dataclass(frozen=True)
class SlurmJob:
    """What one job array asks SLURM for: N worker tasks and each one's resources."""

    study: str
    workers: int
    gpus: int = 0
    cpus: int = 1
    mem: str | None = None
    partition: str | None = None
    time: str | None = None
    account: str | None = None
    extra: list[str] = field(default_factory=list)
    signal_seconds: int = 120
    """SIGTERM this long before the time limit: the running trial checkpoints and goes back to the queue."""
    heartbeat: int | None = None
    array: str = "auto"
    """Each task's --array (compatible trials trained together)."""

    def script(self, folder: Path, shown: dict[str, str]) -> str:
        """The batch script: #SBATCH lines, then `ablate worker` in this folder with this Python (``shown``: the
        stores as printed, passwords masked; the task reads them from its environment)."""
        directives = [f"--job-name=ablate-{self.study}", f"--array=0-{self.workers - 1}", "--ntasks=1",
                      f"--cpus-per-task={self.cpus}", f"--signal=B:TERM@{self.signal_seconds}", "--requeue",
                      "--open-mode=append", f"--output={folder / 'logs'}/{self.study}-%A_%a.out"]
        directives += [f"--gres=gpu:{self.gpus}"] if self.gpus else []
        for flag, value in (("mem", self.mem), ("partition", self.partition), ("time", self.time),
                            ("account", self.account)):
            if value:
                directives.append(f"--{flag}={value}")
        directives += self.extra
        jobs = "auto" if self.gpus else str(self.cpus)
        worker = [sys.executable, "-m", "ablate", "worker", self.study, "--jobs", jobs, "--array", self.array]
        if self.heartbeat is not None:
            worker += ["--heartbeat", str(self.heartbeat)]
        lines = ["#!/bin/bash", *(f"#SBATCH {d}" for d in directives), "",
                 f"# ablate submit: {self.workers} worker task(s) for study {self.study}.",
                 *(f"# {name} (from the environment sbatch passes on): {value}" for name, value in shown.items()),
                 "# SIGTERM (the time limit's --signal, scancel) ends the running trial checkpointed and queues it",
                 "# again; exec makes the worker the task's own process, so it gets the signal.",
                 f"cd {shlex.quote(str(Path.cwd()))}",
                 f"exec {shlex.join(worker)}", ""]
        return "\n".join(lines)


def check_shared(uri: str, what: str, partition: str | None) -> None:
    """A SQLite file or a local folder store must be reachable from every task: on a shared file system, or on a
    cluster whose only node is this machine."""
    path = local_path(uri)
    if path is None or on_shared_filesystem(path) or single_node(partition):
        return
    raise AblateError(f"{what} {mask_url(uri)} is a file on this machine ({filesystem(path)}), which the tasks on "
                      "other nodes cannot reach; use a PostgreSQL URL (and an MLflow tracking server or database), or "
                      "put the store on a shared file system")


def local_path(uri: str) -> Path | None:
    """The file or folder behind a SQLite or file store URI (None for a database server or a tracking server)."""
    db = sqlite_file(uri)
    if db is not None:
        return db.resolve()
    if uri.startswith("file:"):
        return Path(uri.removeprefix("file://").removeprefix("file:")).resolve()
    if "://" not in uri:
        return Path(uri).resolve()
    return None


def filesystem(path: Path) -> str:
    """The type of the file system that holds ``path`` (the longest mount point above it)."""
    best, kind = "", "unknown"
    try:
        mounts = Path("/proc/mounts").read_text().splitlines()
    except OSError:
        return kind
    target = str(path)
    for line in mounts:
        parts = line.split()
        if len(parts) >= 3:
            point = parts[1].replace("\\040", " ")
            if (target == point or target.startswith(point.rstrip("/") + "/")) and len(point) >= len(best):
                best, kind = point, parts[2]
    return kind


def on_shared_filesystem(path: Path) -> bool:
    """Whether ``path`` lies on a network file system (every node can reach it)."""
    kind = filesystem(path)
    return kind in SHARED_FILESYSTEMS or kind.startswith("fuse.")


def single_node(partition: str | None) -> bool:
    """Whether every node of the partition (the default one without) is this machine."""
    if shutil.which("sinfo") is None:
        return False
    command = ["sinfo", "-h", "-N", "-o", "%N"] + (["-p", partition] if partition else [])
    try:
        out = subprocess.run(command, capture_output=True, text=True, timeout=10, check=True).stdout
    except (OSError, subprocess.SubprocessError):
        return False
    nodes = {line.strip() for line in out.splitlines() if line.strip()}
    here = {socket.gethostname(), socket.gethostname().split(".")[0]}
    return bool(nodes) and nodes <= here


def sbatch(script: Path, env: dict[str, str], extra: Sequence[str] = ()) -> str:
    """Submit a batch script; returns the job id."""
    if shutil.which("sbatch") is None:
        raise AblateError("sbatch is not on PATH: run `ablate submit` on a SLURM login node, or use --dry-run to see "
                          "the script")
    try:
        done = subprocess.run(["sbatch", "--parsable", *extra, str(script)], capture_output=True, text=True,
                              timeout=60, env=env)
    except subprocess.TimeoutExpired:
        raise AblateError("sbatch did not answer within 60 s: is slurmctld running? (try `sinfo`)") from None
    if done.returncode != 0:
        first = (done.stderr.strip() or done.stdout.strip() or f"exit code {done.returncode}").splitlines()[0]
        raise AblateError(f"sbatch refused the job: {mask_url(first)}")
    return done.stdout.strip().split(";")[0]


@dataclass(frozen=True)
class KubernetesJob:
    """An Indexed Job of N `ablate worker` pods; the stores' URLs come from a Secret."""

    study: str
    workers: int
    image: str
    secret: str = "ablate-stores"
    """A Secret with keys ``storage`` (the Optuna storage URL) and ``tracking-uri`` (the MLflow tracking URI)."""
    namespace: str = "default"
    gpus: int = 0
    cpus: int = 1
    mem: str | None = None
    grace_seconds: int = 120
    """Between SIGTERM (preemption, deletion) and SIGKILL: time for the running trial to checkpoint."""
    heartbeat: int | None = None
    array: str = "auto"

    def manifest(self) -> dict[str, object]:
        """The Job as a dict (batch/v1), ready for `kubectl apply -f` or the client's ``create_namespaced_job``."""
        jobs = "auto" if self.gpus else str(self.cpus)
        command = ["ablate", "worker", self.study, "--jobs", jobs, "--array", self.array]
        if self.heartbeat is not None:
            command += ["--heartbeat", str(self.heartbeat)]
        limits: dict[str, str] = {"cpu": str(self.cpus)}
        if self.gpus:
            limits["nvidia.com/gpu"] = str(self.gpus)
        if self.mem:
            limits["memory"] = self.mem
        env = [{"name": name, "valueFrom": {"secretKeyRef": {"name": self.secret, "key": key}}}
               for name, key in (("ABLATE_STORAGE", "storage"), ("MLFLOW_TRACKING_URI", "tracking-uri"))]
        name = f"ablate-{self.study}".lower().replace("_", "-").replace(".", "-")[:63].rstrip("-")
        return {
            "apiVersion": "batch/v1",
            "kind": "Job",
            "metadata": {"name": name, "namespace": self.namespace, "labels": {"app": "ablate", "ablate-study": name}},
            "spec": {
                "completionMode": "Indexed",
                "completions": self.workers,
                "parallelism": self.workers,
                "backoffLimitPerIndex": 3,
                "template": {
                    "metadata": {"labels": {"app": "ablate", "ablate-study": name}},
                    "spec": {
                        "restartPolicy": "Never",
                        "terminationGracePeriodSeconds": self.grace_seconds,
                        "containers": [{"name": "worker", "image": self.image, "command": command, "env": env,
                                        "resources": {"limits": limits, "requests": dict(limits)}}],
                    },
                },
            },
        }


def apply(manifest: dict[str, object], namespace: str) -> str:
    """Create the Job with the official Kubernetes client (``pip install 'ablate[kubernetes]'``); returns its name."""
    try:
        from kubernetes import client, config
    except ImportError:
        raise AblateError("the Kubernetes client is not installed: pip install 'ablate[kubernetes]' (or apply the "
                          "manifest that --dry-run prints with kubectl)") from None
    try:
        config.load_kube_config()
    except Exception:
        try:
            config.load_incluster_config()
        except Exception as e:
            raise AblateError(f"no Kubernetes configuration found (~/.kube/config, $KUBECONFIG, or in a pod): "
                              f"{str(e).splitlines()[0] if str(e) else type(e).__name__}") from None
    body: Any = manifest  # the client takes a dict as well as its V1Job model
    try:
        job = client.BatchV1Api().create_namespaced_job(namespace, body)
    except Exception as e:
        raise AblateError(f"Kubernetes refused the Job: {mask_url(str(e)).splitlines()[0]}") from None
    return str(getattr(job.metadata, "name", "") or manifest["metadata"]["name"])  # type: ignore[index]
