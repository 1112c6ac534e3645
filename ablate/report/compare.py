"""From trial records to numbers: a suite's comparison against its baseline and a search's summary.

Everything here is computed from the Optuna study alone (each trial's record), so a report can be
rebuilt at any time without training or reading MLflow.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import math
from contextlib import suppress
from dataclasses import dataclass, field
from typing import Any, Literal

import optuna
from optuna.trial import FrozenTrial, TrialState

from ablate.report import stats
from ablate.report.stats import Comparison, Summary
from ablate.study import records, studies
from ablate.study.designs import StudySpec, SuiteSpec
from ablate.study.records import TrialRecord
from ablate.vocabulary import SCREENING_METRICS, SUMMARY_METRICS, Outcome, better, is_test, on_split

ALPHA = 0.05
AT = ("final", "selected")
"""Where a run's numbers are read: its last epoch, or its validation-selected epoch (its test metrics are there)."""
REPORT_FORMAT = 4
"""Bumped when the comparison's content changes, so cached reports are rebuilt."""


@dataclass(frozen=True)
class TrialResult:
    """One finished (experiment, seed) trial of a suite."""

    number: int
    experiment: str
    seed: int
    state: str
    final: dict[str, float]
    selected: dict[str, float]
    """Every validation (and training) metric at the run's selected epoch."""
    test: dict[str, float]
    """The selected model's test metrics."""
    run_id: str | None
    note: str = ""
    best_epoch: int = -1
    stopped_early_at: int | None = None
    split: str = ""

    def at(self, at: str) -> dict[str, float]:
        """The run's metrics at its last epoch (``final``) or at its selected epoch with its test metrics."""
        return self.final if at == "final" else {**self.selected, **self.test}


@dataclass(frozen=True)
class Row:
    """One experiment's numbers for one metric, at the final or the selected epoch.

    ``comparison`` (None for the baseline) holds the difference from the baseline with its interval,
    the test's p-value and the probability of improvement; ``p_holm`` is that p-value Holm-adjusted
    over the experiments compared for the metric; ``seeds_needed`` is how many seeds would detect the
    observed difference with 80 % power; ``why`` says why the comparison is paired or not.
    """

    experiment: str
    metric: str
    at: str
    summary: Summary
    change_pct: float
    comparison: Comparison | None
    p_holm: float
    seeds_needed: int | None = None
    why: str = ""

    @property
    def p(self) -> float:
        """The unadjusted p-value of the test against the baseline (NaN for the baseline)."""
        return self.comparison.p if self.comparison is not None else float("nan")

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
    floors: dict[str, dict[str, float]] = field(default_factory=dict)
    """Per experiment, what a random ranking scores on its validation set (val/ef1 -> 1.0, ...)."""

    @property
    def baseline(self) -> str:
        """The baseline experiment's name."""
        return self.spec.baseline_name

    def row(self, experiment: str, metric: str, at: str = "final") -> Row:
        """The row of one experiment, metric and epoch choice."""
        return self.rows[(experiment, metric, at)]

    @property
    def headline_at(self) -> str:
        """Where the headline is read: a test metric at each run's selected epoch, a validation one at the last."""
        return headline_at(self.spec)

    @property
    def chosen_by(self) -> str:
        """The validation metric that chooses the winner: the headline's, measured on validation."""
        return on_split(self.spec.objective, "val")

    @property
    def winner(self) -> str:
        """The experiment with the best mean of the headline's validation metric (at the headline's epoch):
        chosen on validation, never on test."""
        metric, at = self.chosen_by, self.headline_at
        sign = 1.0 if better(metric) == "maximize" else -1.0
        scored = [
            (sign * self.row(e, metric, at).summary.mean, -i, e)
            for i, e in enumerate(self.spec.experiments)
            if (e, metric, at) in self.rows and math.isfinite(self.row(e, metric, at).summary.mean)
        ]
        return max(scored)[2] if scored else self.baseline

    @property
    def complete(self) -> bool:
        """Whether every (experiment, seed) trial has finished."""
        return not self.missing

    def headline(self) -> list[Comparison]:
        """The comparisons that decide the suite: every experiment against the baseline on the objective."""
        return [c for e in self.spec.experiments
                if (c := self.row(e, self.spec.objective, self.headline_at).comparison) is not None]

    def stamp(self) -> str:
        """A hash of what the comparison is computed from (spec, finished trials, report format)."""
        doc = [REPORT_FORMAT, self.spec.model_dump(mode="json"),
               [(r.number, r.experiment, r.seed, r.state, r.final, r.selected, r.test, r.note) for r in self.trials]]
        return hashlib.sha256(json.dumps(doc, sort_keys=True, default=str).encode()).hexdigest()[:16]

    def rows_document(self) -> list[dict[str, Any]]:
        """The rows as JSON-able dicts (report.json)."""
        return [dataclasses.asdict(r) for r in self.rows.values()]

    def load_rows(self, rows: list[dict[str, Any]]) -> None:
        """Rows read back from ``rows_document``."""
        for d in rows:
            comp = d.pop("comparison")
            row = Row(**{**d, "summary": Summary(**d["summary"]),
                         "comparison": Comparison(**comp) if comp is not None else None})
            self.rows[(row.experiment, row.metric, row.at)] = row


