"""A roadmap's report: each phase's studies, numbers, decision and reason; the tuned settings and the search each
came from; the final choice (on validation) and its comparison on test; the registered model. Written to
``reports/roadmap-<roadmap>/report.md`` and put on the roadmap's MLflow run.
"""

from __future__ import annotations

import dataclasses
import math
import shutil
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from ablate.report.compare import SuiteReport, TrialResult
from ablate.report.render import selection_rule, where
from ablate.report.stats import Summary, summarize
from ablate.study.roadmap import Decision, RoadmapSpec, StepSpec, Tuned
from ablate.tracking.client import Tracker
from ablate.tracking.registry import Version, register
from ablate.vocabulary import SCREENING_METRICS, SUMMARY_METRICS, Tag, better, on_split


@dataclass
class StepOutcome:
    """One step as the roadmap ran it: its study and what it gave (a suite's comparison or a search's best trial)."""

    phase: str
    step: StepSpec
    study: str
    trials: str
    """'done/owed' trials."""
    seconds: float
    """The time this command spent on the step."""
    wall: float = 0.0
    """The study's wall time: its first trial's start to its last trial's end (over every command that trained it)."""
    suite: SuiteReport | None = None
    tuned: Tuned | None = None
    files: list[Path] = field(default_factory=list)
    """The study's own report and plots."""


@dataclass(frozen=True)
class FinalChoice:
    """The final model: the configuration best on validation across seeds, and its run best on validation."""

    step: str
    study: str
    experiment: str
    chosen_by: str
    at: str
    means: dict[str, float]
    """Each configuration's mean of ``chosen_by`` over seeds (what chose it)."""
    run: TrialResult
    objective: str
    test: Summary
    """The chosen configuration's ``objective`` (the suite's headline on test) over seeds."""
    version: str = ""
    """The registered ``models:/NAME/VERSION``."""


def final_choice(report: SuiteReport, step: str) -> FinalChoice:
    """The suite's winner on validation (``SuiteReport.winner``) and, of its runs, the one with the best validation
    value; the test numbers are reported, never used to choose."""
    exp, metric, at = report.winner, report.chosen_by, report.headline_at
    sign = 1.0 if better(metric) == "maximize" else -1.0
    runs = [r for r in report.trials if r.experiment == exp and r.note != "diverged"
            and math.isfinite(r.at(at).get(metric, math.nan))]
    if not runs:
        from ablate.errors import AblateError

        raise AblateError(f"study {report.study_name}: no finished run of {exp!r} has {metric}; nothing to register")
    run = max(runs, key=lambda r: (sign * r.at(at)[metric], -r.seed))
    means = {e: report.row(e, metric, at).summary.mean for e in report.spec.experiments
             if (e, metric, at) in report.rows}
    objective = on_split(report.spec.objective, "test")  # the headline on test, also where it is read on validation
    test = summarize([r.test.get(objective, math.nan) for r in report.trials if r.experiment == exp
                      and r.note != "diverged"])
    return FinalChoice(step, report.study_name, exp, metric, at, means, run, objective, test)


@dataclass
class RoadmapResult:
    """What a roadmap command found: its steps, decisions, phase times, the final choice and where it stopped."""

    spec: RoadmapSpec
    identity: str
    steps: list[StepOutcome] = field(default_factory=list)
    decisions: dict[str, Decision] = field(default_factory=dict)
    seconds: dict[str, float] = field(default_factory=dict)
    final: FinalChoice | None = None
    stopped: str = ""
    """Why the roadmap ended before its final choice ('' when it reached it)."""
    partial: bool = False
    """Stopped by --until-phase: its report is written on its own, not on the roadmap's MLflow run."""

    def wall(self, phase: str) -> float:
        """A phase's wall time: its studies' wall times added up."""
        return sum(o.wall for o in self.steps if o.phase == phase)


def _num(x: Any, digits: int = 4) -> str:
    return f"{x:.{digits}g}" if isinstance(x, float) and math.isfinite(x) else str(x)


def version_description(final: FinalChoice) -> str:
    """The registered version's description: its test metrics and its configuration's test mean and interval."""
    t = final.test
    keys = [on_split(m, "test") for m in (final.objective, *SUMMARY_METRICS, *SCREENING_METRICS)]
    own = ", ".join(f"{k} {_num(final.run.test[k])}" for k in dict.fromkeys(keys) if k in final.run.test)
    return (f"{final.experiment} seed {final.run.seed} of study {final.study}, chosen on {final.chosen_by} "
            f"({where(final.chosen_by, final.at)}; {_num(final.run.at(final.at)[final.chosen_by])}). "
            f"Its test metrics: {own}. The configuration's {final.objective} over {t.n} seeds: {_num(t.mean)} "
            f"[95 % CI {_num(t.ci_low)}, {_num(t.ci_high)}]. Test numbers are reported, never used to choose.")


