"""The `ablate` command: parse, open a study session (or a trainer), render what it returns with rich."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path
from typing import TYPE_CHECKING, Annotated, Any

import typer
from rich.console import Console
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn, TimeRemainingColumn
from rich.table import Table
from rich.text import Text

from ablate import designs, specs, stores, studyfiles
from ablate.errors import AblateError

if TYPE_CHECKING:
    from ablate.session import StudySession

app = typer.Typer(
    name="ablate",
    help="Loss ablations and Optuna searches for pocket -> ligand embedding alignment, "
    "tracked in MLflow.",
    no_args_is_help=True,
    add_completion=False,
    pretty_exceptions_enable=False,
    rich_markup_mode="rich",
)
studies_app = typer.Typer(help="List, inspect and export studies.", no_args_is_help=True)
app.add_typer(studies_app, name="studies")

# Markup is off: paths, URLs and messages print as they are, brackets included ([::1], ablate[postgres]).
console = Console(markup=False, soft_wrap=True)
err_console = Console(stderr=True, markup=False, soft_wrap=True)

_RUN = specs.RunSpec()


def _d(field: str) -> str:
    """The default of a run field (dotted for nested ones), for help texts; defaults live in ablate.specs."""
    value: Any = _RUN
    for part in field.split("."):
        value = getattr(value, part)
    return str(value)


StorageOpt = Annotated[
    str | None,
    typer.Option("--storage", help="Optuna storage URL \\[default: $ABLATE_STORAGE or sqlite:///optuna.db]; "
                 "postgresql://... for many machines."),
]
TrackingOpt = Annotated[
    str | None,
    typer.Option("--tracking-uri", help="MLflow tracking URI \\[default: $MLFLOW_TRACKING_URI or "
                 "sqlite:///mlflow.db]; http://host:5000 for a tracking server."),
]
SetOpt = Annotated[
    list[str] | None,
    typer.Option("--set", help="Override a field: KEY=VALUE, e.g. --set lr=5e-4 or "
                 "--set experiments.infonce.temperature=0.1 (repeatable)."),
]
JobsOpt = Annotated[
    str, typer.Option("--jobs", "-j", help="Trials trained in parallel on this machine, one process each; "
                      "auto: one per CUDA device, else one per CPU core (each on one thread); "
                      "0: only create the study, for remote workers.")
]
ArrayOpt = Annotated[
    str, typer.Option("--array", help="Compatible trials trained together as one array (each still its own "
                      "trial and MLflow run); auto: the size that measures fastest on this device; 1: one at a time.")
]
DevicesOpt = Annotated[
    str | None,
    typer.Option("--devices", help="Comma-separated devices, one worker process per device, "
                 "e.g. cuda:0,cuda:1; 'all' for every CUDA device."),
]
HeartbeatOpt = Annotated[
    int, typer.Option("--heartbeat", min=1, help="Seconds between worker heartbeats; a trial "
                      "whose worker is silent for 3 heartbeats is failed and re-queued.")
]


def _flag(text: str, field: str | None = None) -> Any:
    """An option whose help shows the run field's default."""
    return typer.Option(help=text + (f" \\[default: {_d(field)}]" if field else "") + ".")


def _devices(devices: str | None) -> list[str]:
    """'cuda:0,cuda:1' -> a list; 'all' -> every CUDA device of this machine."""
    if not devices:
        return []
    if devices.strip() == "all":
        import torch

        count = torch.cuda.device_count() if torch.cuda.is_available() else 0
        if count == 0:
            raise AblateError("--devices all: this machine has no CUDA device; use --jobs N on the CPU")
        return [f"cuda:{i}" for i in range(count)]
    return [d.strip() for d in devices.split(",") if d.strip()]


# --------------------------------------------------------------------------------------
# ablate train
# --------------------------------------------------------------------------------------


_TRAIN_FLAGS = {"loss": "--loss-fn", "epochs": "--num-epochs", "data.source": "--data"}