def collect(study: optuna.Study, spec: SuiteSpec) -> SuiteReport:
    """A suite's finished trials (one per experiment and seed of the spec), without the comparison."""
    results = []
    seen = set()
    floors: dict[str, dict[str, float]] = {}
    for t in study.get_trials(deepcopy=False, states=studies.FINISHED):
        rec = TrialRecord.of(t)
        if rec.skipped:
            continue
        exp, seed = t.params.get("experiment"), t.params.get("seed")
        if exp not in spec.experiments or seed not in spec.seeds or (exp, seed) in seen:
            continue
        seen.add((exp, seed))
        results.append(TrialResult(rec.number, str(exp), int(seed), rec.state, rec.final, rec.selected, rec.test,
                                   rec.run_id, rec.note, rec.best_epoch, rec.stopped_early_at, rec.split))
        if rec.floors:
            floors.setdefault(str(exp), rec.floors)
    report = SuiteReport(study.study_name, spec, sorted(results, key=lambda r: (r.experiment, r.seed)),
                         floors=floors)
    report.missing = [f"{e} s{s}" for e in spec.experiments for s in spec.seeds if (e, s) not in seen]
    return report


def build_report(study: optuna.Study, spec: SuiteSpec) -> SuiteReport:
    """Collect a suite's finished trials and compute every row of the comparison."""
    return compute(collect(study, spec))


def compute(report: SuiteReport) -> SuiteReport:
    """Every row of a collected report's comparison (``report_rows``), computed from its trials."""
    for metric, at in report_rows(report.spec):
        _fill(report, metric, at)
    return report


def ensure_row(report: SuiteReport, experiment: str, metric: str, at: str) -> Row:
    """The row of one experiment, metric and epoch choice, computed if the report's rows do not hold it."""
    if (experiment, metric, at) not in report.rows:
        _fill(report, metric, at)
    return report.row(experiment, metric, at)


def headline_at(spec: SuiteSpec) -> str:
    """Where a suite's headline is read: a test metric at each run's selected epoch, any other at the last epoch."""
    return "selected" if is_test(spec.objective) else "final"


def report_metrics(spec: SuiteSpec, split: Literal["val", "test"] = "val") -> list[str]:
    """The metrics a suite's report compares on one split (``val`` or ``test``): its objective's first, then
    the retrieval and screening metrics."""
    names = [on_split(m, split) for m in (spec.objective, *SUMMARY_METRICS, *SCREENING_METRICS)]
    return list(dict.fromkeys(m for m in names if m.startswith(f"{split}/")))


def report_rows(spec: SuiteSpec) -> list[tuple[str, str]]:
    """Every (metric, where) the report compares: test metrics at the selected epoch, validation metrics there and
    at the last epoch (the claims' metrics included)."""
    rows = [(m, "selected") for m in report_metrics(spec, "test")]
    rows += [(m, at) for at in ("selected", "final") for m in report_metrics(spec, "val")]
    rows += [(c.metric, "selected" if is_test(c.metric) else "final") for c in spec.claims.values()]
    rows.append((spec.objective, headline_at(spec)))
    return list(dict.fromkeys(rows))


def pairing(spec: SuiteSpec, experiment: str) -> tuple[bool, str]:
    """Whether an experiment's seeds pair with the baseline's, and why.

    A seed fixes a run's initialisation and batch order; runs with the same data and model shape
    then share the split and the initial weights, which is most of the seed-to-seed variance.
    """
    run, base = spec.experiments[experiment], spec.experiments[spec.baseline_name]
    if run.data != base.data:
        return False, "unpaired (Welch): its data differ from the baseline's"
    if run.model != base.model:
        return False, "unpaired (Welch): its model differs from the baseline's"
    return True, "paired by seed: same data split and model as the baseline"


def _by_seed(report: SuiteReport, experiment: str, metric: str, at: str) -> dict[int, float]:
    out = {}
    for r in report.trials:
        if r.experiment == experiment and r.note != "diverged":
            v = r.at(at).get(metric)
            if v is not None:
                out[r.seed] = v
    return out