def _suite_lines(o: StepOutcome) -> list[str]:
    r = o.suite
    assert r is not None
    m, at, chosen = r.spec.objective, r.headline_at, r.chosen_by
    lines = [f"| experiment | {chosen} (chooses) | {m} | difference [95 % CI] | Holm p |", "|---|---:|---:|---:|---:|"]
    for e in r.spec.experiments:
        v, row = r.row(e, chosen, at).summary, r.row(e, m, at)
        c = row.comparison
        diff = "" if c is None else f"{c.diff:+.3f} [{c.ci_low:+.3f}, {c.ci_high:+.3f}]"
        p = "" if c is None else _num(row.p_holm, 3)
        mark = " ★" if e == r.winner else ""
        lines.append(f"| {e}{mark} | {v.mean:.3f} | {row.summary.mean:.3f} ± {row.summary.half_width:.3f} | {diff} | "
                     f"{p} |")
    return ["", selection_rule(r), "", *lines]


def _tuned_lines(result: RoadmapResult) -> list[str]:
    tuned = [o.tuned for o in result.steps if o.tuned is not None]
    if not tuned:
        return []
    lines = ["## Tuned settings", "", "Each search's best complete trial on its validation objective; the steps after "
             "it take these values (only those their loss reads).", "",
             "| setting | value | search | trial | objective |", "|---|---:|---|---:|---:|"]
    for t in tuned:
        for k, v in t.values.items():
            lines.append(f"| {k} | {_num(v)} | {t.step} ({t.study}) | #{t.number} | {t.objective} {_num(t.value)} |")
    return [*lines, ""]


def _final_lines(result: RoadmapResult) -> list[str]:
    f = result.final
    if f is None:
        return []
    lines = ["## The final model", "",
             f"Chosen on validation: {f.experiment!r}, the best mean {f.chosen_by} ({where(f.chosen_by, f.at)}) over "
             f"the seeds of {f.study} (" + ", ".join(f"{e} {_num(v)}" for e, v in f.means.items()) + "). Of its runs, "
             f"seed {f.run.seed} has the best {f.chosen_by} ({_num(f.run.at(f.at)[f.chosen_by])}).", "",
             "On test (reported, never used to choose): the run's "
             f"{f.objective} is {_num(f.run.test.get(f.objective))}; "
             f"the configuration's mean over {f.test.n} seeds is {_num(f.test.mean)} [95 % CI {_num(f.test.ci_low)}, "
             f"{_num(f.test.ci_high)}]."]
    if f.version:
        lines += ["", f"Registered as `{f.version}` (MLflow run {f.run.run_id}); load it with "
                  f"`mlflow.pytorch.load_model(\"models:/{result.spec.registered_name}/latest\")`."]
    return [*lines, ""]


def markdown(result: RoadmapResult, plots: list[str]) -> str:
    """The roadmap's report as Markdown."""
    spec = result.spec
    lines = [f"# Roadmap {result.identity}", "", spec.description, ""]
    if result.stopped:
        lines += [f"**The roadmap stopped: {result.stopped}**", ""]
    for i, phase in enumerate(spec.phases, 1):
        outcomes = [o for o in result.steps if o.phase == phase.name]
        if not outcomes:
            lines += [f"## Phase {i}: {phase.title or phase.name}", "", "Not reached.", ""]
            continue
        lines += [f"## Phase {i}: {phase.title or phase.name}", "",
                  f"Wall time: {result.wall(phase.name):.1f} s (each study from its first trial's start to its last "
                  "trial's end).", ""]
        for o in outcomes:
            lines.append(f"### {o.step.name}: {'suite' if o.step.suite else 'search'} `{o.study}` ({o.trials} trials)")
            if o.suite is not None:
                lines += _suite_lines(o)
            if o.tuned is not None:
                t = o.tuned
                lines += ["", f"Best trial #{t.number}: {t.objective} {_num(t.value)} with "
                          + ", ".join(f"{k} = {_num(v)}" for k, v in t.values.items()) + "."]
            lines.append("")
        d = result.decisions.get(phase.name)
        if d is not None:
            lines += [f"**Decision: {d.word}.** {d.reason}.", ""]
            if not d.passed and d.advice:
                lines += [f"Advice: {d.advice}", ""]
    lines += _tuned_lines(result) + _final_lines(result)
    if plots:
        lines += ["## Plots", "", *(f"![{Path(p).stem}]({p})" for p in plots), ""]
    return "\n".join(lines)


