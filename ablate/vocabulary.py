"""The vocabulary: the metric keys, MLflow tags and trial outcomes that MLflow, Optuna and the reports share.

Every key or tag ablate writes is a constant here; nothing else spells them.
"""

from __future__ import annotations

from enum import StrEnum
from typing import Literal

MetricKey = Literal[
    "train/loss",
    "train/inbatch_top1",
    "val/loss",
    "val/cosine",
    "val/top1",
    "val/top5",
    "val/top10",
    "val/mrr",
    "val/median_rank",
    "val/ef0.5",
    "val/ef1",
    "val/ef2",
    "val/ef5",
    "val/bedroc",
    "val/auroc",
]
"""The metrics a run is selected, stopped, pruned and searched by: training and validation, never test."""
METRIC_KEYS: tuple[str, ...] = MetricKey.__args__  # type: ignore[attr-defined]

TestKey = Literal[
    "test/loss",
    "test/cosine",
    "test/top1",
    "test/top5",
    "test/top10",
    "test/mrr",
    "test/median_rank",
    "test/ef0.5",
    "test/ef1",
    "test/ef2",
    "test/ef5",
    "test/bedroc",
    "test/auroc",
]
"""The test metrics: each run's validation-selected model scored once on the test split (one value per run)."""
TEST_KEYS: tuple[str, ...] = TestKey.__args__  # type: ignore[attr-defined]

ReportKey = Literal[MetricKey, TestKey]
"""What a suite's headline and a claim may name: any metric, test metrics included."""

LOWER_IS_BETTER = frozenset({"train/loss", "val/loss", "val/median_rank", "test/loss", "test/median_rank"})

SUMMARY_METRICS: tuple[str, ...] = ("val/cosine", "val/top1", "val/top5", "val/top10", "val/mrr")
"""The retrieval metrics a suite compares across experiments."""

SCREENING_METRICS: tuple[str, ...] = ("val/ef1", "val/ef5", "val/bedroc", "val/auroc")
"""The virtual-screening metrics a suite compares (every pocket screens the validation ligands)."""


def is_test(key: str) -> bool:
    """Whether a metric is measured on the test split."""
    return key.startswith("test/")


def on_split(key: str, split: Literal["val", "test"]) -> str:
    """The same metric measured on another split: ``on_split("test/top1", "val")`` is ``"val/top1"``."""
    return f"{split}/{key.split('/', 1)[1]}" if key.startswith(("val/", "test/")) else key


def better(key: str) -> Literal["maximize", "minimize"]:
    """Whether a larger or a smaller value of a metric is better."""
    return "minimize" if key in LOWER_IS_BETTER else "maximize"


EMBEDDING_DIAGNOSTICS: tuple[str, ...] = ("alignment", "uniformity", "spread")
"""Per-split diagnostics of the embeddings (``val/alignment``, ...: Wang and Isola 2020, and the spread of the
predicted directions the stability rules watch for collapse); logged, never selected or searched by."""


class Tag(StrEnum):
    """The MLflow run tags ablate sets (``ablate.<hyper-parameter>`` tags name a search's sampled values)."""

    STUDY = "ablate.study"
    """The study of a run (and of a study's parent run)."""
    TRIAL = "ablate.trial"
    EXPERIMENT = "ablate.experiment"
    SEED = "ablate.seed"
    LOSS = "ablate.loss"
    DEVICE = "ablate.device"
    AMP = "ablate.amp"
    DATA = "ablate.data"
    DATA_FINGERPRINT = "ablate.data_fingerprint"
    SPLIT = "ablate.split"
    ARRAY_SIZE = "ablate.array_size"
    FUSION = "ablate.fusion"
    VERSION = "ablate.version"
    KIND = "ablate.kind"
    """A parent run's study kind (suite or search)."""
    STATE = "ablate.state"
    """The trial's outcome (``Outcome``), as Optuna recorded it."""
    EPOCHS_TRAINED = "ablate.epochs_trained"
    BEST_EPOCH = "ablate.best_epoch"
    SELECTED_BY = "ablate.selected_by"
    STOPPED_BY = "ablate.stopped_by"
    """The stability rule that stopped (and pruned) the run."""
    STOP_REASON = "ablate.stop_reason"
    STOPPED_EARLY_AT = "ablate.stopped_early_at"
    DIVERGED = "ablate.diverged"
    RESUMED_FROM_EPOCH = "ablate.resumed_from_epoch"
    WINNER = "ablate.winner"
    ROADMAP = "ablate.roadmap"
    """The roadmap of a roadmap's MLflow run and of the model version it registered."""
    SLURM_JOB = "ablate.slurm_job"
    """The SLURM job (``JOB_TASK`` for a task of a job array) whose worker trained the run."""
    CHOSEN_BY = "ablate.chosen_by"
    """The validation metric that chose a registered model's configuration and run (a roadmap's final choice)."""
    DECISION = "ablate.decision"
    """A roadmap phase's decision, as ``ablate.decision.<phase>``."""


class Outcome(StrEnum):
    """How a trial ended (Optuna's state names)."""

    COMPLETE = "COMPLETE"
    PRUNED = "PRUNED"
    FAIL = "FAIL"
