"""A run's selection: its epochs' results, the selected epoch (validation only) and early stopping."""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any

from torch import Tensor

from ablate.specs import RunSpec
from ablate.vocabulary import better


@dataclass(frozen=True)
class EpochResult:
    """What one epoch reports: metrics under the vocabulary's keys (may be non-finite).

    ``best_epoch`` is the selected epoch so far: the best selection metric (-1 before the first finite one).
    """

    epoch: int
    metrics: dict[str, float]
    stage: str | None = None
    best_epoch: int = -1
    diverged: bool = False
    stopped_early: bool = False
    """Early stopping ends the run here (``patience`` epochs without a better selection metric)."""
    error: str | None = None
    """Why the run's loss failed in this epoch (a user's loss that raised or returned no usable value)."""


class Best:
    """A run's selected epoch: the epoch with the best selection metric so far (a validation metric), every
    metric at that epoch, and the model and loss state (a learnable temperature) kept there.

    One instance per run serves the run's summary, the value a search reports to its pruner, early
    stopping, the model scored on the test split and the model logged.
    """

    def __init__(self, select: str):
        self.select = select
        self.epoch = -1
        """The selected epoch (-1 before the first finite selection metric)."""
        self.metrics: dict[str, float] = {}
        """Every finite metric at the selected epoch."""
        self.state: dict[str, Tensor] | None = None
        self.criterion_state: dict[str, Tensor] | None = None

    def update(self, epoch: int, metrics: dict[str, float]) -> bool:
        """Take in one epoch's metrics; returns whether the selection metric improved (the epoch is then selected)."""
        v = metrics.get(self.select)
        if v is None or not math.isfinite(v):
            return False
        old = self.metrics.get(self.select)
        if old is not None and not (v > old if better(self.select) == "maximize" else v < old):
            return False
        self.epoch, self.metrics = epoch, {k: x for k, x in metrics.items() if math.isfinite(x)}
        return True

    @property
    def value(self) -> float:
        """The selection metric at the selected epoch (NaN before the first finite value)."""
        return self.metrics.get(self.select, float("nan"))

    def document(self) -> dict[str, Any]:
        """The selection as a checkpoint keeps it."""
        return {"epoch": self.epoch, "metrics": dict(self.metrics), "state": self.state,
                "criterion_state": self.criterion_state}

    def load(self, doc: dict[str, Any]) -> None:
        """The selection as ``document`` gave it."""
        self.epoch, self.metrics = int(doc["epoch"]), dict(doc["metrics"])
        self.state, self.criterion_state = doc["state"], doc["criterion_state"]


def patience_over(spec: RunSpec, best: Best, epoch: int) -> bool:
    """Whether early stopping ends the run after ``epoch``: its selection metric has not improved for
    ``patience`` epochs, counted from the start of its last stage (a multi-stage run), never at the last epoch."""
    if spec.patience is None or epoch >= spec.epochs - 1:
        return False
    return epoch - max(best.epoch, spec.last_stage_start - 1) >= spec.patience