@app.command()
def train(
    loss_fn: Annotated[str, typer.Option("--loss-fn", help="mse | cosine | infonce | combined | "
                                         "multistage | supcon")] = _d("loss"),
    lr: Annotated[float | None, _flag("Learning rate (multistage uses its stage rates)", "lr")] = None,
    batch_size: Annotated[int | None, _flag("Pairs per forward pass", "batch_size")] = None,
    num_epochs: Annotated[int | None, _flag("Epochs", "epochs")] = None,
    temperature: Annotated[float | None, _flag("InfoNCE temperature", "temperature")] = None,
    alpha: Annotated[float | None, _flag("Combined: InfoNCE weight", "alpha")] = None,
    beta: Annotated[float | None, _flag("Combined: cosine weight", "beta")] = None,
    gamma: Annotated[float | None, _flag("Combined: MSE weight", "gamma")] = None,
    stage1_epochs: Annotated[int | None, _flag("Multistage: MSE warm-up epochs", "stage1_epochs")] = None,
    stage2_epochs: Annotated[int | None, _flag("Multistage: InfoNCE epochs", "stage2_epochs")] = None,
    data: Annotated[str | None, _flag("A .npz/.pt/.parquet file with arrays pocket, ligand [, ligand_id], "
                                      "or 'synthetic' (the built-in benchmark)", "data.source")] = None,
    seed: Annotated[int | None, _flag("Seed of initialisation and batch order", "seed")] = None,
    device: Annotated[str | None, _flag("auto (CUDA, then MPS, then CPU), cpu, cuda, cuda:N or mps", "device")] = None,
    amp: Annotated[bool | None, typer.Option("--amp/--no-amp", help="Mixed precision \\[default: on for CUDA]")] = None,
    accumulation_steps: Annotated[int | None, _flag("Micro-batches per optimizer step (GradCache for "
                                                    "contrastive losses)", "accumulation_steps")] = None,
    experiment_name: Annotated[str, typer.Option(help="MLflow experiment.")] = specs.DEFAULT_EXPERIMENT,
    tracking_uri: TrackingOpt = None,
    save_best: Annotated[Path | None, typer.Option(help="Write the best epoch's model state here.")] = None,
    set_: SetOpt = None,
) -> None:
    """Train one model and log it to MLflow (the quick-start's experiments, one at a time)."""
    named: dict[str, Any] = {
        "loss": loss_fn, "lr": lr, "batch_size": batch_size, "epochs": num_epochs,
        "temperature": temperature, "alpha": alpha, "beta": beta, "gamma": gamma,
        "stage1_epochs": stage1_epochs, "stage2_epochs": stage2_epochs, "data.source": data,
        "seed": seed, "device": device, "amp": amp, "accumulation_steps": accumulation_steps,
    }
    overrides = studyfiles.parse_overrides(set_ or [])
    flags = {k: _TRAIN_FLAGS.get(k, "--" + k.replace("_", "-")) for k in named if k not in overrides}
    run = specs.run_from_options({**named, **overrides}, flags)  # mistakes end here, before torch is imported
    from ablate.launch import sigterm_as_interrupt
    from ablate.runs import train_and_log
    from ablate.tracking import Tracker, ui_hint
    from ablate.trainer import EpochResult, Trainer

    trainer = Trainer.from_spec(run)  # data, batch, device and model checked before MLflow is touched
    tracker = Tracker(tracking_uri)
    exp_id = tracker.experiment_id(experiment_name)
    progress = Progress(
        TextColumn("[bold]{task.description}"), BarColumn(), MofNCompleteColumn(),
        TextColumn("{task.fields[info]}", markup=False), TimeElapsedColumn(), TimeRemainingColumn(),
        console=console,
    )
    task = progress.add_task(f"{run.loss}", total=run.epochs, info="")

    def on_epoch(result: EpochResult, history: list[dict[str, float]]) -> None:
        m = result.metrics
        info = (f"loss {m['train/loss']:.4f}  val cos {m['val/cosine']:.3f}  "
                f"top1 {m['val/top1']:.3f}" + (f"  [{result.stage}]" if result.stage else ""))
        progress.update(task, completed=result.epoch + 1, info=info)

    started: list[str] = []
    try:
        with progress, sigterm_as_interrupt():
            outcome = train_and_log(trainer, tracker, exp_id, f"{run.loss}-s{run.seed}", on_epoch=on_epoch,
                                    save_best=save_best, on_start=started.append)
    except KeyboardInterrupt:
        done = int(progress.tasks[task].completed)
        err_console.print(f"interrupted after {done} of {run.epochs} epochs: "
                          + (f"MLflow run {started[0]} ended KILLED with the metrics of those epochs"
                             if started else "no MLflow run was created"))
        raise typer.Exit(130) from None
    table = Table(title=f"{run.loss}: {len(outcome.history)} epochs")
    table.add_column("metric")
    table.add_column("final", justify="right")
    table.add_column("best", justify="right")
    best = outcome.best
    for key in ("train/loss", "val/loss", *specs.SUMMARY_METRICS, "val/median_rank"):
        if key in outcome.final:
            b = best.get(key)
            table.add_row(key, f"{outcome.final[key]:.4f}", "" if b is None else f"{b:.4f}")
    console.print(table)
    if outcome.stopped is not None:
        console.print(f"stopped: {outcome.stopped.message}", style="yellow")
    if save_best is not None and trainer.best.state is not None:
        console.print(f"best model (epoch {trainer.best.epoch}) saved to {save_best}")
    console.print(Text.assemble("MLflow run ", (outcome.run_id, "bold"), f" in experiment {experiment_name!r} "
                                f"at {tracker.shown_uri}; {ui_hint(tracker.uri)}"))