def _shown(result: RoadmapResult, o: StepOutcome, f: Path) -> bool:
    """Whether the roadmap's report shows a study's plot: a search's parameter plots, and a suite's curves of the
    metric that chose its winner and of its phase's decision metric."""
    if f.suffix != ".png" or not f.is_file():
        return False
    if o.suite is None:
        return f.name.startswith("param_")
    phase = next(p for p in result.spec.phases if p.name == o.phase)
    metrics = {o.suite.chosen_by} | ({phase.decision.metric} if phase.decision is not None else set())
    return f.stem in {m.replace("/", "_") for m in metrics}


def write(result: RoadmapResult, folder: Path) -> list[Path]:
    """report.md in ``folder``, with the final suite's and the searches' plots copied beside it; returns the files,
    report.md first."""
    folder.mkdir(parents=True, exist_ok=True)
    for old in folder.glob("*.png"):  # the folder is the roadmap's own: plots of an earlier write go
        old.unlink()
    plots: list[Path] = []
    for o in result.steps:
        for f in o.files:
            if _shown(result, o, f):
                target = folder / f"{o.step.name}-{f.name}"
                shutil.copyfile(f, target)
                plots.append(target)
    md = folder / "report.md"
    md.write_text(markdown(result, [p.name for p in plots]))
    return [md, *plots]


def decision_tags(result: RoadmapResult) -> dict[str, Any]:
    """One tag per phase decision (``ablate.decision.<phase>``: its word and reason)."""
    return {f"{Tag.DECISION}.{d.phase}": f"{d.word}: {d.reason}"[:5000] for d in result.decisions.values()}


def register_final(tracker: Tracker, result: RoadmapResult) -> Version:
    """Register the final choice's run in the Model Registry (once per roadmap: a re-run finds its version), with
    tags naming the roadmap, each phase's decision and the data's fingerprint."""
    f = result.final
    assert f is not None and f.run.run_id
    fingerprint = tracker.client.get_run(f.run.run_id).data.tags.get(Tag.DATA_FINGERPRINT, "")
    tags = {Tag.ROADMAP: result.identity, Tag.STUDY: f.study, Tag.EXPERIMENT: f.experiment, Tag.SEED: str(f.run.seed),
            Tag.CHOSEN_BY: f.chosen_by, Tag.DATA_FINGERPRINT: fingerprint, **decision_tags(result)}
    version = register(tracker, result.spec.registered_name, f.run.run_id, tags=tags,
                       description=version_description(f))
    result.final = dataclasses.replace(f, version=version.uri)
    return version


def publish(tracker: Tracker, result: RoadmapResult, folder: Path) -> tuple[list[Path], str]:
    """Write the report into ``folder`` and, unless it is partial, put it on the roadmap's MLflow run (found by its
    tag, else created); returns the files and the run ('' when not put on one)."""
    from ablate.report.publish import writing

    with writing(f"the roadmap's report to {folder}", "run the same roadmap command again to write it"):
        files = write(result, folder)
    if result.partial:
        return files, ""
    experiment = tracker.experiment_id(result.spec.name)
    found = tracker.client.search_runs([experiment], filter_string=f"tags.`{Tag.ROADMAP}` = '{result.identity}'",
                                       max_results=1)
    run_id = found[0].info.run_id if found else tracker.start_run(
        experiment, result.identity, {Tag.ROADMAP: result.identity, Tag.KIND: "roadmap"})
    for f in files:
        tracker.log_artifact(run_id, f, "report")
    note = [f"- {d.phase}: {d.word}: {d.reason}" for d in result.decisions.values()]
    if result.final is not None:
        note.append(f"- final: {result.final.experiment} seed {result.final.run.seed}, {result.final.version}")
    if result.stopped:
        note.append(f"- stopped: {result.stopped}")
    tracker.set_tags(run_id, {**decision_tags(result), "mlflow.note.content": "\n".join(note)})
    tracker.end_run(run_id, "FINISHED")
    return files, str(run_id)
