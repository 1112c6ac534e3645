"""One tracked run: train a RunSpec with the trainer and log every epoch to one MLflow run.

``train_and_log`` is the only place where a run is trained and tracked: ``ablate train`` calls it
for one run, the worker for each trial.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from ablate import stability
from ablate.data import split_fingerprint
from ablate.specs import RunSpec, StabilitySpec
from ablate.stability import Instability
from ablate.tracking import MetricBatch, Tracker, environment_tags
from ablate.trainer import EpochResult, Trainer

EpochHook = Callable[[EpochResult, list[dict[str, float]]], Instability | None]
"""Called after each epoch with its result and the run's history; a returned Instability stops the run."""


@dataclass
class RunOutcome:
    """What a tracked training run produced."""

    run_id: str
    history: list[dict[str, float]]
    trainer: Trainer
    stopped: Instability | None = None

    @property
    def final(self) -> dict[str, float]:
        """The last epoch's metrics."""
        return self.history[-1] if self.history else {}

    @property
    def best(self) -> dict[str, float]:
        """The best value of each metric of the vocabulary over the epochs (in its direction)."""
        return dict(self.trainer.best.values)

    @property
    def diverged(self) -> bool:
        """Whether a loss or the validation embeddings became non-finite."""
        return bool(self.stopped and self.stopped.rule == "nonfinite")


_NONFINITE_ONLY = StabilitySpec(enabled=False)


def train_and_log(
    run: RunSpec | Trainer,
    tracker: Tracker,
    experiment_id: str,
    run_name: str,
    *,
    tags: dict[str, Any] | None = None,
    parent_run_id: str | None = None,
    on_start: Callable[[str], None] | None = None,
    on_epoch: EpochHook | None = None,
    save_best: str | Path | None = None,
) -> RunOutcome:
    """Train one run and log it as one MLflow run (a child run when a parent is given).

    The trainer is built (data, batch, device and model checked) before the MLflow run is
    created, so a mistake leaves no RUNNING run behind. The run ends FINISHED (also when
    ``on_epoch`` stops it early), FAILED on an error and KILLED on Ctrl-C or SIGTERM; metrics
    logged before the end are kept. ``on_start`` receives the MLflow run id.
    """
    trainer = run if isinstance(run, Trainer) else Trainer.from_spec(run)
    spec = trainer.spec
    run_tags = {
        "ablate.loss": spec.loss,
        "ablate.device": str(trainer.device),
        "ablate.amp": trainer.amp.label,
        "ablate.data": spec.data.source,
        "ablate.data_fingerprint": split_fingerprint(spec.data),
        **environment_tags(),
        **(tags or {}),
    }
    run_id = tracker.start_run(experiment_id, run_name, run_tags, parent_run_id)
    outcome = RunOutcome(run_id, [], trainer)
    with tracker.run_status(run_id):
        tracker.log_params(run_id, {**spec.flat(), "train_pairs": len(trainer.train), "val_pairs": len(trainer.val)})
        tracker.log_dict(run_id, spec.model_dump(mode="json"), "spec.json")
        if on_start is not None:
            on_start(run_id)
        batch = MetricBatch(tracker, run_id, background=True)
        try:
            for result in trainer.epochs():
                outcome.history.append(result.metrics)
                batch.add(result.metrics, step=result.epoch)
                if result.diverged:
                    outcome.stopped = stability.check(outcome.history, _NONFINITE_ONLY) or Instability(
                        "nonfinite", f"non-finite validation output at epoch {result.epoch}",
                        {"epoch": result.epoch},
                    )
                    break
                if on_epoch is not None:
                    outcome.stopped = on_epoch(result, outcome.history)
                    if outcome.stopped is not None:
                        break
        finally:
            batch.close()
            _finish(tracker, outcome, batch, save_best)
    return outcome


def _finish(tracker: Tracker, outcome: RunOutcome, batch: MetricBatch, save_best: str | Path | None) -> None:
    run_id, trainer = outcome.run_id, outcome.trainer
    end_tags: dict[str, Any] = {"ablate.epochs_trained": len(outcome.history)}
    if batch.nonfinite:
        end_tags["ablate.diverged"] = ", ".join(f"{k}@epoch{v}" for k, v in batch.nonfinite.items())
    if outcome.stopped is not None:
        end_tags["ablate.stopped_by"] = outcome.stopped.rule
        end_tags["ablate.stop_reason"] = outcome.stopped.message
    if trainer.best.epoch >= 0:
        end_tags["ablate.best_epoch"] = trainer.best.epoch
    tracker.set_tags(run_id, end_tags)
    if outcome.history:
        tracker.log_dict(
            run_id,
            {"final": {k: v for k, v in outcome.final.items() if math.isfinite(v)}, "best": outcome.best,
             "best_epoch": trainer.best.epoch, "select_metric": trainer.spec.select_metric},
            "final_metrics.json",
        )
    if save_best is not None and trainer.best.state is not None:
        trainer.save_best(save_best)
