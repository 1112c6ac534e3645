"""Commands that train a study or report on it: run-suite, tune, worker, report."""

from __future__ import annotations

import os
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
    SetOpt,
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
from ablate.cli.listing import show_study
from ablate.errors import AblateError
from ablate.study import designs, studyfiles

PatienceOpt = Annotated[int | None, typer.Option(
    min=1, metavar="N", help="Early stopping: end a run when its selection metric (validation) has not improved for "
    "N epochs; a multi-stage run counts from its last stage \\[default: the study file's, else off].")]
TestDataOpt = Annotated[str | None, typer.Option(
    "--test-data", metavar="FILE", help="Score each run's selected model on this file's pairs instead of a test "
    "split of the data.")]


def _data_overrides(overrides: dict[str, object], data: str | None, test_data: str | None,
                    patience: int | None) -> None:
    """--data, --test-data and --patience as overrides of every run."""
    for key, value in (("data.source", data), ("data.test_source", test_data), ("patience", patience)):
        if value is not None:
            overrides[key] = value

if TYPE_CHECKING:
    from ablate.report.compare import SuiteReport
    from ablate.study.session import StudySession


# --------------------------------------------------------------------------------------
# Studies: run-suite, tune, worker, report
# --------------------------------------------------------------------------------------


def _start(spec: designs.StudySpec, store: stores.Stores, *, jobs: int | None, devices: list[str],
           array: int | None, keep: bool = False, budget: int | None = None,
           reuse: StudySession | None = None) -> StudySession | None:
    """Open the study (in ``reuse``'s open stores, if given) and train its queued trials; None when only created
    (--jobs 0)."""
    from ablate.study.session import StudySession

    session = StudySession.start(spec, store, budget=budget, devices=devices, reuse=reuse)
    if isinstance(spec, designs.SearchSpec):
        wanted, size = budget if budget is not None else spec.n_trials, spec.space_size()
        if size is not None and wanted > size:
            console.print(f"the search space has {size} configuration(s): the budget of {wanted} trials is "
                          f"capped at {size}, so no configuration is trained twice")
    done, total = session.progress()
    parent = session.parent_run_id if jobs == 0 and not devices else session.known_parent_run_id
    tracking = stores.mask_url(stores.resolve_tracking_uri(store.tracking_uri))
    console.print(Text.assemble("study ", (session.name, "bold"), f" in {store.shown_storage} "
                                f"({done}/{total} trials done); MLflow "
                                + (f"parent run {parent}" if parent else "experiment " + repr(spec.name))
                                + f" at {tracking}"))
    if jobs == 0 and not devices:
        console.print(f"created; start workers with: ablate worker {session.name} --storage {store.shown_storage}")
        return None
    _train(session, jobs=jobs, devices=devices, array=array, keep=keep)
    return session


def _train(session: StudySession, *, jobs: int | None, devices: list[str], array: int | None,
           keep: bool = False) -> None:
    """Train what the study has queued, with a live display; exit 130 when interrupted."""
    pending = session.pending()
    if not pending:
        return
    session.check_trainable()
    from ablate.report.live import LogLines, StudyDisplay
    from ablate.study.launch import plan  # torch loads only where there is something to train
    p = plan(jobs, devices, pending, max((run.epochs for _, run in session.spec.preflight_runs()), default=0))
    where = f"on {', '.join(p.devices)}" if p.devices else f"up to {p.threads} CPU thread(s) each"
    console.print(f"training {pending} trial(s) with {'up to ' if p.spawn_after else ''}{p.workers} worker(s), "
                  f"{where}")
    done, total = session.progress()
    if console.is_terminal:
        display = StudyDisplay(console, total, done)
        with display.progress:
            finished = session.run(jobs=p.workers, devices=p.devices, on_event=display,
                                   spawn_after=p.spawn_after, array=array, keep_checkpoints=keep)
    else:  # a log: one plain line per trial event
        lines = LogLines(lambda text: console.print(text, highlight=False), total, done)
        finished = session.run(jobs=p.workers, devices=p.devices, on_event=lines, spawn_after=p.spawn_after,
                               array=array, keep_checkpoints=keep)
    if not finished:
        err_console.print(f"interrupted: the running trials ended FAIL in Optuna (each queued again, to continue from "
                          f"its last checkpoint) and KILLED in MLflow; run the same command again to resume study "
                          f"{session.name}")
        raise typer.Exit(130)


@app.command("run-suite", help=(
    "Run an ablation suite (experiments x seeds) and compare every experiment with the baseline.\n\n"
    "Re-running the same command resumes: finished trials are not trained again. More seeds extend the same "
    "study; with --until-precise they are added until the answer is as precise as asked (the rule looks at the "
    "intervals' widths only, never at significance)."))
