"""Checkpoints of running trials, kept in the artifact store of each trial's MLflow run.

Every worker can read a run's artifacts (a folder on one machine, the tracking server's store on
many), so a trial whose worker died or was stopped continues on any machine from its last
checkpoint. A checkpoint is written when the time since the last one is at least ``1 / BUDGET``
times what the last one cost, which keeps checkpointing under ``BUDGET`` of training time however
fast an epoch is; a stopped run writes the state of its last finished epoch on its way out.
"""

from __future__ import annotations

import tempfile
import time
from pathlib import Path
from typing import Any

import torch

from ablate.tracking.client import Tracker

FOLDER = "checkpoint"
FILE = "state.pt"
BUDGET = 0.02
"""The share of training time checkpoints may cost."""


class Clock:
    """Says when the next checkpoint is due, so that writing them costs at most BUDGET of the time."""

    def __init__(self) -> None:
        self.last = time.monotonic()
        self.cost = 0.0

    def due(self) -> bool:
        """Whether enough time has passed since the last checkpoint for its cost to stay within BUDGET."""
        return time.monotonic() - self.last >= self.cost / BUDGET

    def spent(self, seconds: float) -> None:
        """A checkpoint was written and took ``seconds``."""
        self.cost = seconds
        self.last = time.monotonic()


def save(tracker: Tracker, run_id: str, state: dict[str, Any]) -> None:
    """Write a checkpoint into the run's artifacts (replacing the previous one)."""
    with tempfile.TemporaryDirectory(prefix="ablate-checkpoint-") as tmp:
        path = Path(tmp) / FILE
        torch.save(state, path)
        tracker.log_artifact(run_id, path, FOLDER)


def load(tracker: Tracker, run_id: str) -> dict[str, Any] | None:
    """The run's checkpoint, or None when it has none (loaded as data only: no code runs)."""
    with tempfile.TemporaryDirectory(prefix="ablate-checkpoint-") as tmp:
        try:
            local = tracker.client.download_artifacts(run_id, f"{FOLDER}/{FILE}", tmp)
        except Exception:  # no checkpoint, or the run lives in another store
            return None
        state: dict[str, Any] = torch.load(local, map_location="cpu", weights_only=True)
        return state


def remove(tracker: Tracker, run_id: str) -> None:
    """Delete the run's checkpoint (a finished trial needs none); a store that cannot delete keeps it."""
    from mlflow.store.artifact.artifact_repository_registry import get_artifact_repository

    try:
        uri = tracker.client.get_run(run_id).info.artifact_uri
        get_artifact_repository(uri).delete_artifacts(FOLDER)
    except Exception:  # a read-only or append-only artifact store: the checkpoint stays
        pass