# --------------------------------------------------------------------------------------
# Studies: run-suite, tune, worker, report
# --------------------------------------------------------------------------------------


def _start(spec: designs.StudySpec, store: stores.Stores, *, jobs: int | None, devices: list[str],
           array: int | None, budget: int | None = None) -> StudySession | None:
    """Open the study and train its queued trials; None when only created (--jobs 0)."""
    from ablate.session import StudySession

    session = StudySession.start(spec, store, budget=budget, devices=devices)
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
    _train(session, jobs=jobs, devices=devices, array=array)
    return session


def _train(session: StudySession, *, jobs: int | None, devices: list[str], array: int | None) -> None:
    """Train what the study has queued, with a live display; exit 130 when interrupted."""
    from ablate.launch import plan
    from ablate.render import StudyDisplay

    pending = session.pending()
    if not pending:
        return
    p = plan(jobs, devices, pending)
    where = f"on {', '.join(p.devices)}" if p.devices else f"up to {p.threads} CPU thread(s) each"
    console.print(f"training {pending} trial(s) with {'up to ' if p.spawn_after else ''}{p.workers} worker(s), "
                  f"{where}")
    done, total = session.progress()
    display = StudyDisplay(console, total, done)
    with display.progress:
        finished = session.run(jobs=p.workers, devices=p.devices, on_event=display, spawn_after=p.spawn_after,
                               array=array)
    if not finished:
        err_console.print(f"interrupted: the running trials ended FAIL in Optuna and KILLED in MLflow; "
                          f"run the same command again to resume study {session.name}")
        raise typer.Exit(130)


def _stores(storage: str | None, tracking_uri: str | None, heartbeat: int | None = None) -> stores.Stores:
    return stores.Stores(storage, tracking_uri, stores.DEFAULT_HEARTBEAT_SECONDS if heartbeat is None else heartbeat)


def _array(text: str) -> int | None:
    """--array: 'auto' (None) or a size >= 1."""
    if text.strip().lower() == "auto":
        return None
    try:
        value = int(text)
    except ValueError:
        value = 0
    if value < 1:
        raise AblateError(f"--array {text!r}: expected 'auto' or a whole number >= 1 (1: one trial at a time)")
    return value


def _jobs(text: str, minimum: int = 0) -> int | None:
    """--jobs: 'auto' (None) or a count."""
    if text.strip().lower() == "auto":
        return None
    try:
        value = int(text)
    except ValueError:
        value = -1
    if value < minimum:
        raise AblateError(f"--jobs {text!r}: expected 'auto' or a whole number >= {minimum}")
    return value


