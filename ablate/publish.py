"""Publishing a suite's comparison: per-epoch curves read back from MLflow, plots, report.md, and the
aggregated numbers on the suite's MLflow parent run.
"""

from __future__ import annotations

import json
import math
import warnings
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from ablate import stats
from ablate.compare import SuiteReport
from ablate.render import markdown, verdict
from ablate.tracking import Tracker

CURVE_KEYS = ("val/cosine", "val/top1")


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


REPORT_JSON = "report.json"


def write_report(report: SuiteReport, tracker: Tracker, out_dir: Path) -> list[Path]:
    """Write report.md, report.json (every row of the comparison) and the curve plots into out_dir.

    Returns the files written, report.md first.
    """
    out_dir.mkdir(parents=True, exist_ok=True)
    series = curves(report, tracker)
    plots = [
        plot(series, key, out_dir / f"{key.replace('/', '_')}.png",
             f"{report.study_name}: {key} per epoch (mean, 95 % CI)")
        for key in CURVE_KEYS
    ]
    md = out_dir / "report.md"
    md.write_text(markdown(report, [str(p) for p in plots]))
    data = out_dir / REPORT_JSON
    data.write_text(json.dumps({"study": report.study_name, "stamp": report.stamp(),
                                "files": [md.name, *(p.name for p in plots)], "rows": report.rows_document()},
                               indent=1))
    return [md, data, *plots]


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
    metric per experiment (the objective's final mean), so the charts stay readable."""
    for f in files:
        tracker.log_artifact(parent_run_id, f, "report")
    with warnings.catch_warnings():  # MLflow's own use of pandas warns about a future pandas change
        warnings.filterwarnings("ignore", message=".*select_dtypes.*")
        tracker.client.log_table(parent_run_id, comparison_table(report), "comparison.json")
    objective = report.spec.objective
    tracker.log_metrics(parent_run_id, {f"{e}/{objective}": report.row(e, objective).summary.mean
                                        for e in report.spec.experiments})
    tracker.set_tags(parent_run_id, {
        "ablate.winner": report.winner,
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
