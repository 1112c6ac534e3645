"""How results read: the suite comparison and a search's trials as rich tables and Markdown, the
verdict sentences, the live progress of a running study, and exports of a study's trials.
"""

from __future__ import annotations

import json
import math
import threading
import time
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import optuna
from rich import box
from rich.console import Console
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TaskID, TextColumn, TimeElapsedColumn
from rich.table import Table

from ablate.compare import AT, Row, SearchSummary, SuiteReport, report_metrics
from ablate.records import EpochEnded, Event, Note, TrialEnded, TrialRecord, TrialStarted
from ablate.specs import SCREENING_METRICS, SUMMARY_METRICS


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


def _signed(x: float, digits: int = 3) -> str:
    return f"{x:+.{digits}f}" if math.isfinite(x) else "n/a"


def _diff(row: Row) -> str:
    """'+0.122 [+0.020, +0.224]': the difference from the baseline and its 95 % interval."""
    c = row.comparison
    if c is None:
        return ""
    ci = f" [{_signed(c.ci_low)}, {_signed(c.ci_high)}]" if math.isfinite(c.half_width) else ""
    return _signed(c.diff) + ci


def _better(row: Row, interval: bool = False) -> str:
    """P(experiment better than baseline), optionally with its bootstrap interval."""
    c = row.comparison
    if c is None or not math.isfinite(c.prob_improvement):
        return ""
    text = f"{c.prob_improvement:.2f}"
    if interval and math.isfinite(c.pi_low):
        text += f" [{c.pi_low:.2f}, {c.pi_high:.2f}]"
    return text


def _seeds(row: Row) -> str:
    c = row.comparison
    if c is None:
        return ""
    if row.seeds_needed is not None:
        return str(row.seeds_needed)
    return ">1000" if math.isfinite(c.half_width) and c.half_width > 0 and c.diff != 0 else "n/a"


def _holm(row: Row) -> str:
    if row.comparison is None:
        return ""
    return _p(row.p_holm).lstrip("=") + ("*" if row.significant else "")


def _n_note(report: SuiteReport, metric: str, at: str) -> tuple[str, bool]:
    """'3 seeds' when every experiment has the same number of seeds (else each row says its own)."""
    ns = {report.row(e, metric, at).summary.n for e in report.spec.experiments}
    return (f"{ns.pop()} seeds", False) if len(ns) == 1 else ("seeds", True)


def comparison_table(report: SuiteReport, metric: str, at: str) -> Table:
    """One metric at the final or best epoch: each experiment against the baseline, in 80 columns."""
    tests = sorted({r.comparison.test for e in report.spec.experiments
                    if (r := report.row(e, metric, at)).comparison is not None})
    seeds, per_row = _n_note(report, metric, at)
    table = Table(title=f"{metric}, {at} epoch, {seeds}: mean ± 95 % CI; difference from {report.baseline!r} "
                  f"[95 % CI]; {' / '.join(tests) or 'no'} test, Holm-adjusted (* < 0.05)",
                  title_justify="left", box=box.SIMPLE_HEAD, padding=(0, 1), pad_edge=False)
    table.add_column("experiment", no_wrap=True)
    table.add_column("mean ± CI", justify="right", no_wrap=True)
    table.add_column("difference [CI]", justify="right", no_wrap=True)
    table.add_column("p", justify="right", no_wrap=True)
    table.add_column("P(>)", justify="right", no_wrap=True)
    table.add_column("seeds*", justify="right", no_wrap=True)
    for e in report.spec.experiments:
        r = report.row(e, metric, at)
        s = r.summary
        mean = _num(s.mean) + (f" ± {_num(s.half_width)}" if math.isfinite(s.half_width) else "")
        name = e + (" ★" if e == report.winner and metric == report.spec.objective and at == "final" else "")
        name += f" (n={s.n})" if per_row else ""
        diff = _diff(r) if r.comparison is not None else "(baseline)"
        table.add_row(name, mean, diff, _holm(r), _better(r), _seeds(r))
    table.caption = ("P(>): probability that the experiment beats the baseline (per seed pair when paired); "
                     "seeds*: seeds per experiment for 80 % power at the observed difference")
    table.caption_justify = "left"
    return table