@app.command("run-suite")
def run_suite(
    name: Annotated[str, typer.Argument(help="A study in studies/ (e.g. baseline-vs-multistage) or a .toml path.")],
    seeds: Annotated[str | None, typer.Option(help="Comma-separated seeds, e.g. 0,1,2,3,4.")] = None,
    epochs: Annotated[int | None, typer.Option(min=1, help="Epochs of every experiment "
                                               "(multi-stage boundaries keep their proportions).")] = None,
    data: Annotated[str | None, typer.Option(help="Data file or 'synthetic' for every experiment.")] = None,
    set_: SetOpt = None,
    storage: StorageOpt = None,
    tracking_uri: TrackingOpt = None,
    jobs: JobsOpt = "auto",
    array: ArrayOpt = "auto",
    devices: DevicesOpt = None,
    heartbeat: HeartbeatOpt = stores.DEFAULT_HEARTBEAT_SECONDS,
    out: Annotated[Path, typer.Option(help="Folder for report.md and the plots.")] = Path("reports"),
) -> None:
    """Run an ablation suite (experiments x seeds) and compare every experiment with the baseline.

    Re-running the same command resumes: finished trials are not trained again.
    """
    overrides = studyfiles.parse_overrides(set_ or [])
    if seeds is not None:
        overrides["seeds"] = _seed_list(seeds)
    if data is not None:
        overrides["data.source"] = data
    spec = studyfiles.load_study(name, overrides, epochs=epochs)
    if not isinstance(spec, designs.SuiteSpec):
        raise AblateError(f"{name} is a search; run it with `ablate tune {name}`")
    session = _start(spec, _stores(storage, tracking_uri, heartbeat), jobs=_jobs(jobs), devices=_devices(devices),
                     array=_array(array))
    if session is not None:
        _report(session, out, finish=True)


def _seed_list(text: str) -> list[int]:
    try:
        return [int(s) for s in text.split(",") if s.strip()]
    except ValueError:
        raise AblateError(f"--seeds {text!r}: expected comma-separated integers, e.g. 0,1,2") from None


def _report(session: StudySession, out: Path, finish: bool = False) -> None:
    from ablate import render
    from ablate.tracking import ui_hint

    report, files, rebuilt = session.report(out)
    for table in render.suite_tables(report):
        console.print(table)
    for line in render.verdict(report):
        console.print(f"• {line}")
    for r in report.trials:
        if r.note:
            console.print(f"  note: {r.experiment} seed {r.seed}: {r.note}")
    done = session.finish() if rebuilt or session.trained else not session.pending()
    parent = session.known_parent_run_id
    hint = ui_hint(stores.resolve_tracking_uri(session.stores.tracking_uri))
    console.print(f"report: {files[0]}" + (f" (also on MLflow run {parent})" if parent else "") + f"; {hint}")
    if report.missing:
        what = "failed" if done else "not finished yet"
        err_console.print(f"{len(report.missing)} trial(s) {what}: {', '.join(report.missing)}"
                          + (f"; see `ablate studies show {session.name}` and run the same command again to retry"
                             if done else ""))
        if finish and done:
            raise typer.Exit(1)


@app.command()
def report(
    suite_run: Annotated[str, typer.Argument(help="The suite's study name (printed by run-suite), "
                                             "or the suite name for its newest run.")],
    storage: StorageOpt = None,
    tracking_uri: TrackingOpt = None,
    out: Annotated[Path, typer.Option(help="Folder for report.md and the plots.")] = Path("reports"),
) -> None:
    """Re-create a suite's comparison from the stores, without training."""
    from ablate.session import StudySession

    _report(StudySession.open(suite_run, _stores(storage, tracking_uri)), out)