def run_suite(
    name: Annotated[str, typer.Argument(metavar="NAME", help="A study in studies/ (e.g. baseline-vs-multistage) "
                                        "or a .toml path.")],
    seeds: Annotated[str | None, typer.Option(metavar="SEEDS", help="Comma-separated seeds, e.g. 0,1,2,3,4.")] = None,
    epochs: Annotated[int | None, typer.Option(min=1, metavar="N", help="Epochs of every experiment "
                                               "(multi-stage boundaries keep their proportions).")] = None,
    data: Annotated[str | None, typer.Option(metavar="FILE",
                                             help="Data file or 'synthetic' for every experiment.")] = None,
    test_data: TestDataOpt = None,
    patience: PatienceOpt = None,
    set_: SetOpt = None,
    storage: StorageOpt = None,
    tracking_uri: TrackingOpt = None,
    jobs: JobsOpt = "auto",
    array: ArrayOpt = "auto",
    devices: DevicesOpt = None,
    heartbeat: HeartbeatOpt = stores.DEFAULT_HEARTBEAT_SECONDS,
    keep_checkpoints: KeepOpt = False,
    out: Annotated[Path, typer.Option(metavar="FOLDER", help="Folder for report.md and the plots.")] = Path("reports"),
    until_precise: Annotated[float | None, typer.Option(
        min=1e-12, metavar="X", help="Add seeds in rounds until every comparison with the baseline (the "
        "objective, final epoch) has a 95 % interval of at most ± this width.")] = None,
    max_seeds: Annotated[int, typer.Option(min=2, metavar="N",
                                           help="With --until-precise: the most seeds per experiment.")] = 12,
) -> None:
    """Run an ablation suite (experiments x seeds) and compare every experiment with the baseline."""
    overrides = studyfiles.parse_overrides(set_ or [])
    if seeds is not None:
        overrides["seeds"] = parse_seeds(seeds)
    _data_overrides(overrides, data, test_data, patience)
    spec = studyfiles.load_study(name, overrides, epochs=epochs)
    if not isinstance(spec, designs.SuiteSpec):
        raise AblateError(f"{name} is a search; run it with `ablate tune {name}`")
    if until_precise is not None and len(spec.seeds) > max_seeds:
        raise AblateError(f"--max-seeds {max_seeds} is below the study's {len(spec.seeds)} seeds; raise it")
    n_jobs, devs, size = parse_jobs(jobs), parse_devices(devices), parse_array(array)
    studyfiles.writable_folder(out, f"--out {out}")
    session = _start(spec, stores_of(storage, tracking_uri, heartbeat), jobs=n_jobs, devices=devs, array=size,
                     keep=keep_checkpoints)
    if session is None:
        return
    while until_precise is not None:
        more, said = session.seeds_to_add(until_precise, max_seeds)
        console.print(said)
        if not more:
            break
        grown = spec.model_copy(update={"seeds": [*spec.seeds, *more]})
        assert isinstance(grown, designs.SuiteSpec)
        spec = grown
        session.attach(spec)
        _train(session, jobs=n_jobs, devices=devs, array=size, keep=keep_checkpoints)
    _report(session, out, finish=True)


def _report(session: StudySession, out: Path, finish: bool = False) -> tuple[SuiteReport, list[Path]]:
    """Print a suite's comparison and write its report; returns the report and its files."""
    from ablate.report import render
    from ablate.tracking.client import ui_hint

    report, files, rebuilt = session.report(out)
    if console.is_terminal:
        for table in render.suite_tables(report):
            console.print(table)
    else:
        console.print(render.suite_markdown(report), highlight=False)
    for line in render.verdict(report):
        console.print(f"• {line}")
    for r in report.trials:
        if r.note:
            console.print(f"  note: {r.experiment} seed {r.seed}: {r.note}")
    done = session.finish() if (rebuilt or session.trained) and not session.read_only else not session.pending()
    parent = session.known_parent_run_id
    hint = ui_hint(stores.resolve_tracking_uri(session.stores.tracking_uri))
    if session.read_only:
        console.print(f"report: {files[0]} (the stores are read-only here: the report is not put on MLflow)")
    else:
        console.print(f"report: {files[0]}" + (f" (also on MLflow run {parent})" if parent else "") + f"; {hint}")
    if report.missing:
        what = "failed" if done else "not finished yet"
        err_console.print(f"{len(report.missing)} trial(s) {what}: {', '.join(report.missing)}"
                          + (f"; see `ablate studies show {session.name}` and run the same command again to retry"
                             if done else ""))
        if finish and done:
            raise typer.Exit(1)
    return report, files


