"""`ablate roadmap`: the quick-start's roadmap as one resumable command (plan in studies/roadmap.toml)."""

from __future__ import annotations

import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Annotated

import typer
from rich.text import Text

from ablate import stores
from ablate.cli.app import (
    ArrayOpt,
    DevicesOpt,
    HeartbeatOpt,
    JobsOpt,
    KeepOpt,
    StorageOpt,
    TrackingOpt,
    app,
    console,
    err_console,
    parse_array,
    parse_devices,
    parse_jobs,
    parse_seeds,
    stores_of,
)
from ablate.cli.study import PatienceOpt, TestDataOpt, _data_overrides, _report, _start
from ablate.errors import AblateError
from ablate.study import roadmap as plans
from ablate.study import studies, studyfiles
from ablate.study.designs import SearchSpec, SuiteSpec

if TYPE_CHECKING:
    from ablate.report.roadmap import RoadmapResult, StepOutcome
    from ablate.study.session import StudySession


@dataclass
class _Run:
    """What every step of one roadmap command shares: its plan, options, stores and what it found so far."""

    spec: plans.RoadmapSpec
    store: stores.Stores
    out: Path
    jobs: int | None
    devices: list[str]
    array: int | None
    keep: bool
    force: bool
    identity: str = ""
    session: StudySession | None = None
    tuned: dict[str, plans.Tuned] = field(default_factory=dict)

    def say(self, text: str, style: str = "") -> None:
        """One roadmap event: a line in a log, highlighted in a terminal."""
        if console.is_terminal and style == "rule":
            console.rule(Text(text, style="bold"))
        elif console.is_terminal:
            console.print(Text(text, style=style or "bold"))
        else:
            console.print(f"roadmap {self.identity}: {text}", highlight=False)


@app.command(help=(
    "Run the quick-start's roadmap: three phases of studies, a decision after each, a registered final model.\n\n"
    "The default plan (studies/roadmap.toml): phase 1 is a quick check (cosine against MSE), phase 2 the "
    "temperature and batch searches and a full InfoNCE suite, phase 3 the weights and stages searches and the "
    "five-experiment ablation; each phase ends in a decision on validation, and the final model (chosen on "
    "validation) is registered in the MLflow Model Registry.\n\n"
    "Each step is an ordinary study in the same storage: re-running the same command resumes where it stopped and "
    "trains nothing twice. A failed decision stops the roadmap with advice (exit 0); --force goes on."))
def roadmap(
    plan: Annotated[str, typer.Option("--plan", metavar="NAME", help="The plan: a roadmap in studies/ or a .toml "
                                      "path.")] = "roadmap",
    data: Annotated[str | None, typer.Option(metavar="FILE", help="Data file or 'synthetic' for every study.")] = None,
    test_data: TestDataOpt = None,
    seeds: Annotated[str | None, typer.Option(metavar="SEEDS", help="Every suite's seeds, e.g. 0,1,2,3,4.")] = None,
    epochs: Annotated[int | None, typer.Option(min=1, metavar="N", help="The full runs' epochs; the quick check "
                                               "and the searches keep their share of them.")] = None,
    n_trials: Annotated[int | None, typer.Option(min=1, metavar="N", help="Every search's trial budget "
                                                 "\\[default: each search file's].")] = None,
    patience: PatienceOpt = None,
    set_: Annotated[list[str] | None, typer.Option(
        "--set", metavar="KEY=VALUE", help="A path into the plan, phases and steps by name (seeds=[0,1,2], "
        "phases.quick-check.decision.rule=interval, phases.infonce.steps.temperature.epochs=50), or a run field for "
        "every study (lr=5e-4, model.hidden=[512,512]). (repeatable)")] = None,
    storage: StorageOpt = None,
    tracking_uri: TrackingOpt = None,
    jobs: JobsOpt = "auto",
    array: ArrayOpt = "auto",
    devices: DevicesOpt = None,
    heartbeat: HeartbeatOpt = stores.DEFAULT_HEARTBEAT_SECONDS,
    keep_checkpoints: KeepOpt = False,
    out: Annotated[Path, typer.Option(metavar="FOLDER", help="Folder for the reports.")] = Path("reports"),
    force: Annotated[bool, typer.Option("--force", help="Go on past a failed decision.")] = False,
    until_phase: Annotated[int | None, typer.Option(min=1, metavar="N", help="Stop after phase N.")] = None,
    dry_run: Annotated[bool, typer.Option("--dry-run", help="Print each phase's studies, trials and epoch budget; "
                                          "train nothing.")] = False,
) -> None:
    """Run the quick-start's roadmap as one resumable command."""
    overrides = studyfiles.parse_overrides(set_ or [])
    if seeds is not None:
        overrides["seeds"] = parse_seeds(seeds)
    if n_trials is not None:
        overrides["n_trials"] = n_trials
    _data_overrides(overrides, data, test_data, patience)
    spec = plans.load_roadmap(plan, overrides, epochs=epochs)
    if until_phase is not None and until_phase > len(spec.phases):
        raise AblateError(f"--until-phase {until_phase}: the plan has {len(spec.phases)} phases")
    if dry_run:
        _dry_run(spec, until_phase)
        return
    n_jobs = parse_jobs(jobs)
    if n_jobs == 0:
        raise AblateError("--jobs 0: a roadmap trains each phase before it decides on the next; give --jobs N or auto "
                          "(other machines can join each study with `ablate worker`)")
    studyfiles.writable_folder(out, f"--out {out}")
    run = _Run(spec, stores_of(storage, tracking_uri, heartbeat), out, n_jobs, parse_devices(devices),
               parse_array(array), keep_checkpoints, force, spec.identity())
    _finish(run, _phases(run, until_phase or len(spec.phases)))


