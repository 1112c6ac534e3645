"""A suite's comparison: tables (rich and Markdown), report.md, plots, and metrics on the parent run."""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import optuna
from optuna.trial import TrialState
from rich.table import Table

from ablate import stats, studies
from ablate.specs import SUMMARY_METRICS, SuiteSpec, better
from ablate.stats import Summary
from ablate.tracking import Tracker

ALPHA = 0.05
CURVE_KEYS = ("val/cosine", "val/top1")
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
        metric = self.spec.metric
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


def build(study: optuna.Study, spec: SuiteSpec) -> SuiteReport:
    """Collect a suite's finished trials and compute every row of the comparison."""
    results = []
    seen = set()
    for t in study.get_trials(deepcopy=False, states=(TrialState.COMPLETE, TrialState.PRUNED)):
        if t.user_attrs.get(studies.SKIPPED_ATTR):
            continue
        exp, seed = t.params.get("experiment"), t.params.get("seed")
        if exp not in spec.experiments or seed not in spec.seeds or (exp, seed) in seen:
            continue
        seen.add((exp, seed))
        pruned = t.user_attrs.get("pruned_by") or {}
        results.append(TrialResult(
            t.number, str(exp), int(seed), t.state.name,
            dict(t.user_attrs.get("final", {})), dict(t.user_attrs.get("best", {})),
            t.user_attrs.get("mlflow_run_id"),
            "diverged" if t.user_attrs.get("diverged") else pruned.get("message", ""),
        ))
    report = SuiteReport(study.study_name, spec, sorted(results, key=lambda r: (r.experiment, r.seed)))
    report.missing = [
        f"{e} s{s}" for e in spec.experiments for s in spec.seeds if (e, s) not in seen
    ]
    for at in AT:
        for metric in _metrics(spec):
            _fill(report, metric, at)
    return report


def _metrics(spec: SuiteSpec) -> list[str]:
    return list(dict.fromkeys([spec.metric, *SUMMARY_METRICS]))


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
# Rendering
# --------------------------------------------------------------------------------------


def _num(x: float, digits: int = 3) -> str:
    return f"{x:.{digits}f}" if math.isfinite(x) else "n/a"


def _p(x: float) -> str:
    """A p-value with its relation sign: '=0.042' or '<0.001'."""
    if not math.isfinite(x):
        return "=n/a"
    return "<0.001" if x < 0.001 else f"={x:.3f}"


def cell(row: Row) -> str:
    """'mean ± half-width (change %, p=Holm-adjusted p)' for Markdown tables."""
    s = row.summary
    value = _num(s.mean) + (f" ± {_num(s.half_width)}" if math.isfinite(s.half_width) else "")
    if not math.isfinite(row.change_pct):
        return value
    return f"{value} ({row.change_pct:+.1f} %, p{_p(row.p_holm)}{'*' if row.significant else ''})"


def rich_table(report: SuiteReport) -> Table:
    """The comparison as a rich Table: per metric, each experiment at the final and the best epoch."""
    table = Table(
        title=f"{report.study_name}: mean ± 95 % CI over seeds; change vs {report.baseline!r} "
        "with Welch's p, Holm-adjusted (* < 0.05)",
        title_justify="left",
    )
    for col in ("metric", "experiment", "n"):
        table.add_column(col, no_wrap=True)
    for at in AT:
        table.add_column(f"{at} mean ± CI", justify="right", no_wrap=True)
        table.add_column("change", justify="right", no_wrap=True)
        table.add_column("p", justify="right", no_wrap=True)
    winner = report.winner
    metrics = _metrics(report.spec)
    for i, m in enumerate(metrics):
        exps = list(report.spec.experiments)
        for j, e in enumerate(exps):
            name = e + (" ★" if e == winner and m == report.spec.metric else "")
            cells = []
            for at in AT:
                r = report.row(e, m, at)
                s = r.summary
                ci = f" ± {_num(s.half_width)}" if math.isfinite(s.half_width) else ""
                change = "baseline" if e == report.baseline else (
                    f"{r.change_pct:+.1f} %" if math.isfinite(r.change_pct) else "n/a")
                p = "" if e == report.baseline else f"{_p(r.p_holm).lstrip('=')}{'*' if r.significant else ''}"
                cells += [f"{_num(s.mean)}{ci}", change, p]
            table.add_row(m if j == 0 else "", name, str(report.row(e, m).summary.n), *cells,
                          end_section=j == len(exps) - 1 and i < len(metrics) - 1)
    return table


