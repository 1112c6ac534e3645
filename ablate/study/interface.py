"""The interface every kind of study implements (``StudyDesign``), what a trial trains (``Assignment``), and
what a study may be named.

Every study is an Optuna study whose trials are RunSpecs. A design says what its trials are
(``owed``: the trials still to queue; ``suggest``: a queued trial -> its RunSpec), how they are
judged (``objective``, ``direction``, ``judged_at``), sampled and pruned (``sampler``, ``pruner``,
``pruning``), and which runs to check before any trial starts (``preflight_runs``). The kinds are
in ``ablate.study.designs``.
"""

from __future__ import annotations

import abc
import re
from collections.abc import Sequence
from typing import TYPE_CHECKING, Any, ClassVar, Literal, NamedTuple

from pydantic import field_validator

from ablate.specs import RunSpec, StabilitySpec, _Strict
from ablate.vocabulary import ReportKey, better, on_split

if TYPE_CHECKING:
    import optuna
    from optuna.trial import FrozenTrial

Direction = Literal["maximize", "minimize"]

MAX_NAME_LENGTH = 64
_NAME = re.compile(r"[A-Za-z0-9_][A-Za-z0-9._-]*")
NAME_RULE = (f"1 to {MAX_NAME_LENGTH} letters, digits, '.', '_' or '-', not starting with '.' or '-'")
"""What a study or experiment name may be: it names folders, MLflow keys and the Optuna study."""


def valid_study_name(name: str) -> bool:
    """Whether ``name`` is a safe slug (NAME_RULE): no path separator, no leading dot, at most 64 characters."""
    return len(name) <= MAX_NAME_LENGTH and _NAME.fullmatch(name) is not None


class Assignment(NamedTuple):
    """What a trial trains: its RunSpec, the values that define it, and a short label for displays."""

    run: RunSpec
    values: dict[str, Any]
    label: str


class StudyDesign(_Strict):
    """The interface every kind of study implements."""

    kind: str
    name: str
    description: str = ""
    objective: ReportKey

    REPORT_ONLY: ClassVar[frozenset[str]] = frozenset({"description"})
    """Top-level keys that change what is reported, not what is trained (left out of the identity)."""

    @field_validator("name")
    @classmethod
    def _safe_name(cls, v: str) -> str:
        if not valid_study_name(v):
            raise ValueError(f"a study name is {NAME_RULE} (it names the report's folder); "
                             'e.g. name = "my-study"')
        return v

    @property
    def goal(self) -> Direction:
        """Whether a larger or a smaller objective is better."""
        return better(self.objective)

    @property
    def judged_at(self) -> Literal["best", "final"]:
        """A trial's value: the objective at its selected epoch or at its last one."""
        return "final"

    @property
    def watched(self) -> str:
        """The metric shown while trials train: the objective, measured on validation."""
        return on_split(self.objective, "val")

    @property
    def searches(self) -> bool:
        """Whether the trials sample a space of parameters (so parameter importances mean something)."""
        return False

    @property
    def report_interval(self) -> int | None:
        """Trials report their objective to Optuna every this many epochs (None: never)."""
        return None

    @property
    def stability_rules(self) -> StabilitySpec | None:
        """The rules that stop an unstable run (None: only a non-finite run stops)."""
        return None

    @abc.abstractmethod
    def make_sampler(self) -> optuna.samplers.BaseSampler:
        """The Optuna sampler that fills a queued trial's parameters."""

    @abc.abstractmethod
    def make_pruner(self) -> optuna.pruners.BasePruner:
        """The Optuna pruner the trials report to."""

    @abc.abstractmethod
    def owed(self, counted: Sequence[FrozenTrial], budget: int | None = None) -> list[dict[str, Any]]:
        """The fixed parameters of each trial still to queue, given the trials already counted."""

    @abc.abstractmethod
    def trial_count(self, budget: int | None = None) -> int:
        """How many trials the study owes in all."""

    @abc.abstractmethod
    def suggest(self, trial: optuna.Trial) -> Assignment:
        """The run a trial trains (its parameters are sampled or fixed in the queue)."""

    @abc.abstractmethod
    def preflight_runs(self) -> list[tuple[str, RunSpec]]:
        """Runs that fail the same way any trial would: checked before the first trial starts."""

    def missing(self, finished: Sequence[FrozenTrial]) -> list[str]:
        """Labels of trials the study owes that have no result among ``finished``."""
        return []

    def run_name(self, number: int, label: str) -> str:
        """The MLflow run name of a trial: short, so a runs table reads at a glance."""
        return f"{label} #{number}"

    @abc.abstractmethod
    def shape_of(self, trial: FrozenTrial) -> RunSpec | None:
        """A run with the shapes a queued trial will train (trials of equal ``preflight.fusion_key`` can
        train as one array), or None when its sampled parameters decide them."""

    def identity(self) -> dict[str, Any]:
        """What decides a study's trials (its Optuna name hashes this): the spec less REPORT_ONLY keys."""
        doc = self.model_dump(mode="json")
        for key in self.REPORT_ONLY:
            doc.pop(key, None)
        return _without_empty_loss_args(doc)


def _without_empty_loss_args(node: Any) -> Any:
    """A document without the runs' empty ``loss_args`` (a loss without settings of its own): a study's identity,
    and so its name, stays what it was before runs had them."""
    if isinstance(node, dict):
        return {k: _without_empty_loss_args(v) for k, v in node.items() if not (k == "loss_args" and v == {})}
    if isinstance(node, list):
        return [_without_empty_loss_args(v) for v in node]
    return node