def overview_table(report: SuiteReport, at: str, metrics: Sequence[str]) -> Table:
    """Metrics at the final or best epoch: mean and change against the baseline (and, for screening
    metrics, what a random ranking scores)."""
    table = Table(title=f"{at} epoch: mean and change vs {report.baseline!r} in % (* Holm-adjusted p < 0.05)",
                  title_justify="left", box=box.SIMPLE_HEAD, padding=(0, 1), pad_edge=False)
    table.add_column("experiment", no_wrap=True)
    for m in metrics:
        table.add_column(m.removeprefix("val/"), justify="right", no_wrap=True)
    for e in report.spec.experiments:
        cells = []
        for m in metrics:
            r = report.row(e, m, at)
            change = "" if not math.isfinite(r.change_pct) else f" {r.change_pct:+.0f}{'*' if r.significant else ''}"
            cells.append(_num(r.summary.mean) + change)
        table.add_row(e, *cells)
    floors = report.floors.get(report.baseline, {})
    if any(m in floors for m in metrics):
        table.add_row("(random)", *[_num(floors[m]) if m in floors else "" for m in metrics], style="dim")
    return table


def _has(report: SuiteReport, metric: str) -> bool:
    return any(math.isfinite(report.row(e, metric).summary.mean) for e in report.spec.experiments)


def suite_tables(report: SuiteReport) -> list[Table]:
    """The comparison for a terminal: the objective in detail at both epochs, then every metric's means
    (retrieval, then virtual screening with a random ranking's scores beside them)."""
    m = report.spec.objective
    retrieval = list(dict.fromkeys([m, *SUMMARY_METRICS]))
    screening = [k for k in SCREENING_METRICS if k != m and _has(report, k)]
    tables = [comparison_table(report, m, "final"), comparison_table(report, m, "best")]
    for at in AT:
        tables.append(overview_table(report, at, retrieval))
        if screening:
            tables.append(overview_table(report, at, screening))
    return tables


def verdict(report: SuiteReport) -> list[str]:
    """Sentences: the winner, and each predicted gain against the measured one."""
    m = report.spec.objective
    w = report.winner
    lines = []
    if w == report.baseline:
        lines.append(f"No experiment beats the baseline {report.baseline!r} on {m} (final epoch).")
    else:
        r = report.row(w, m)
        sig = ("significantly (Holm-adjusted p" + _p(r.p_holm) + ")" if r.significant
               else f"but not significantly ({_evidence(r)})")
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
        sig = f"significant, Holm-adjusted p{_p(r.p_holm)}" if r.significant else f"not significant, {_evidence(r)}"
        lines.append(
            f"Claim for {exp!r}: {claim.low:+g} to {claim.high:+g} % on {claim.metric}"
            + (f" ({claim.source})" if claim.source else "")
            + f"; measured {ch:+.1f} % ({sig}): {where} the predicted range."
        )
    return lines


def _evidence(row: Row) -> str:
    """Why a difference is not significant: its p-value, or why there is none."""
    c = row.comparison
    if c is not None and not math.isfinite(row.p_holm) and c.n >= 2 and not math.isfinite(c.half_width):
        return f"no test: every seed pair differs by the same {c.diff:+.3g}; more seeds would tell"
    return f"Holm-adjusted p{_p(row.p_holm)}"


def _test_name(test: str) -> str:
    return "the paired t-test" if test == "t" else "the Wilcoxon signed-rank test"