def verdict(report: SuiteReport) -> list[str]:
    """Sentences: the winner, and each predicted gain against the measured one."""
    m = report.spec.metric
    w = report.winner
    lines = []
    if w == report.baseline:
        lines.append(f"No experiment beats the baseline {report.baseline!r} on {m} (final epoch).")
    else:
        r = report.row(w, m)
        sig = ("significantly (Holm-adjusted p" + _p(r.p_holm) + ")" if r.significant
               else "but not significantly (Holm-adjusted p" + _p(r.p_holm) + ")")
        lines.append(
            f"Best on {m}: {w!r}, {_num(r.summary.mean)} vs {_num(report.row(report.baseline, m).summary.mean)} "
            f"for {report.baseline!r} ({r.change_pct:+.1f} %), {sig}."
        )
    for exp, claim in report.spec.claims.items():
        r = report.row(exp, claim.metric)
        ch = r.change_pct
        if not math.isfinite(ch):
            lines.append(f"Claim for {exp!r} ({claim.low:+g} to {claim.high:+g} % on {claim.metric}): "
                         "not measurable yet.")
            continue
        where = "within" if claim.low <= ch <= claim.high else ("above" if ch > claim.high else "below")
        sig = "significant" if r.significant else "not significant"
        lines.append(
            f"Claim for {exp!r}: {claim.low:+g} to {claim.high:+g} % on {claim.metric}"
            + (f" ({claim.source})" if claim.source else "")
            + f"; measured {ch:+.1f} % ({sig}, p{_p(r.p_holm)}): {where} the predicted range."
        )
    return lines


def markdown(report: SuiteReport, plots: Sequence[str] = ()) -> str:
    """report.md: method, tables at the final and best epoch, claims, per-trial notes, plots."""
    spec = report.spec
    out = [f"# {report.study_name}", ""]
    if spec.description:
        out += [spec.description, ""]
    runs = spec.experiments[report.baseline]
    out += [
        f"Seeds: {', '.join(map(str, spec.seeds))}. Data: `{runs.data.source}` "
        f"({runs.data.split}-disjoint split, {runs.data.val_fraction:.0%} validation). "
        f"Headline metric: `{spec.metric}`.",
        "",
        "Each cell: mean ± half-width of the 95 % Student-t confidence interval over seeds; "
        f"in brackets the change of the mean against `{report.baseline}` and the p-value of "
        "Welch's t-test against it, Holm-adjusted over the experiments compared for that metric "
        "(* = below 0.05). 'best' takes each seed's best epoch for that metric, which favours "
        "every experiment by selection on the validation set; 'final' does not.",
        "",
    ]
    if report.missing:
        out += [f"**Incomplete**: {len(report.missing)} trial(s) not finished: "
                f"{', '.join(report.missing)}.", ""]
    out += ["## Verdict", ""] + [f"- {line}" for line in verdict(report)] + [""]
    metrics = _metrics(spec)
    for at in AT:
        out += [f"## {'Final' if at == 'final' else 'Best'} epoch", ""]
        out.append("| experiment | n | " + " | ".join(f"`{m}`" for m in metrics) + " |")
        out.append("|---|---:|" + "---:|" * len(metrics))
        for e in spec.experiments:
            label = e + (" (baseline)" if e == report.baseline else "") + (" ★" if e == report.winner else "")
            n = report.row(e, spec.metric, at).summary.n
            out.append(f"| {label} | {n} | " + " | ".join(cell(report.row(e, m, at)) for m in metrics) + " |")
        out.append("")
    notes = [r for r in report.trials if r.note]
    if notes:
        out += ["## Notes", ""] + [f"- {r.experiment} seed {r.seed}: {r.note}" for r in notes] + [""]
    if plots:
        out += ["## Curves", ""] + [f"![{Path(p).stem}]({Path(p).name})" for p in plots] + [""]
    return "\n".join(out)


# --------------------------------------------------------------------------------------
# Curves and publishing
# --------------------------------------------------------------------------------------


def curves(report: SuiteReport, tracker: Tracker, keys: Sequence[str] = CURVE_KEYS
           ) -> dict[str, dict[str, list[list[float]]]]:
    """Per experiment and metric, one per-epoch series per seed, read back from MLflow."""
    out: dict[str, dict[str, list[list[float]]]] = {e: {} for e in report.spec.experiments}
    for r in report.trials:
        if not r.run_id:
            continue
        for key in keys:
            hist = tracker.client.get_metric_history(r.run_id, key)
            series = [m.value for m in sorted(hist, key=lambda m: m.step)]
            if series:
                out.setdefault(r.experiment, {}).setdefault(key, []).append(series)
    return out