@app.command()
def tune(
    name: Annotated[str, typer.Argument(help="A search in studies/ (temperature, batch, weights) or a .toml path.")],
    n_trials: Annotated[int | None, typer.Option(min=1, help="Trial budget, counting earlier "
                                                 "trials of the same study \\[default: the file's].")] = None,
    epochs: Annotated[int | None, typer.Option(min=1, help="Epochs of every trial.")] = None,
    data: Annotated[str | None, typer.Option(help="Data file or 'synthetic' for every trial.")] = None,
    set_: SetOpt = None,
    storage: StorageOpt = None,
    tracking_uri: TrackingOpt = None,
    jobs: JobsOpt = "auto",
    array: ArrayOpt = "auto",
    devices: DevicesOpt = None,
    heartbeat: HeartbeatOpt = stores.DEFAULT_HEARTBEAT_SECONDS,
    confirm: Annotated[int, typer.Option(min=0, help="Re-train the top K configurations with "
                                         "fresh seeds and compare them (mean, CI).")] = 0,
    out: Annotated[Path, typer.Option(help="Folder for the confirmation report.")] = Path("reports"),
) -> None:
    """Run (or resume) an Optuna search; unstable runs are pruned early."""
    overrides = studyfiles.parse_overrides(set_ or [])
    if data is not None:
        overrides["data.source"] = data
    spec = studyfiles.load_study(name, overrides, epochs=epochs)
    if not isinstance(spec, designs.SearchSpec):
        raise AblateError(f"{name} is a suite; run it with `ablate run-suite {name}`")
    devs, n_jobs, size = _devices(devices), _jobs(jobs), _array(array)
    session = _start(spec, _stores(storage, tracking_uri, heartbeat), jobs=n_jobs, devices=devs, array=size,
                     budget=n_trials)
    if session is None:
        return
    _show(session)
    session.finish()
    if confirm:
        suite = session.confirm(confirm)
        assert isinstance(suite.spec, designs.SuiteSpec)
        console.print(f"\nconfirming the top {len(suite.spec.experiments)} configuration(s) with seeds "
                      f"{', '.join(map(str, suite.spec.seeds))}")
        _train(suite, jobs=n_jobs, devices=devs, array=size)
        _report(suite, out, finish=True)


@app.command()
def worker(
    name: Annotated[str, typer.Argument(help="Study name (or spec name: its newest study).")],
    storage: StorageOpt = None,
    tracking_uri: TrackingOpt = None,
    devices: DevicesOpt = None,
    jobs: Annotated[str, typer.Option("--jobs", "-j", help="Worker processes on this machine; auto: one per "
                                      "CUDA device, else one per CPU core.")] = "auto",
    array: ArrayOpt = "auto",
    heartbeat: HeartbeatOpt = stores.DEFAULT_HEARTBEAT_SECONDS,
) -> None:
    """Join an existing study: take its waiting trials until none is left, then exit."""
    from ablate import studies
    from ablate.session import StudySession

    session = StudySession.open(name, _stores(storage, tracking_uri, heartbeat))
    console.print(Text.assemble("worker on study ", (session.name, "bold"), f" (pid {os.getpid()})"))
    _train(session, jobs=_jobs(jobs, minimum=1), devices=_devices(devices), array=_array(array))
    console.print(f"study {session.name}: no trials left to take; {studies.counts(session.study)}")


# --------------------------------------------------------------------------------------
# studies list | show | export
# --------------------------------------------------------------------------------------


@studies_app.command("list")
def studies_list(storage: StorageOpt = None) -> None:
    """Studies in the storage, oldest first."""
    from ablate import studies

    rows = studies.list_studies(studies.open_storage(storage))
    table = Table(title=f"studies in {stores.mask_url(stores.resolve_storage(storage))}")
    for col in ("name", "spec", "kind", "finished", "failed", "created"):
        table.add_column(col, justify="right" if col in ("finished", "failed") else "left")
    for r in rows:
        created = time.strftime("%Y-%m-%d %H:%M", time.localtime(r["created"])) if r["created"] else ""
        table.add_row(r["name"], r["spec"], r["kind"], f"{r['finished']}/{r['owed']}", str(r["failed"]), created)
    console.print(table)


@studies_app.command("show")
def studies_show(
    name: Annotated[str, typer.Argument(help="Study name (or spec name: its newest study).")],
    storage: StorageOpt = None,
) -> None:
    """Trials, states, best parameters, importances, and the expected best value per budget."""
    from ablate.session import StudySession

    _show(StudySession.open(name, _stores(storage, None)))