def _phases(run: _Run, until: int) -> RoadmapResult:
    """Run the phases up to ``until``, each step through a study session; stop at a failed decision."""
    from ablate.report.roadmap import RoadmapResult

    spec = run.spec
    result = RoadmapResult(spec, run.identity)
    for i, phase in enumerate(spec.phases[:until], 1):
        run.say(f"phase {i}/{len(spec.phases)}: {phase.title or phase.name}", "rule")
        started = time.monotonic()
        for step in phase.steps:
            result.steps.append(_step(run, phase.name, step))
        result.seconds[phase.name] = time.monotonic() - started
        if phase.decision is None:
            continue
        report = next(o.suite for o in result.steps if o.step is phase.deciding_step)
        decision = plans.decide(phase, report, run.force)
        result.decisions[phase.name] = decision
        run.say(f"phase {i} decision: {decision.word}: {decision.reason}", "green" if decision.passed else "yellow")
        if not decision.passed and not run.force:
            result.stopped = f"phase {i} ({phase.name}): the decision failed; {decision.reason}"
            if decision.advice:
                run.say(f"advice: {decision.advice}", "yellow")
            run.say("the roadmap stops here; change what the advice says and run it again, or go on with --force",
                    "yellow")
            return result
    if until < len(spec.phases):
        result.stopped = f"--until-phase {until}: phases {until + 1} to {len(spec.phases)} were not run"
        result.partial = True
        run.say(f"stopped after phase {until} (--until-phase)")
    return result


def _step(run: _Run, phase: str, step: plans.StepSpec) -> StepOutcome:
    """One step: its study (with the values tuned before it) trained or resumed, then read."""
    from ablate.report.roadmap import StepOutcome

    study = plans.study_of(run.spec, step, run.tuned)
    takes = f" with {', '.join(step.tuned_by)} tuned" if step.tuned_by else ""
    run.say(f"step {step.name}: {study.kind} {study.name}{takes}")
    started = time.monotonic()
    budget = run.spec.n_trials if isinstance(study, SearchSpec) else None
    session = _start(study, run.store, jobs=run.jobs, devices=run.devices, array=run.array, keep=run.keep,
                     budget=budget, reuse=run.session)
    assert session is not None  # --jobs 0 is refused
    run.session = session
    outcome = StepOutcome(phase, step, session.name, "", 0.0)
    if isinstance(study, SuiteSpec):
        outcome.suite, outcome.files = _report(session, run.out, finish=True)
    else:
        outcome.files = _search(session, run.out)
    if studies.owes_work(study, session.storage, budget):  # decisions and tuned values come from finished studies
        err_console.print(f"study {session.name} is not finished ({studies.counts(session.study)}): see `ablate "
                          f"studies show {session.name}`; run the same roadmap command again to retry what failed, or "
                          "once the trials other processes are running have ended")
        raise typer.Exit(1)
    if isinstance(study, SearchSpec):
        outcome.tuned = run.tuned[step.name] = plans.best_trial(session.study, study, step.name)
    done, owed = session.progress()
    first, last = studies.span_ms(session.study)
    outcome.trials, outcome.seconds = f"{done}/{owed}", time.monotonic() - started
    outcome.wall = (last - first) / 1000 if first is not None and last is not None else 0.0
    line = f"step {step.name}: {done}/{owed} trials of {session.name} ({outcome.wall:.1f} s of training)"
    if outcome.tuned is not None:
        t = outcome.tuned
        line += f"; best trial #{t.number} ({t.objective} {t.value:.4g}): " + ", ".join(
            f"{k} = {v:.4g}" if isinstance(v, float) else f"{k} = {v}" for k, v in t.values.items())
    run.say(line, "")
    return outcome


