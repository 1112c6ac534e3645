"""How results read: the suite comparison and a search's trials as rich tables and Markdown, the
verdict sentences, the live progress of a running study, and exports of a study's trials.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from pathlib import Path

from rich import box
from rich.table import Table

from ablate.report.compare import Row, SearchSummary, SuiteReport, TrialRow, report_metrics
from ablate.vocabulary import SCREENING_METRICS, is_test, on_split


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


def where(metric: str, at: str) -> str:
    """Where a number was measured, in words: 'test, selected model', 'validation, final epoch', ..."""
    if is_test(metric):
        return "test, selected model"
    if metric.startswith("train/"):
        return f"training, {at} epoch"
    return f"validation, {at} epoch"


def comparison_table(report: SuiteReport, metric: str, at: str) -> Table:
    """One metric at the final or selected epoch: each experiment against the baseline, in 80 columns."""
    tests = sorted({r.comparison.test for e in report.spec.experiments
                    if (r := report.row(e, metric, at)).comparison is not None})
    seeds, per_row = _n_note(report, metric, at)
    table = Table(title=f"{metric} ({where(metric, at)}), {seeds}: mean ± 95 % CI; difference from "
                  f"{report.baseline!r} [95 % CI]; {' / '.join(tests) or 'no'} test, Holm-adjusted (* < 0.05)",
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
        name = e + (" ★" if e == report.winner and metric == report.spec.objective and at == report.headline_at else "")
        name += f" (n={s.n})" if per_row else ""
        diff = _diff(r) if r.comparison is not None else "(baseline)"
        table.add_row(name, mean, diff, _holm(r), _better(r), _seeds(r))
    table.caption = ("P(>): probability that the experiment beats the baseline (per seed pair when paired); "
                     f"seeds*: seeds per experiment for 80 % power at the observed difference; ★ chosen on "
                     f"{report.chosen_by} ({where(report.chosen_by, report.headline_at)})")
    table.caption_justify = "left"
    return table


def overview_table(report: SuiteReport, at: str, metrics: Sequence[str]) -> Table:
    """Metrics at the final or selected epoch: mean and change against the baseline (and, for screening
    metrics, what a random ranking scores)."""
    table = Table(title=f"{where(metrics[0], at)}: mean and change vs {report.baseline!r} in % "
                  "(* Holm-adjusted p < 0.05)",
                  title_justify="left", box=box.SIMPLE_HEAD, padding=(0, 1), pad_edge=False)
    table.add_column("experiment", no_wrap=True)
    for m in metrics:
        table.add_column(m.split("/", 1)[-1], justify="right", no_wrap=True)
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


def _has(report: SuiteReport, metric: str, at: str) -> bool:
    return any((e, metric, at) in report.rows and math.isfinite(report.row(e, metric, at).summary.mean)
               for e in report.spec.experiments)


def sections(report: SuiteReport) -> list[tuple[str, str, list[str]]]:
    """The report's tables of means: (heading, where, metrics): the selected models on test, validation at the
    selected epoch (biased upwards by the selection), validation at the final epoch."""
    select = ", ".join(sorted({f"`{r.select_metric}`" for r in report.spec.experiments.values()}))
    out = [
        ("Test: each run's selected model, scored once", "selected", report_metrics(report.spec, "test")),
        (f"Validation at the selected epoch (biased upwards: {select} chose that epoch on these pairs)", "selected",
         report_metrics(report.spec, "val")),
        ("Validation at the final epoch", "final", report_metrics(report.spec, "val")),
    ]
    return [(title, at, [m for m in metrics if _has(report, m, at)]) for title, at, metrics in out]


def suite_tables(report: SuiteReport) -> list[Table]:
    """The comparison for a terminal: the headline in detail, then the test metrics of the selected models and
    the validation metrics at the final epoch (retrieval, then virtual screening with a random ranking's scores)."""
    tables = [comparison_table(report, report.spec.objective, report.headline_at)]
    screening = {m.split("/", 1)[1] for m in SCREENING_METRICS}
    for title, at, metrics in sections(report):
        if title.startswith("Validation at the selected"):
            continue
        for group in ([m for m in metrics if m.split("/", 1)[1] not in screening],
                      [m for m in metrics if m.split("/", 1)[1] in screening]):
            if group:
                tables.append(overview_table(report, at, group))
    return tables


def selection_rule(report: SuiteReport) -> str:
    """One sentence: what chose each run's model, the winner and the headline, and on which pairs."""
    runs = report.spec.experiments.values()
    select = " / ".join(sorted({f"{r.select_metric}" for r in runs}))
    patience = sorted({r.patience for r in runs if r.patience is not None})
    stopping = (f", stopping after {' / '.join(map(str, patience))} epochs without improvement" if patience
                else "")
    m = report.spec.objective
    scored = (f"test metrics ({m} the headline) score that model once and choose nothing" if is_test(m)
              else f"the headline {m} is read at the final epoch")
    return (f"Each run keeps its epoch with the best {select} on validation{stopping}; {scored}; the winner is "
            f"chosen on {report.chosen_by} ({where(report.chosen_by, report.headline_at)}).")


def verdict(report: SuiteReport) -> list[str]:
    """Sentences: what was chosen on what, the winner, and each predicted gain against the measured one."""
    m, at = report.spec.objective, report.headline_at
    w = report.winner
    lines = [selection_rule(report)]
    if w == report.baseline:
        lines.append(f"No experiment beats the baseline {report.baseline!r} on {report.chosen_by} "
                     f"({where(report.chosen_by, at)}).")
        r = None
    else:
        r = report.row(w, m, at)
        sig = ("significantly (Holm-adjusted p" + _p(r.p_holm) + ")" if r.significant
               else f"but not significantly ({_evidence(r)})")
        chosen = f"Best on {report.chosen_by}: {w!r}" + (f"; on {m} ({where(m, at)})" if m != report.chosen_by else "")
        lines.append(
            f"{chosen}: {_num(r.summary.mean)} vs {_num(report.row(report.baseline, m, at).summary.mean)} "
            f"for {report.baseline!r} ({r.change_pct:+.1f} %), {sig}."
        )
    for exp, claim in report.spec.claims.items():
        r = report.row(exp, claim.metric, "selected" if is_test(claim.metric) else "final")
        ch = r.change_pct
        if not math.isfinite(ch):
            lines.append(f"Claim for {exp!r} ({claim.low:+g} to {claim.high:+g} % on {claim.metric}): "
                         "not measurable yet.")
            continue
        in_range = "within" if claim.low <= ch <= claim.high else ("above" if ch > claim.high else "below")
        sig = f"significant, Holm-adjusted p{_p(r.p_holm)}" if r.significant else f"not significant, {_evidence(r)}"
        lines.append(
            f"Claim for {exp!r}: {claim.low:+g} to {claim.high:+g} % on {claim.metric}"
            + (f" ({claim.source})" if claim.source else "")
            + f"; measured {ch:+.1f} % ({sig}): {in_range} the predicted range."
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
    """report.md's tables of the headline's comparisons (and of its validation metric at the final epoch):
    difference, tests, P(better), seeds for 80 % power."""
    m = report.spec.objective
    out = [f"## `{m}` against `{report.baseline}`", "",
           "Difference of means with its 95 % interval (paired where paired); the test and its p-value, "
           "unadjusted and Holm-adjusted; the probability that the experiment beats the baseline (over seed "
           "pairs when paired, over all pairs of runs otherwise) with a 95 % bootstrap interval; and how many "
           "seeds per experiment would detect the observed difference with 80 % power (two-sided, 5 %).", ""]
    shown = list(dict.fromkeys([(m, report.headline_at), (report.chosen_by, "final")]))
    for metric, at in shown:
        out += [f"**`{metric}`, {where(metric, at)}**", "",
                "| experiment | n | difference [95 % CI] | test | p | p (Holm) | P(better) [95 % CI] "
                "| seeds for 80 % power |",
                "|---|---:|---:|---|---:|---:|---:|---:|"]
        for e in report.spec.experiments:
            r = report.row(e, metric, at)
            if r.comparison is None:
                continue
            c = r.comparison
            out.append(f"| {e} | {c.n} | {_diff(r)} | {c.test} | {_p(c.p).lstrip('=')} | {_holm(r)} | "
                       f"{_better(r, interval=True)} | {_seeds(r)} |")
        out.append("")
    reasons = {report.row(e, m, report.headline_at).why for e in report.spec.experiments if e != report.baseline}
    out += [f"Pairing: {'; '.join(sorted(reasons))}.", ""]
    return out


def _floor_row(report: SuiteReport, metrics: Sequence[str]) -> list[str]:
    """A Markdown row with what a random ranking of the baseline's pairs scores, if known."""
    floors = report.floors.get(report.baseline, {})
    if not any(m in floors for m in metrics):
        return []
    return ["| *random ranking* | | " + " | ".join(_num(floors[m]) if m in floors else "" for m in metrics) + " |"]


def _tables_markdown(report: SuiteReport, level: str, marks: bool = True) -> list[str]:
    """Each section of means as a Markdown table, every cell with its change and Holm-adjusted p (``marks``: the
    baseline and the winner marked beside their names)."""
    out: list[str] = []
    for title, at, metrics in sections(report):
        if not metrics:
            continue
        out += [f"{level} {title}", "", "| experiment | n | " + " | ".join(f"`{m}`" for m in metrics) + " |",
                "|---|---:|" + "---:|" * len(metrics)]
        for e in report.spec.experiments:
            label = e + (" (baseline)" if e == report.baseline else "") + (" ★" if e == report.winner else "")
            label = label if marks else e
            n = report.row(e, metrics[0], at).summary.n
            out.append(f"| {label} | {n} | " + " | ".join(cell(report.row(e, m, at)) for m in metrics) + " |")
        out += [*_floor_row(report, metrics), ""]
    return out


def _epochs_note(report: SuiteReport) -> list[str]:
    """How many runs early stopping ended, and where the selected epochs fell."""
    ended = [r for r in report.trials if r.stopped_early_at is not None]
    selected = sorted(r.best_epoch + 1 for r in report.trials if r.best_epoch >= 0)
    if not selected:
        return []
    text = (f"Selected epochs (1-based): median {selected[len(selected) // 2]}, from {selected[0]} to "
            f"{selected[-1]}.")
    if ended:
        text += (f" Early stopping ended {len(ended)} of {len(report.trials)} runs, after "
                 f"{min(r.stopped_early_at for r in ended if r.stopped_early_at is not None) + 1} to "
                 f"{max(r.stopped_early_at for r in ended if r.stopped_early_at is not None) + 1} epochs.")
    return [text, ""]


def markdown(report: SuiteReport, plots: Sequence[str] = ()) -> str:
    """report.md: method, verdict, the headline's comparisons, tables on test and validation, notes, plots."""
    spec = report.spec
    out = [f"# {report.study_name}", ""]
    if spec.description:
        out += [spec.description, ""]
    split = next((r.split for r in report.trials if r.experiment == report.baseline and r.split), "")
    out += [
        f"Seeds: {', '.join(map(str, spec.seeds))}. Data: `{spec.experiments[report.baseline].data.source}`"
        + (f" ({split})" if split else "")
        + f". Headline metric: `{spec.objective}` ({where(spec.objective, report.headline_at)}); what chose what is "
        "the verdict's first line.",
        "",
        "Each cell: mean ± half-width of the 95 % Student-t confidence interval over seeds; "
        f"in brackets the change of the mean against `{report.baseline}` and the p-value of the test "
        "against it, Holm-adjusted over the experiments compared for that metric (* = below 0.05). "
        f"The test is paired by seed ({_test_name(spec.test)}) where an experiment has the baseline's data "
        "and model: the seed then fixes the same split, initial weights and batch order in both, and "
        "pairing removes that shared variance. Otherwise it is Welch's t-test.",
        "",
    ]
    if report.missing:
        out += [f"**Incomplete**: {len(report.missing)} trial(s) not finished: "
                f"{', '.join(report.missing)}.", ""]
    out += ["## Verdict", ""] + [f"- {line}" for line in verdict(report)] + [""]
    out += _against_baseline(report)
    out += _tables_markdown(report, "##")
    out += _epochs_note(report)
    notes = [r for r in report.trials if r.note]
    if notes:
        out += ["## Notes", ""] + [f"- {r.experiment} seed {r.seed}: {r.note}" for r in notes] + [""]
    if plots:
        out += ["## Curves", ""] + [f"![{Path(p).stem}]({Path(p).name})" for p in plots] + [""]
    return "\n".join(out)



def suite_markdown(report: SuiteReport) -> str:
    """The comparison as full-width Markdown tables (for logs: nothing is cut to a terminal's width)."""
    return "\n".join([*_against_baseline(report), *_tables_markdown(report, "####", marks=False),
                      *_epochs_note(report)])

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
        best = summary.best
        test = on_split(summary.metric, "test")
        scored = (f"; its selected model on test: {test} {fmt(best.test[test])} (scored once, chooses nothing)"
                  if test in best.test else "")
        out.append(f"best (chosen on {summary.metric}): trial #{best.number} {best.label} -> "
                   f"{summary.metric} {fmt(best.value)}{scored}")
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


def _shown(summary: SearchSummary, limit: int | None) -> tuple[list[TrialRow], str]:
    """The trials to list (the newest ``limit``; all when None) and a line saying what was left out."""
    if limit is None or len(summary.trials) <= limit:
        return summary.trials, ""
    left = len(summary.trials) - limit
    return summary.trials[-limit:], (f"{left} earlier trial(s) not listed: `ablate studies show --all` lists every "
                                     "trial, `ablate studies export` writes them to a file")


def summary_lines(name: str, summary: SearchSummary, limit: int | None = None) -> list[Table | str]:
    """`studies show` for a terminal, in 80 columns: the trials table (the newest ``limit``), why trials stopped (by
    trial number, below the table rather than in a column of it), then the facts (lines to word-wrap)."""
    trials, left_out = _shown(summary, limit)
    table = Table(title=f"{name}: trials", title_justify="left", box=box.SIMPLE_HEAD, show_edge=False,
                  padding=(0, 1), pad_edge=False)
    table.add_column("#", justify="right", no_wrap=True)
    table.add_column("state", no_wrap=True)
    table.add_column("configuration", overflow="fold")
    table.add_column(summary.metric, justify="right", no_wrap=True)
    table.add_column("epochs", justify="right", no_wrap=True)
    for t in trials:
        table.add_row(str(t.number), t.state, t.label, fmt(t.value), str(t.epochs))
    out: list[Table | str] = [table, *([left_out] if left_out else [])]
    noted = [t for t in trials if t.note]
    if noted:
        notes = Table(title="notes", title_justify="left", box=None, show_header=False, padding=(0, 1),
                      pad_edge=False)
        notes.add_column(no_wrap=True)
        notes.add_column(overflow="fold")
        for t in noted:
            notes.add_row(f"#{t.number} {t.state}", t.note)
        out.append(notes)
    return out + _facts(summary)


def summary_markdown(name: str, summary: SearchSummary, limit: int | None = None) -> str:
    """`studies show` for a log: the trials (the newest ``limit``) as a full-width Markdown table, then the facts."""
    def escaped(text: str) -> str:
        return text.replace("|", "\\|")

    trials, left_out = _shown(summary, limit)
    lines = [f"**{escaped(name)}: trials**", "", f"| # | state | configuration | `{summary.metric}` | epochs | note |",
             "|---:|---|---|---:|---:|---|"]
    lines += [f"| {t.number} | {t.state} | {escaped(t.label)} | {fmt(t.value)} | {t.epochs} | {escaped(t.note)} |"
              for t in trials]
    return "\n".join([*lines, *(["", left_out] if left_out else []), "", *_facts(summary)])