def _show(session: StudySession) -> None:
    from ablate import render

    for line in render.summary_lines(session.name, session.summary()):
        console.print(line)


@studies_app.command("export")
def studies_export(
    name: Annotated[str, typer.Argument(help="Study name (or spec name: its newest study).")],
    format: Annotated[str, typer.Option("--format", help="csv or json.")] = "csv",
    output: Annotated[Path | None, typer.Option("--output", "-o", help="File \\[default: stdout].")] = None,
    storage: StorageOpt = None,
) -> None:
    """Export every trial (state, parameters, value, user attributes) as CSV or JSON."""
    from ablate import render
    from ablate.session import StudySession

    if format not in ("csv", "json"):
        raise AblateError(f"--format {format!r}: use csv or json")
    session = StudySession.open(name, _stores(storage, None))
    text = render.export(session.study, format)
    if output is None:
        sys.stdout.write(text)
    else:
        output.write_text(text)
        console.print(f"wrote {output}")


# --------------------------------------------------------------------------------------
# ablate ui
# --------------------------------------------------------------------------------------


@app.command()
def ui(
    tracking_uri: TrackingOpt = None,
    host: Annotated[str, typer.Option(help="Interface to bind; 0.0.0.0 exposes the UI to the network.")] = "127.0.0.1",
    port: Annotated[int, typer.Option(help="Port.")] = 5000,
) -> None:
    """Start the MLflow UI on the same store and print its URL (Ctrl-C stops it)."""
    from ablate.launch import sigterm_as_interrupt
    from ablate.tracking import Tracker, runs_url

    uri = stores.resolve_tracking_uri(tracking_uri)
    if uri.startswith(("http://", "https://")):
        console.print(f"{stores.mask_url(uri)} is a tracking server: open it in a browser")
        return
    base = f"http://{host}:{port}"
    cmd = [sys.executable, "-m", "mlflow", "server", "--host", host, "--port", str(port), "--workers", "1"]
    # The store's URL goes by environment (a password stays out of process listings). The job
    # runner serves only MLflow's GenAI features; it costs seven processes.
    env = {"MLFLOW_SERVER_ENABLE_JOB_EXECUTION": "false", **os.environ, "MLFLOW_BACKEND_STORE_URI": uri}
    server = subprocess.Popen(cmd, env=env, start_new_session=True)
    console.print(Text.assemble(f"MLflow UI on {stores.mask_url(uri)}: ", (base, "bold"), " (Ctrl-C stops it)"))
    for name, exp_id in Tracker(uri).experiments():
        console.print(f"  {name}: {runs_url(base, exp_id)}")
    code = 0
    with sigterm_as_interrupt():
        try:
            code = server.wait()
        except KeyboardInterrupt:
            pass
        finally:
            if server.poll() is None:
                os.killpg(server.pid, signal.SIGTERM)
                try:
                    server.wait(timeout=15)
                except subprocess.TimeoutExpired:
                    os.killpg(server.pid, signal.SIGKILL)
                    server.wait()
    if code not in (0, -signal.SIGTERM, -signal.SIGINT):
        raise AblateError(f"the MLflow UI exited with code {code}; is port {port} free? (try --port)")


# --------------------------------------------------------------------------------------
# Entry point
# --------------------------------------------------------------------------------------


def main() -> None:
    """Run the CLI: a user's mistake is one line on stderr and exit code 2."""
    # Ctrl-C stops a command also where it was started with SIGINT ignored (a background job of a
    # script inherits that); SIGTERM is handled alike by the commands that train.
    signal.signal(signal.SIGINT, signal.default_int_handler)
    try:
        app()
    except AblateError as e:
        message = Text.assemble(("error:", "red"), f" {stores.mask_url(str(e))}")
        err_console.print(message, highlight=False, soft_wrap=True)
        raise SystemExit(2) from None
    except KeyboardInterrupt:
        err_console.print("interrupted")
        raise SystemExit(130) from None
