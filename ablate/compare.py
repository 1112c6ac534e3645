"""From trial records to numbers: a suite's comparison against its baseline and a search's summary.

Everything here is computed from the Optuna study alone (each trial's record), so a report can be
rebuilt at any time without training or reading MLflow.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field

import optuna
from optuna.trial import TrialState

from ablate import stats, studies
from ablate.designs import StudySpec, SuiteSpec
from ablate.records import TrialRecord
from ablate.specs import SUMMARY_METRICS, better
from ablate.stats import Summary

ALPHA = 0.05
AT = ("final", "best")


@dataclass(frozen=True)
class TrialResult:
    """One finished (experiment, seed) trial of a suite."""

    number: int
    experiment: str
    seed: int
    state: str
    final: dict[str, float]
    best: dict[str, float]
    run_id: str | None
    note: str = ""


@dataclass(frozen=True)
class Row:
    """One experiment's numbers for one metric, at the final or the best epoch."""

    experiment: str
    metric: str
    at: str
    summary: Summary
    change_pct: float
    p: float
    p_holm: float

    @property
    def significant(self) -> bool:
        """Whether the Holm-adjusted p-value is below 0.05."""
        return math.isfinite(self.p_holm) and self.p_holm < ALPHA


@dataclass
class SuiteReport:
    """Everything the comparison shows, computed from the Optuna study."""

    study_name: str
    spec: SuiteSpec
    trials: list[TrialResult]
    rows: dict[tuple[str, str, str], Row] = field(default_factory=dict)
    missing: list[str] = field(default_factory=list)

    @property
    def baseline(self) -> str:
        """The baseline experiment's name."""
        return self.spec.baseline_name

    def row(self, experiment: str, metric: str, at: str = "final") -> Row:
        """The row of one experiment, metric and epoch choice."""
        return self.rows[(experiment, metric, at)]

    @property
    def winner(self) -> str:
        """The experiment with the best mean of the headline metric at the final epoch."""
        metric = self.spec.objective
        sign = 1.0 if better(metric) == "maximize" else -1.0
        scored = [
            (sign * self.row(e, metric).summary.mean, -i, e)
            for i, e in enumerate(self.spec.experiments)
            if math.isfinite(self.row(e, metric).summary.mean)
        ]
        return max(scored)[2] if scored else self.baseline

    @property
    def complete(self) -> bool:
        """Whether every (experiment, seed) trial has finished."""
        return not self.missing


def build_report(study: optuna.Study, spec: SuiteSpec) -> SuiteReport:
    """Collect a suite's finished trials and compute every row of the comparison."""
    results = []
    seen = set()
    for t in study.get_trials(deepcopy=False, states=studies.FINISHED):
        rec = TrialRecord.of(t)
        if rec.skipped:
            continue
        exp, seed = t.params.get("experiment"), t.params.get("seed")
        if exp not in spec.experiments or seed not in spec.seeds or (exp, seed) in seen:
            continue
        seen.add((exp, seed))
        results.append(TrialResult(rec.number, str(exp), int(seed), rec.state, rec.final, rec.best, rec.run_id,
                                   rec.note))
    report = SuiteReport(study.study_name, spec, sorted(results, key=lambda r: (r.experiment, r.seed)))
    report.missing = [f"{e} s{s}" for e in spec.experiments for s in spec.seeds if (e, s) not in seen]
    for at in AT:
        for metric in report_metrics(spec):
            _fill(report, metric, at)
    return report


def report_metrics(spec: SuiteSpec) -> list[str]:
    """The metrics a suite's report compares: its objective first, then the summary metrics."""
    return list(dict.fromkeys([spec.objective, *SUMMARY_METRICS]))


def _values(report: SuiteReport, experiment: str, metric: str, at: str) -> list[float]:
    out = []
    for r in report.trials:
        if r.experiment == experiment and r.note != "diverged":
            v = (r.final if at == "final" else r.best).get(metric)
            if v is not None:
                out.append(v)
    return out


def _fill(report: SuiteReport, metric: str, at: str) -> None:
    base_values = _values(report, report.baseline, metric, at)
    base = stats.summarize(base_values)
    others = [e for e in report.spec.experiments if e != report.baseline]
    pvals = [stats.welch_p(_values(report, e, metric, at), base_values) for e in others]
    adjusted = dict(zip(others, stats.holm(pvals), strict=True))
    raw = dict(zip(others, pvals, strict=True))
    nan = float("nan")
    for e in report.spec.experiments:
        s = stats.summarize(_values(report, e, metric, at))
        report.rows[(e, metric, at)] = Row(
            e, metric, at, s,
            stats.relative_change(s.mean, base.mean) if e != report.baseline else nan,
            raw.get(e, nan), adjusted.get(e, nan),
        )


# --------------------------------------------------------------------------------------
# Searches
# --------------------------------------------------------------------------------------


@dataclass(frozen=True)
class TrialRow:
    """One trial of a study, as listed by `ablate studies show`."""

    number: int
    state: str
    label: str
    value: float | None
    epochs: int
    note: str


@dataclass
class SearchSummary:
    """A study's trials, best trial, parameter importances and expected best value per budget."""

    metric: str
    trials: list[TrialRow]
    states: dict[str, int]
    best: TrialRow | None
    importances: dict[str, float]
    expected_max: list[float]


def search_summary(study: optuna.Study, spec: StudySpec) -> SearchSummary:
    """Summarise a study (search or suite) from its trials."""
    metric = spec.objective
    maximize = spec.goal == "maximize"
    rows = []
    for t in study.get_trials(deepcopy=False):
        rec = TrialRecord.of(t)
        if rec.skipped:
            continue
        value = rec.value
        if value is None and rec.reported:
            inter = [v for v in rec.reported.values() if math.isfinite(v)]
            value = (max(inter) if maximize else min(inter)) if inter else None
        rows.append(TrialRow(rec.number, rec.state, rec.label, value, rec.epochs,
                             str(rec.stop.get("message", "")) or rec.error))
    complete = [r for r in rows if r.state == "COMPLETE" and r.value is not None]
    best = None
    if complete:
        best = (max if maximize else min)(complete, key=lambda r: r.value or 0.0)
    finished = [r.value for r in rows if r.state in ("COMPLETE", "PRUNED") and r.value is not None]
    return SearchSummary(
        metric, rows, studies.counts(study), best, _importances(study),
        stats.expected_max([v for v in finished if v is not None], maximize),
    )


def _importances(study: optuna.Study) -> dict[str, float]:
    complete = study.get_trials(deepcopy=False, states=(TrialState.COMPLETE,))
    if len(complete) < 2 or not any(t.params for t in complete):
        return {}
    evaluator = optuna.importance.FanovaImportanceEvaluator(n_trees=64, max_depth=64, seed=0)
    try:
        return dict(optuna.importance.get_param_importances(study, evaluator=evaluator))
    except (RuntimeError, ValueError, ImportError):
        return {}