def _fill(report: SuiteReport, metric: str, at: str) -> None:
    spec = report.spec
    base = _by_seed(report, report.baseline, metric, at)
    base_summary = stats.summarize(list(base.values()))
    maximize = better(metric) == "maximize"
    comparisons: dict[str, Comparison] = {}
    reasons: dict[str, str] = {}
    needed: dict[str, int | None] = {}
    for e in spec.experiments:
        if e == report.baseline:
            continue
        values = _by_seed(report, e, metric, at)
        paired, why = pairing(spec, e)
        seeds = sorted(set(values) & set(base))
        if paired and len(seeds) < 2:
            paired, why = False, "unpaired (Welch): fewer than two seeds in common with the baseline"
        if paired:
            a, b = [values[s] for s in seeds], [base[s] for s in seeds]
        else:
            a, b = list(values.values()), list(base.values())
        c = stats.compare(a, b, paired=paired, test=spec.test if paired else "t", maximize=maximize)
        comparisons[e], reasons[e] = c, why
        sd = stats.sd_for_power(a, b, paired=paired)
        needed[e] = stats.seeds_for_power(c.diff, sd, paired=paired) if math.isfinite(c.diff) else None
    others = list(comparisons)
    adjusted = dict(zip(others, stats.holm([comparisons[e].p for e in others]), strict=True))
    for e in spec.experiments:
        s = stats.summarize(list(_by_seed(report, e, metric, at).values()))
        is_base = e == report.baseline
        report.rows[(e, metric, at)] = Row(
            e, metric, at, s,
            float("nan") if is_base else stats.relative_change(s.mean, base_summary.mean),
            comparisons.get(e), adjusted.get(e, float("nan")), needed.get(e), reasons.get(e, "baseline"),
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
    params: dict[str, Any] = field(default_factory=dict)
    test: dict[str, float] = field(default_factory=dict)
    """The trial's selected model on the test split (shown for the best trial; nothing chooses by it)."""


@dataclass
class SearchSummary:
    """A study's trials, best trial, parameter importances and expected best value per budget."""

    metric: str
    trials: list[TrialRow]
    states: dict[str, int]
    best: TrialRow | None
    importances: dict[str, float]
    expected_max: list[float]
    waiting: int = 0


def search_summary(study: optuna.Study, spec: StudySpec) -> SearchSummary:
    """Summarise a study (search or suite) from its trials; waiting trials are only counted.

    A trial's value is Optuna's: the objective of a COMPLETE trial, the last value a PRUNED trial
    reported, none for a FAIL; every FAIL and PRUNED trial says why it stopped.
    """
    metric = spec.objective
    maximize = spec.goal == "maximize"
    trials = study.get_trials(deepcopy=False)
    retried_as = {n: t.number for t in trials
                  if (n := optuna.storages.RetryHeartbeatStaleTrialCallback.retried_trial_number(t)) is not None}
    rows = []
    waiting = 0
    for t in trials:
        rec = TrialRecord.of(t)
        if rec.skipped:
            continue
        if rec.state == "WAITING":
            waiting += 1
            continue
        note = rec.note
        if rec.state == Outcome.FAIL and not note:
            note = "the worker stopped sending heartbeats (it died or lost the database)"
        if rec.number in retried_as:
            note += f"; retried as #{retried_as[rec.number]}"
        if rec.job:
            note += ("; " if note else "") + f"SLURM job {rec.job}"
        rows.append(TrialRow(rec.number, rec.state, rec.label, rec.value if rec.state != Outcome.FAIL else None,
                             rec.epochs, note, dict(t.params), rec.test))
    complete = [r for r in rows if r.state == Outcome.COMPLETE and r.value is not None]
    best = None
    chooses = not is_test(metric)  # a suite's test headline is reported, never used to pick a trial
    if complete and chooses:
        best = (max if maximize else min)(complete, key=lambda r: r.value or 0.0)
    finished = [r.value for r in rows if r.state in (Outcome.COMPLETE, Outcome.PRUNED) and r.value is not None]
    return SearchSummary(
        metric, rows, studies.counts(study, trials), best, _importances(study, trials) if spec.searches else {},
        stats.expected_max([v for v in finished if v is not None], maximize) if chooses else [], waiting,
    )


def _importances(study: optuna.Study, trials: list[FrozenTrial]) -> dict[str, float]:
    """fANOVA importances of the complete ``trials`` (the study's), kept on the study for the trials they were
    computed from (fANOVA and the scikit-learn it loads take seconds; a finished study's show or re-run reads them
    back)."""
    complete = [t for t in trials if t.state == TrialState.COMPLETE]
    if len(complete) < 2 or not any(t.params for t in complete):
        return {}
    key = [len(complete), max(t.number for t in complete)]
    kept = study.user_attrs.get(records.IMPORTANCES)
    if isinstance(kept, dict) and kept.get("trials") == key:
        return dict(kept["values"])
    evaluator = optuna.importance.FanovaImportanceEvaluator(n_trees=64, max_depth=64, seed=0)
    try:
        values = dict(optuna.importance.get_param_importances(study, evaluator=evaluator))
    except (RuntimeError, ValueError, ImportError):  # e.g. every trial with the same value: nothing to apportion
        values = {}
    with suppress(Exception):  # a storage only read (read-only file, a reader's role): computed again next time
        study.set_user_attr(records.IMPORTANCES, {"trials": key, "values": values})
    return values