def _against_baseline(report: SuiteReport) -> list[str]:
    """report.md's table of the objective's comparisons: difference, tests, P(better), seeds for 80 % power."""
    m = report.spec.objective
    out = [f"## `{m}` against `{report.baseline}`", "",
           "Difference of means with its 95 % interval (paired where paired); the test and its p-value, "
           "unadjusted and Holm-adjusted; the probability that the experiment beats the baseline (over seed "
           "pairs when paired, over all pairs of runs otherwise) with a 95 % bootstrap interval; and how many "
           "seeds per experiment would detect the observed difference with 80 % power (two-sided, 5 %).", ""]
    for at in AT:
        out += [f"**{'Final' if at == 'final' else 'Best'} epoch**", "",
                "| experiment | n | difference [95 % CI] | test | p | p (Holm) | P(better) [95 % CI] "
                "| seeds for 80 % power |",
                "|---|---:|---:|---|---:|---:|---:|---:|"]
        for e in report.spec.experiments:
            r = report.row(e, m, at)
            if r.comparison is None:
                continue
            c = r.comparison
            out.append(f"| {e} | {c.n} | {_diff(r)} | {c.test} | {_p(c.p).lstrip('=')} | {_holm(r)} | "
                       f"{_better(r, interval=True)} | {_seeds(r)} |")
        out.append("")
    reasons = {report.row(e, m).why for e in report.spec.experiments if e != report.baseline}
    out += [f"Pairing: {'; '.join(sorted(reasons))}.", ""]
    return out


def _floor_row(report: SuiteReport, metrics: Sequence[str]) -> list[str]:
    """A Markdown row with what a random ranking of the baseline's validation set scores, if known."""
    floors = report.floors.get(report.baseline, {})
    if not any(m in floors for m in metrics):
        return []
    return ["| *random ranking* | | " + " | ".join(_num(floors[m]) if m in floors else "" for m in metrics) + " |"]


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
        f"Headline metric: `{spec.objective}`.",
        "",
        "Each cell: mean ± half-width of the 95 % Student-t confidence interval over seeds; "
        f"in brackets the change of the mean against `{report.baseline}` and the p-value of the test "
        "against it, Holm-adjusted over the experiments compared for that metric (* = below 0.05). "
        f"The test is paired by seed ({_test_name(spec.test)}) where an experiment has the baseline's data "
        "and model: the seed then fixes the same split, initial weights and batch order in both, and "
        "pairing removes that shared variance. Otherwise it is Welch's t-test. 'best' takes each seed's "
        "best epoch for that metric, which favours every experiment by selection on the validation set; "
        "'final' does not.",
        "",
    ]
    if report.missing:
        out += [f"**Incomplete**: {len(report.missing)} trial(s) not finished: "
                f"{', '.join(report.missing)}.", ""]
    out += ["## Verdict", ""] + [f"- {line}" for line in verdict(report)] + [""]
    out += _against_baseline(report)
    metrics = report_metrics(spec)
    for at in AT:
        out += [f"## {'Final' if at == 'final' else 'Best'} epoch", ""]
        out.append("| experiment | n | " + " | ".join(f"`{m}`" for m in metrics) + " |")
        out.append("|---|---:|" + "---:|" * len(metrics))
        for e in spec.experiments:
            label = e + (" (baseline)" if e == report.baseline else "") + (" ★" if e == report.winner else "")
            n = report.row(e, spec.objective, at).summary.n
            out.append(f"| {label} | {n} | " + " | ".join(cell(report.row(e, m, at)) for m in metrics) + " |")
        out += [*_floor_row(report, metrics), ""]
    notes = [r for r in report.trials if r.note]
    if notes:
        out += ["## Notes", ""] + [f"- {r.experiment} seed {r.seed}: {r.note}" for r in notes] + [""]
    if plots:
        out += ["## Curves", ""] + [f"![{Path(p).stem}]({Path(p).name})" for p in plots] + [""]
    return "\n".join(out)




# --------------------------------------------------------------------------------------
# A running study
# --------------------------------------------------------------------------------------


