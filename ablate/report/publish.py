"""Publishing results: a suite's per-epoch curves read back from MLflow, its plots, report.md and report.json,
the comparison on the suite's MLflow parent run, and a search's plots.
"""

from __future__ import annotations

import json
import math
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from pathlib import Path
from typing import Any

from ablate import losses
from ablate.errors import AblateError
from ablate.report.compare import SearchSummary, SuiteReport
from ablate.report.plots import search_plots, suite_curves
from ablate.report.render import markdown, verdict
from ablate.study.designs import SearchSpec
from ablate.tracking.client import Tracker
from ablate.vocabulary import SCREENING_METRICS, SUMMARY_METRICS, Tag


def curve_keys(report: SuiteReport) -> list[str]:
    """The metrics drawn per epoch: the objective, the retrieval and screening metrics, the training loss."""
    return list(dict.fromkeys([report.chosen_by, *SUMMARY_METRICS, *SCREENING_METRICS, "train/loss"]))


def curves(report: SuiteReport, tracker: Tracker, keys: Sequence[str]) -> dict[str, dict[str, list[list[float]]]]:
    """Per experiment and metric, one per-epoch series per seed, read back from MLflow."""
    out: dict[str, dict[str, list[list[float]]]] = {e: {} for e in report.spec.experiments}
    histories = tracker.histories([r.run_id for r in report.trials if r.run_id], keys)
    for r in report.trials:
        for key in keys:
            series = histories.get((r.run_id, key)) if r.run_id else None
            if series:
                out.setdefault(r.experiment, {}).setdefault(key, []).append(series)
    return out


def stage_switches(report: SuiteReport) -> dict[str, list[int]]:
    """The epochs where each experiment with a loss schedule (multi-stage) switches its loss."""
    switches = {e: losses.resolve(run.loss).switches(run) for e, run in report.spec.experiments.items()}
    return {e: epochs for e, epochs in switches.items() if epochs}


REPORT_JSON = "report.json"


def write_report(report: SuiteReport, tracker: Tracker, out_dir: Path) -> list[Path]:
    """Write report.md, report.json (every row of the comparison) and the curve plots into out_dir.

    Returns the files written, report.md first.
    """
    keys = curve_keys(report)
    series = curves(report, tracker, keys)
    with writing(f"the report to {out_dir}", f"fix that and run `ablate report {report.study_name} --out "
                  f"{out_dir.parent}` to write it again"):
        out_dir.mkdir(parents=True, exist_ok=True)
        plots = suite_curves(series, keys, out_dir, report.study_name, stage_switches(report))
        md = out_dir / "report.md"
        md.write_text(markdown(report, [str(p) for p in plots]))
        data = out_dir / REPORT_JSON
        data.write_text(json.dumps({"study": report.study_name, "stamp": report.stamp(),
                                    "objective": report.spec.objective, "headline_at": report.headline_at,
                                    "chosen_by": report.chosen_by, "winner": report.winner,
                                    "files": [md.name, *(p.name for p in plots)], "rows": report.rows_document()},
                                   indent=1))
    return [md, data, *plots]


@contextmanager
def writing(what: str, then: str) -> Iterator[None]:
    """A failed write (a full disk, a folder taken away) as one line: the trained results stay in the study."""
    try:
        yield
    except OSError as e:
        raise AblateError(f"could not write {what}: {e.strerror or e}; the trained results stay in the "
                          f"study: {then}") from None


def cached_report(report: SuiteReport, out_dir: Path) -> list[Path] | None:
    """The files of a report written earlier from the same trials (its rows loaded into ``report``), or None."""
    try:
        doc = json.loads((out_dir / REPORT_JSON).read_text())
    except (OSError, ValueError):
        return None
    files = [out_dir / name for name in doc.get("files", [])]
    if doc.get("stamp") != report.stamp() or not files or not all(f.is_file() for f in files):
        return None
    report.load_rows(doc["rows"])
    return [files[0], out_dir / REPORT_JSON, *files[1:]]


def publish(report: SuiteReport, tracker: Tracker, parent_run_id: str, files: Sequence[Path]) -> None:
    """Put the comparison on the suite's parent run: its files, the whole comparison as a table
    (comparison.json, a table in the UI), the verdict as the run's description, and one headline
    metric per experiment (the headline's mean), so the charts stay readable."""
    for f in files:
        tracker.log_artifact(parent_run_id, f, "report")
    tracker.log_table(parent_run_id, comparison_table(report), "comparison.json")
    objective = report.spec.objective
    tracker.log_metrics(parent_run_id, {f"{e}/{objective}": report.row(e, objective, report.headline_at).summary.mean
                                        for e in report.spec.experiments})
    tracker.set_tags(parent_run_id, {
        Tag.WINNER: report.winner,
        "ablate.complete": str(report.complete).lower(),
        "mlflow.note.content": "\n".join(f"- {line}" for line in verdict(report)),
    })


def comparison_table(report: SuiteReport) -> dict[str, list[Any]]:
    """Every row of the comparison as columns (experiment, metric, epoch, mean, interval, difference, tests)."""
    columns: dict[str, list[Any]] = {k: [] for k in (
        "experiment", "metric", "at", "n", "mean", "ci_low", "ci_high", "change_pct", "difference", "diff_low",
        "diff_high", "test", "p", "p_holm", "prob_improvement", "seeds_for_80pct_power")}
    for (exp, metric, at), row in report.rows.items():
        c, s = row.comparison, row.summary
        values = [exp, metric, at, s.n, s.mean, s.ci_low, s.ci_high, row.change_pct,
                  c.diff if c else None, c.ci_low if c else None, c.ci_high if c else None,
                  c.test if c else "baseline", c.p if c else None, row.p_holm if c else None,
                  c.prob_improvement if c else None, row.seeds_needed]
        for key, value in zip(columns, values, strict=True):
            columns[key].append(None if isinstance(value, float) and not math.isfinite(value) else value)
    return columns


def search_report(summary: SearchSummary, spec: SearchSpec, out_dir: Path, title: str) -> list[Path]:
    """A search's plots in out_dir: the objective against each parameter, the expected best per budget."""
    logs = {}
    for key, p in spec.params.items():
        for name in p.distributions(key):
            logs[name] = p.log
    maximize = spec.goal == "maximize"
    with writing(f"the search's plots to {out_dir}", f"see them with `ablate studies show {title}`"):
        return search_plots(summary.trials, logs, spec.objective, maximize, summary.expected_max, out_dir, title)