def _search(session: StudySession, out: Path) -> list[Path]:
    """A search's trials printed; its plots written when it trained (else the ones written before)."""
    from ablate.cli.listing import show_study

    summary = show_study(session)
    if session.trained:
        files = session.search_plots(out, summary)
        session.finish()
        return files
    folder = studyfiles.safe_folder(out, session.name)
    return sorted(folder.glob("*.png")) if folder.is_dir() else []


def _finish(run: _Run, result: RoadmapResult) -> None:
    """The final choice registered (when reached), the report written and put on the roadmap's MLflow run."""
    from ablate.report import roadmap as report

    final = run.spec.final_step
    outcome = next((o for o in result.steps if o.step is final), None)
    if not result.stopped and outcome is not None and outcome.suite is not None and run.session is not None:
        result.final = report.final_choice(outcome.suite, outcome.step.name)
        version = report.register_final(run.session.tracker, result)
        run.say(f"final model: {result.final.experiment} seed {result.final.run.seed} (best {result.final.chosen_by} "
                f"on validation), registered as {version.uri}" + ("" if version.created else " (registered before)"),
                "green")
    assert run.session is not None
    # a run stopped by --until-phase writes its own report: the whole roadmap's report and MLflow run stay as they are
    suffix = f"-until-phase-{len(result.seconds)}" if result.partial else ""
    folder = studyfiles.safe_folder(run.out, f"roadmap-{run.identity}{suffix}")
    files, run_id = report.publish(run.session.tracker, result, folder)
    for name, seconds in result.seconds.items():
        run.say(f"phase {name}: {result.wall(name):.1f} s of training, {seconds:.1f} s in this command", "")
    run.say(f"report: {files[0]}" + (f" (also on MLflow run {run_id})" if run_id else ""), "")


def _dry_run(spec: plans.RoadmapSpec, until: int | None) -> None:
    """Each phase's studies with their trials and epoch budget (at most: pruning and early stopping train less)."""
    total = 0
    console.print(f"roadmap {spec.identity()}: {spec.description}", highlight=False)
    for i, phase in enumerate(spec.phases[: until or len(spec.phases)], 1):
        console.print(f"phase {i}: {phase.title or phase.name}", highlight=False)
        phase_epochs = 0
        for step in phase.steps:
            study = plans.study_of(spec, step, {})
            epochs = spec.step_epochs(step)
            if isinstance(study, SuiteSpec):
                trials = study.trial_count()
                what = f"suite {study.name}: {len(study.experiments)} experiments x {len(study.seeds)} seeds"
            else:
                trials = study.trial_count(spec.n_trials)
                what = f"search {study.name}: {', '.join(study.params)} on {study.objective}"
            budget = trials * epochs
            phase_epochs += budget
            takes = f"; takes {', '.join(step.tuned_by)} tuned" if step.tuned_by else ""
            console.print(f"  {step.name}: {what} = {trials} trials x {epochs} epochs = {budget:,} epochs{takes}",
                          highlight=False)
        total += phase_epochs
        if phase.decision is not None:
            d = phase.decision
            console.print(f"  decision: {d.experiment} against the baseline on {d.metric} ({d.at} epoch): "
                          f"{d.rule_text}", highlight=False)
        console.print(f"  phase {i}: at most {phase_epochs:,} run-epochs", highlight=False)
    final = spec.final_step
    console.print(f"final: the winner of {final.name if final else '?'} on validation, registered as "
                  f"{spec.registered_name}; at most {total:,} run-epochs in all", highlight=False)