class StudyDisplay:
    """Live progress of a study: trials done / running / left, and each running trial's epoch."""

    def __init__(self, console: Console, total: int, done: int):
        self.progress = Progress(
            TextColumn("{task.description}"), BarColumn(), MofNCompleteColumn(),
            TextColumn("{task.fields[info]}", markup=False), TimeElapsedColumn(), console=console,
        )
        self.total = total
        self.done = done
        self.overall = self.progress.add_task("[bold]trials", total=total, completed=done, info="")
        self.running: dict[int, TaskID] = {}
        self.lock = threading.Lock()
        self._refresh()

    def _refresh(self) -> None:
        left = max(0, self.total - self.done - len(self.running))
        self.progress.update(self.overall, completed=self.done,
                             info=f"running {len(self.running)}, left {left}")

    def __call__(self, event: Event) -> None:
        with self.lock:
            if isinstance(event, TrialStarted):
                self.running[event.trial] = self.progress.add_task(
                    f"  #{event.trial} {event.label}", total=event.epochs, info="")
            elif isinstance(event, EpochEnded) and event.trial in self.running:
                v = event.value
                shown = f"{v:.3f}" if math.isfinite(v) else str(v)
                self.progress.update(self.running[event.trial], completed=event.epoch + 1,
                                     info=f"{event.metric} {shown}")
            elif isinstance(event, Note):
                self.progress.console.print(f"  {event.message}")
            elif isinstance(event, TrialEnded) and event.trial in self.running:
                self.progress.remove_task(self.running.pop(event.trial))
                if event.state in ("COMPLETE", "PRUNED"):
                    self.done += 1
                if event.state != "COMPLETE":
                    self.progress.console.print(f"  #{event.trial} {event.label}: {event.state}"
                                                + (f" ({event.reason})" if event.reason else ""))
            self._refresh()