@app.command()
def report(
    suite_run: Annotated[str, typer.Argument(metavar="STUDY", help="The suite's study name (printed by run-suite), "
                                             "or the suite name for its newest run.")],
    storage: StorageOpt = None,
    tracking_uri: TrackingOpt = None,
    out: Annotated[Path, typer.Option(metavar="FOLDER", help="Folder for report.md and the plots.")] = Path("reports"),
) -> None:
    """Re-create a suite's comparison from the stores, without training."""
    from ablate.study.session import StudySession

    studyfiles.writable_folder(out, f"--out {out}")
    _report(StudySession.open(suite_run, stores_of(storage, tracking_uri), reading=True), out)


@app.command()
def tune(
    name: Annotated[str, typer.Argument(metavar="NAME", help="A search in studies/ (temperature, batch, weights) "
                                        "or a .toml path.")],
    n_trials: Annotated[int | None, typer.Option(min=1, metavar="N", help="Trial budget, counting earlier "
                                                 "trials of the same study \\[default: the file's].")] = None,
    epochs: Annotated[int | None, typer.Option(min=1, metavar="N", help="Epochs of every trial.")] = None,
    data: Annotated[str | None, typer.Option(metavar="FILE", help="Data file or 'synthetic' for every trial.")] = None,
    test_data: TestDataOpt = None,
    patience: PatienceOpt = None,
    set_: SetOpt = None,
    storage: StorageOpt = None,
    tracking_uri: TrackingOpt = None,
    jobs: JobsOpt = "auto",
    array: ArrayOpt = "auto",
    devices: DevicesOpt = None,
    heartbeat: HeartbeatOpt = stores.DEFAULT_HEARTBEAT_SECONDS,
    keep_checkpoints: KeepOpt = False,
    confirm: Annotated[int, typer.Option(min=0, metavar="K", help="Re-train the top K configurations with "
                                         "fresh seeds and compare them (mean, CI).")] = 0,
    out: Annotated[Path, typer.Option(metavar="FOLDER",
                                      help="Folder for the search's plots and the confirmation report.")]
    = Path("reports"),
) -> None:
    """Run (or resume) an Optuna search; unstable runs are pruned early."""
    overrides = studyfiles.parse_overrides(set_ or [])
    _data_overrides(overrides, data, test_data, patience)
    spec = studyfiles.load_study(name, overrides, epochs=epochs)
    if not isinstance(spec, designs.SearchSpec):
        raise AblateError(f"{name} is a suite; run it with `ablate run-suite {name}`")
    devs, n_jobs, size = parse_devices(devices), parse_jobs(jobs), parse_array(array)
    studyfiles.writable_folder(out, f"--out {out}")
    session = _start(spec, stores_of(storage, tracking_uri, heartbeat), jobs=n_jobs, devices=devs, array=size,
                     keep=keep_checkpoints, budget=n_trials)
    if session is None:
        return
    summary = show_study(session)
    if session.trained:  # a re-run with nothing to train touches neither MLflow nor the plots
        files = session.search_plots(out, summary)
        if files:
            console.print(f"plots: {files[0].parent}")
        session.finish()
    if confirm:
        suite = session.confirm(confirm)
        assert isinstance(suite.spec, designs.SuiteSpec)
        console.print(f"\nconfirming the top {len(suite.spec.experiments)} configuration(s) with seeds "
                      f"{', '.join(map(str, suite.spec.seeds))}")
        _train(suite, jobs=n_jobs, devices=devs, array=size, keep=keep_checkpoints)
        _report(suite, out, finish=True)


@app.command()
def worker(
    name: Annotated[str, typer.Argument(metavar="STUDY", help="Study name (or spec name: its newest study).")],
    storage: StorageOpt = None,
    tracking_uri: TrackingOpt = None,
    devices: DevicesOpt = None,
    jobs: Annotated[str, typer.Option("--jobs", "-j", metavar="N",
                                      help="Worker processes on this machine; auto: one per "
                                      "CUDA device, else one per CPU core.")] = "auto",
    array: ArrayOpt = "auto",
    heartbeat: HeartbeatOpt = stores.DEFAULT_HEARTBEAT_SECONDS,
    keep_checkpoints: KeepOpt = False,
) -> None:
    """Join an existing study: take its waiting trials until none is left, then exit."""
    from ablate.study import studies
    from ablate.study.session import StudySession

    session = StudySession.open(name, stores_of(storage, tracking_uri, heartbeat))
    console.print(Text.assemble("worker on study ", (session.name, "bold"), f" (pid {os.getpid()})"))
    _train(session, jobs=parse_jobs(jobs, minimum=1), devices=parse_devices(devices), array=parse_array(array),
           keep=keep_checkpoints)
    console.print(f"study {session.name}: no trials left to take; {studies.counts(session.study)}")