def plot(series: dict[str, dict[str, list[list[float]]]], key: str, path: Path, title: str) -> Path:
    """One line per experiment: the mean over seeds per epoch, with a 95 % CI band."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(8, 4.5), dpi=120)
    for exp, by_key in series.items():  # in the suite's order of experiments
        runs = by_key.get(key, [])
        if not runs:
            continue
        length = max(len(s) for s in runs)  # a seed that stopped early leaves the later epochs
        means, lows, highs = [], [], []
        for i in range(length):
            s = stats.summarize([run[i] for run in runs if len(run) > i])
            means.append(s.mean)
            lows.append(s.ci_low if math.isfinite(s.ci_low) else s.mean)
            highs.append(s.ci_high if math.isfinite(s.ci_high) else s.mean)
        epochs = list(range(1, length + 1))
        (line,) = ax.plot(epochs, means, label=f"{exp} (n={len(runs)})", linewidth=1.4)
        ax.fill_between(epochs, lows, highs, color=line.get_color(), alpha=0.2, linewidth=0)
    ax.set_xlabel("epoch")
    ax.set_ylabel(key)
    ax.set_title(title)
    ax.grid(alpha=0.3)
    ax.legend(loc="best", fontsize=8)
    fig.tight_layout()
    fig.savefig(path)
    plt.close(fig)
    return path


def write(report: SuiteReport, tracker: Tracker, out_dir: Path) -> list[Path]:
    """Write report.md and the curve plots into out_dir; returns the files written."""
    out_dir.mkdir(parents=True, exist_ok=True)
    series = curves(report, tracker)
    plots = [
        plot(series, key, out_dir / f"{key.replace('/', '_')}.png",
             f"{report.study_name}: {key} per epoch (mean, 95 % CI)")
        for key in CURVE_KEYS
    ]
    md = out_dir / "report.md"
    md.write_text(markdown(report, [str(p) for p in plots]))
    return [md, *plots]


def publish(report: SuiteReport, tracker: Tracker, parent_run_id: str, files: Sequence[Path]) -> None:
    """Put the report's files and aggregated numbers on the suite's parent run."""
    for f in files:
        tracker.log_artifact(parent_run_id, f, "report")
    metrics: dict[str, float] = {}
    for (exp, metric, at), row in report.rows.items():
        s = row.summary
        prefix = f"{exp}/{metric}/{at}"
        values: dict[str, Any] = {
            "mean": s.mean, "ci_low": s.ci_low, "ci_high": s.ci_high,
            "change_pct": row.change_pct, "p_holm": row.p_holm,
        }
        for k, v in values.items():
            metrics[f"{prefix}_{k}"] = v
    tracker.log_metrics(parent_run_id, metrics)
    tracker.set_tags(parent_run_id, {"ablate.winner": report.winner,
                                     "ablate.complete": str(report.complete).lower()})


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


def search_summary(study: optuna.Study, spec: Any) -> SearchSummary:
    """Summarise a study (search or suite) from its trials."""
    from ablate.specs import SearchSpec

    metric = spec.objective if isinstance(spec, SearchSpec) else spec.metric
    maximize = study.direction == optuna.study.StudyDirection.MAXIMIZE
    rows = []
    for t in study.get_trials(deepcopy=False):
        if t.user_attrs.get(studies.SKIPPED_ATTR):
            continue
        value = t.value
        if value is None and t.intermediate_values:
            inter = [v for v in t.intermediate_values.values() if math.isfinite(v)]
            value = (max(inter) if maximize else min(inter)) if inter else None
        note = ""
        if t.user_attrs.get("pruned_by"):
            note = str(t.user_attrs["pruned_by"].get("message", ""))
        elif t.user_attrs.get("error"):
            note = str(t.user_attrs["error"])
        rows.append(TrialRow(t.number, t.state.name, str(t.user_attrs.get("label", t.params)),
                             value, int(t.user_attrs.get("epochs_trained", len(t.intermediate_values))),
                             note))
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


def export(study: optuna.Study, fmt: str) -> str:
    """Every trial with its state, parameters, value and user attributes, as CSV or JSON."""
    import json

    records = []
    for t in study.get_trials(deepcopy=False):
        rec: dict[str, Any] = {
            "number": t.number, "state": t.state.name, "value": t.value,
            "datetime_start": t.datetime_start.isoformat() if t.datetime_start else None,
            "datetime_complete": t.datetime_complete.isoformat() if t.datetime_complete else None,
        }
        rec.update({f"params_{k}": v for k, v in t.params.items()})
        for k, v in t.user_attrs.items():
            if isinstance(v, dict):
                rec.update({f"{k}.{kk}": vv for kk, vv in v.items()})
            else:
                rec[k] = v
        records.append(rec)
    if fmt == "json":
        return json.dumps(records, indent=2, default=str) + "\n"
    import csv
    import io

    columns = list(dict.fromkeys(k for r in records for k in r))
    buf = io.StringIO()
    w = csv.DictWriter(buf, fieldnames=columns)
    w.writeheader()
    for r in records:
        w.writerow({k: json.dumps(v) if isinstance(v, (list, dict)) else v for k, v in r.items()})
    return buf.getvalue()