class LogLines:
    """A study's progress without a terminal (nohup, a scheduler, docker logs): one plain line per trial
    event: started; every tenth of its epochs, with the headline metric; ended, with outcome, reason and
    duration."""

    def __init__(self, write: Callable[[str], None], total: int, done: int):
        self.write = write
        self.total = total
        self.done = done
        self.started: dict[int, tuple[float, int, str]] = {}
        self.lock = threading.Lock()

    def __call__(self, event: Event) -> None:
        with self.lock:
            if isinstance(event, TrialStarted):
                self.started[event.trial] = (time.monotonic(), event.epochs, event.label)
                self.write(f"trial #{event.trial} {event.label}: started ({event.epochs} epochs, pid {event.pid})")
            elif isinstance(event, EpochEnded) and event.trial in self.started:
                _, epochs, label = self.started[event.trial]
                every = max(1, epochs // 10)
                if (event.epoch + 1) % every == 0 and event.epoch + 1 < epochs:
                    self.write(f"trial #{event.trial} {label}: epoch {event.epoch + 1}/{epochs} "
                               f"{event.metric} {_num(event.value, 4)}")
            elif isinstance(event, Note):
                self.write(event.message)
            elif isinstance(event, TrialEnded):
                began = self.started.pop(event.trial, (time.monotonic(), 0, event.label))[0]
                if event.state in ("COMPLETE", "PRUNED"):
                    self.done += 1
                value = f", last value {_num(event.value, 4)}" if event.value is not None else ""
                why = f": {event.reason}" if event.reason else ""
                self.write(f"trial #{event.trial} {event.label}: {event.state}{why}{value}, "
                           f"{time.monotonic() - began:.1f} s ({self.done}/{self.total} done)")


def suite_markdown(report: SuiteReport) -> str:
    """The comparison as full-width Markdown tables (for logs: nothing is cut to a terminal's width)."""
    lines = _against_baseline(report)
    metrics = report_metrics(report.spec)
    for at in AT:
        lines += [f"**{'Final' if at == 'final' else 'Best'} epoch**: mean ± 95 % CI (change, Holm-adjusted p)", "",
                  "| experiment | n | " + " | ".join(f"`{m}`" for m in metrics) + " |",
                  "|---|---:|" + "---:|" * len(metrics)]
        for e in report.spec.experiments:
            n = report.row(e, report.spec.objective, at).summary.n
            lines.append(f"| {e} | {n} | " + " | ".join(cell(report.row(e, m, at)) for m in metrics) + " |")
        lines += [*_floor_row(report, metrics), ""]
    return "\n".join(lines)


# --------------------------------------------------------------------------------------
# A study's trials
# --------------------------------------------------------------------------------------


def fmt(v: float | None) -> str:
    """A value with four decimals, or '' when missing or not finite."""
    return "" if v is None or not math.isfinite(v) else f"{v:.4f}"


def _facts(summary: SearchSummary) -> list[str]:
    """What `studies show` says below its trials: waiting trials, counts by state, the best trial,
    importances, the expected best value per budget."""
    out: list[str] = []
    if summary.waiting:
        out.append(f"{summary.waiting} trial(s) waiting in the queue")
    out.append("trials by state: " + ", ".join(f"{k} {v}" for k, v in summary.states.items()))
    if summary.best is not None:
        out.append(f"best: trial #{summary.best.number} {summary.best.label} -> "
                   f"{summary.metric} {fmt(summary.best.value)}")
    if summary.importances:
        out.append("parameter importances (fANOVA): " + ", ".join(
            f"{k} {v:.2f}" for k, v in summary.importances.items()))
    if summary.expected_max:
        points = sorted({1, 2, 3, 5, 10, 20, 50, len(summary.expected_max)})
        cells = [f"{n}: {fmt(summary.expected_max[n - 1])}" for n in points
                 if n <= len(summary.expected_max)]
        out.append(f"expected best {summary.metric} with n trials (Dodge et al. 2019; a pruned trial "
                   "counts with the value it had reached): " + ", ".join(cells))
    return out


def summary_lines(name: str, summary: SearchSummary) -> list[Table | str]:
    """`studies show` for a terminal, in 80 columns: the trials table, why trials stopped (by trial
    number, below the table rather than in a column of it), then the facts (lines to word-wrap)."""
    table = Table(title=f"{name}: trials", title_justify="left", box=box.SIMPLE_HEAD, show_edge=False,
                  padding=(0, 1), pad_edge=False)
    table.add_column("#", justify="right", no_wrap=True)
    table.add_column("state", no_wrap=True)
    table.add_column("configuration", overflow="fold")
    table.add_column(summary.metric, justify="right", no_wrap=True)
    table.add_column("epochs", justify="right", no_wrap=True)
    for t in summary.trials:
        table.add_row(str(t.number), t.state, t.label, fmt(t.value), str(t.epochs))
    out: list[Table | str] = [table]
    noted = [t for t in summary.trials if t.note]
    if noted:
        notes = Table(title="notes", title_justify="left", box=None, show_header=False, padding=(0, 1),
                      pad_edge=False)
        notes.add_column(no_wrap=True)
        notes.add_column(overflow="fold")
        for t in noted:
            notes.add_row(f"#{t.number} {t.state}", t.note)
        out.append(notes)
    return out + _facts(summary)


def summary_markdown(name: str, summary: SearchSummary) -> str:
    """`studies show` for a log: the trials as a full-width Markdown table, then the facts."""
    def escaped(text: str) -> str:
        return text.replace("|", "\\|")

    lines = [f"**{escaped(name)}: trials**", "", f"| # | state | configuration | `{summary.metric}` | epochs | note |",
             "|---:|---|---|---:|---:|---|"]
    lines += [f"| {t.number} | {t.state} | {escaped(t.label)} | {fmt(t.value)} | {t.epochs} | {escaped(t.note)} |"
              for t in summary.trials]
    return "\n".join([*lines, "", *_facts(summary)])


def export(study: optuna.Study, kind: str) -> str:
    """Every trial with its state, parameters, value and user attributes, as CSV or JSON."""
    records = []
    for t in study.get_trials(deepcopy=False):
        rec: dict[str, Any] = {
            "number": t.number, "state": t.state.name, "value": t.value,
            "datetime_start": t.datetime_start.isoformat() if t.datetime_start else None,
            "datetime_complete": t.datetime_complete.isoformat() if t.datetime_complete else None,
        }
        rec["note"] = TrialRecord.of(t).note
        rec.update({f"params_{k}": v for k, v in t.params.items()})
        for k, v in t.user_attrs.items():
            if isinstance(v, dict):
                rec.update({f"{k}.{kk}": vv for kk, vv in v.items()})
            else:
                rec[k] = v
        records.append(rec)
    if kind == "json":
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
