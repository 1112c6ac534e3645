"""The `ablate` command: parse, call one function of the layer below, render with rich."""

from __future__ import annotations

import math
import os
import subprocess
import sys
import threading
import time
from pathlib import Path
from typing import Annotated, Any

import typer
from rich.console import Console
from rich.progress import (
    BarColumn,
    MofNCompleteColumn,
    Progress,
    TaskID,
    TextColumn,
    TimeElapsedColumn,
    TimeRemainingColumn,
)
from rich.table import Table
from rich.text import Text

from ablate import specs
from ablate.errors import AblateError

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
console = Console(markup=False)
err_console = Console(stderr=True, markup=False)

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
    int, typer.Option("--jobs", "-j", min=0, help="Trials run in parallel on this machine, one "
                      "process each (0: only create the study, for remote workers).")
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
    from ablate.tracking import Tracker, ui_hint
    from ablate.worker import check_run, sigterm_as_interrupt, train_and_log

    named: dict[str, Any] = {
        "loss": loss_fn, "lr": lr, "batch_size": batch_size, "epochs": num_epochs,
        "temperature": temperature, "alpha": alpha, "beta": beta, "gamma": gamma,
        "stage1_epochs": stage1_epochs, "stage2_epochs": stage2_epochs, "data.source": data,
        "seed": seed, "device": device, "amp": amp, "accumulation_steps": accumulation_steps,
    }
    overrides = specs.parse_overrides(set_ or [])
    flags = {k: _TRAIN_FLAGS.get(k, "--" + k.replace("_", "-")) for k in named if k not in overrides}
    run = specs.run_from_options({**named, **overrides}, flags)
    check_run(run)
    tracker = Tracker(tracking_uri)
    exp_id = tracker.experiment_id(experiment_name)
    progress = Progress(
        TextColumn("[bold]{task.description}"), BarColumn(), MofNCompleteColumn(),
        TextColumn("{task.fields[info]}", markup=False), TimeElapsedColumn(), TimeRemainingColumn(),
        console=console,
    )
    task = progress.add_task(f"{run.loss}", total=run.epochs, info="")

    def on_epoch(result: Any, history: Any) -> None:
        m = result.metrics
        info = (f"loss {m['train/loss']:.4f}  val cos {m['val/cosine']:.3f}  "
                f"top1 {m['val/top1']:.3f}" + (f"  [{result.stage}]" if result.stage else ""))
        progress.update(task, completed=result.epoch + 1, info=info)

    with progress, sigterm_as_interrupt():
        outcome = train_and_log(
            run, tracker, exp_id, f"{run.loss}-s{run.seed}",
            on_epoch=lambda r, h: on_epoch(r, h), save_best=save_best,
        )
    table = Table(title=f"{run.loss}: {len(outcome.history)} epochs")
    table.add_column("metric")
    table.add_column("final", justify="right")
    table.add_column("best", justify="right")
    best = outcome.best()
    for key in ("train/loss", "val/loss", *specs.SUMMARY_METRICS, "val/median_rank"):
        if key in outcome.final:
            b = best.get(key)
            table.add_row(key, f"{outcome.final[key]:.4f}", "" if b is None else f"{b:.4f}")
    console.print(table)
    if outcome.stopped is not None:
        console.print(f"stopped: {outcome.stopped.message}", style="yellow")
    if save_best is not None and outcome.trainer.best.state is not None:
        console.print(f"best model (epoch {outcome.trainer.best.epoch}) saved to {save_best}")
    console.print(Text.assemble("MLflow run ", (outcome.run_id, "bold"), f" in experiment {experiment_name!r} "
                                f"at {tracker.shown_uri}; {ui_hint(tracker.uri)}"))


# --------------------------------------------------------------------------------------
# Studies: run-suite, tune, worker
# --------------------------------------------------------------------------------------


class StudyDisplay:
    """Live progress of a study: trials done / running / left, and each running trial's epoch."""

    def __init__(self, total: int, done: int):
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

    def __call__(self, event: dict[str, Any]) -> None:
        with self.lock:
            kind, number = event["kind"], event["trial"]
            if kind == "start":
                self.running[number] = self.progress.add_task(
                    f"  #{number} {event['label']}", total=event["epochs"], info="")
            elif kind == "epoch" and number in self.running:
                v = event["value"]
                shown = f"{v:.3f}" if isinstance(v, float) and math.isfinite(v) else str(v)
                self.progress.update(self.running[number], completed=event["epoch"] + 1,
                                     info=f"{event['metric']} {shown}")
            elif kind == "end" and number in self.running:
                self.progress.remove_task(self.running.pop(number))
                state = event["state"]
                if state in ("COMPLETE", "PRUNED"):
                    self.done += 1
                if state != "COMPLETE":
                    why = event.get("reason") or ""
                    self.progress.console.print(f"  #{number} {event['label']}: {state}"
                                                + (f" ({why})" if why else ""))
            self._refresh()


def _run_study(
    spec: specs.StudySpec, *, storage: str | None, tracking_uri: str | None, jobs: int,
    devices: str | None, heartbeat: int, n_trials: int | None = None,
) -> tuple[Any, bool]:
    from ablate import studies
    from ablate.worker import execute, prepare

    devs = _devices(devices)
    ref, tracker, parent = prepare(spec, storage=storage, tracking_uri=tracking_uri,
                                   n_trials=n_trials, heartbeat_seconds=heartbeat, devices=devs)
    total = spec.trial_count() if isinstance(spec, specs.SuiteSpec) else (n_trials or spec.n_trials)
    c = studies.counts(ref.study)
    done = c.get("COMPLETE", 0) + c.get("PRUNED", 0)
    shown_storage = specs.mask_url(specs.resolve_storage(storage))
    console.print(Text.assemble("study ", (ref.name, "bold"), f" in {shown_storage} ({done}/{total} trials done); "
                                f"MLflow parent run {parent} at {tracker.shown_uri}"))
    if jobs == 0 and not devices:
        console.print(f"created; start workers with: ablate worker {ref.name} --storage {shown_storage}")
        return ref, False
    display = StudyDisplay(total, done)
    try:
        with display.progress:
            finished = execute(ref, storage=storage, tracking_uri=tracking_uri, jobs=jobs,
                               devices=devs, heartbeat_seconds=heartbeat, on_event=display)
    except BaseException:
        tracker.end_run(parent, "FAILED")
        raise
    if not finished:
        tracker.end_run(parent, "KILLED")
        err_console.print(f"interrupted; run the same command again to resume study {ref.name}")
        raise typer.Exit(130)
    return ref, True


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
    jobs: JobsOpt = 1,
    devices: DevicesOpt = None,
    heartbeat: HeartbeatOpt = specs.DEFAULT_HEARTBEAT_SECONDS,
    out: Annotated[Path, typer.Option(help="Folder for report.md and the plots.")] = Path("reports"),
) -> None:
    """Run an ablation suite (experiments x seeds) and compare every experiment with the baseline.

    Re-running the same command resumes: finished trials are not trained again.
    """
    overrides = specs.parse_overrides(set_ or [])
    if seeds is not None:
        overrides["seeds"] = _seed_list(seeds)
    if data is not None:
        overrides["data.source"] = data
    spec = specs.load_study(name, overrides, epochs=epochs)
    if not isinstance(spec, specs.SuiteSpec):
        raise AblateError(f"{name} is a search; run it with `ablate tune {name}`")
    ref, ran = _run_study(spec, storage=storage, tracking_uri=tracking_uri, jobs=jobs,
                          devices=devices, heartbeat=heartbeat)
    if ran:
        _suite_report(ref.name, storage, tracking_uri, out, finish=True)


def _seed_list(text: str) -> list[int]:
    try:
        return [int(s) for s in text.split(",") if s.strip()]
    except ValueError:
        raise AblateError(f"--seeds {text!r}: expected comma-separated integers, e.g. 0,1,2") from None


def _suite_report(name: str, storage: str | None, tracking_uri: str | None, out: Path,
                  finish: bool = False) -> None:
    from ablate import report as rep
    from ablate import studies
    from ablate.tracking import Tracker, ui_hint
    from ablate.worker import end_parent_if_done, ensure_parent

    ref = studies.load(name, studies.open_storage(storage))
    if not isinstance(ref.spec, specs.SuiteSpec):
        raise AblateError(f"{ref.name} is a search; see it with `ablate studies show {ref.name}`")
    tracker = Tracker(tracking_uri)
    _, parent = ensure_parent(ref, tracker)
    report = rep.build(ref.study, ref.spec)
    console.print(rep.rich_table(report))
    for line in rep.verdict(report):
        console.print(f"• {line}")
    for r in report.trials:
        if r.note:
            console.print(f"  note: {r.experiment} seed {r.seed}: {r.note}")
    files = rep.write(report, tracker, out / ref.name)
    rep.publish(report, tracker, parent, files)
    done = end_parent_if_done(ref, tracker, parent)
    console.print(f"report: {files[0]} (also on MLflow run {parent}); {ui_hint(tracker.uri)}")
    if report.missing:
        what = "failed" if done else "not finished yet"
        err_console.print(f"{len(report.missing)} trial(s) {what}: {', '.join(report.missing)}"
                          + (f"; see `ablate studies show {ref.name}` and run the same command again to retry"
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
    _suite_report(suite_run, storage, tracking_uri, out)


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
    jobs: JobsOpt = 1,
    devices: DevicesOpt = None,
    heartbeat: HeartbeatOpt = specs.DEFAULT_HEARTBEAT_SECONDS,
    confirm: Annotated[int, typer.Option(min=0, help="Re-train the top K configurations with "
                                         "fresh seeds and compare them (mean, CI).")] = 0,
    out: Annotated[Path, typer.Option(help="Folder for the confirmation report.")] = Path("reports"),
) -> None:
    """Run (or resume) an Optuna search; unstable runs are pruned early."""
    overrides = specs.parse_overrides(set_ or [])
    if data is not None:
        overrides["data.source"] = data
    spec = specs.load_study(name, overrides, epochs=epochs)
    if not isinstance(spec, specs.SearchSpec):
        raise AblateError(f"{name} is a suite; run it with `ablate run-suite {name}`")
    ref, ran = _run_study(spec, storage=storage, tracking_uri=tracking_uri, jobs=jobs,
                          devices=devices, heartbeat=heartbeat, n_trials=n_trials)
    if not ran:
        return
    from ablate.tracking import Tracker
    from ablate.worker import end_parent_if_done, ensure_parent

    tracker = Tracker(tracking_uri)
    _, parent = ensure_parent(ref, tracker)
    _show_search(ref.name, storage)
    end_parent_if_done(ref, tracker, parent)
    if confirm:
        from ablate.studies import confirmation_suite

        suite = confirmation_suite(ref.study, spec, confirm)
        console.print(f"\nconfirming the top {len(suite.experiments)} configuration(s) with seeds "
                      f"{', '.join(map(str, suite.seeds))}")
        cref, cran = _run_study(suite, storage=storage, tracking_uri=tracking_uri, jobs=jobs,
                                devices=devices, heartbeat=heartbeat)
        if cran:
            _suite_report(cref.name, storage, tracking_uri, out, finish=True)


@app.command()
def worker(
    name: Annotated[str, typer.Argument(help="Study name (or spec name: its newest study).")],
    storage: StorageOpt = None,
    tracking_uri: TrackingOpt = None,
    devices: DevicesOpt = None,
    jobs: Annotated[int, typer.Option("--jobs", "-j", min=1, help="Worker processes on this machine.")] = 1,
    heartbeat: HeartbeatOpt = specs.DEFAULT_HEARTBEAT_SECONDS,
) -> None:
    """Join an existing study: take its waiting trials until none is left, then exit."""
    from ablate import studies
    from ablate.worker import execute

    ref = studies.load(name, studies.open_storage(storage, heartbeat_seconds=heartbeat))
    total = ref.spec.trial_count() if isinstance(ref.spec, specs.SuiteSpec) else len(
        [t for t in ref.study.get_trials(deepcopy=False) if studies.is_queued(t)
         and not t.user_attrs.get(studies.SKIPPED_ATTR)])
    c = studies.counts(ref.study)
    display = StudyDisplay(total, c.get("COMPLETE", 0) + c.get("PRUNED", 0))
    console.print(Text.assemble("worker on study ", (ref.name, "bold"), f" (pid {os.getpid()})"))
    with display.progress:
        finished = execute(ref, storage=storage, tracking_uri=tracking_uri, jobs=jobs,
                           devices=_devices(devices), heartbeat_seconds=heartbeat, on_event=display)
    if not finished:
        raise typer.Exit(130)
    console.print(f"study {ref.name}: no trials left to take; {studies.counts(ref.study)}")


# --------------------------------------------------------------------------------------
# studies list | show | export
# --------------------------------------------------------------------------------------


@studies_app.command("list")
def studies_list(storage: StorageOpt = None) -> None:
    """Studies in the storage, oldest first."""
    from ablate import studies

    rows = studies.list_studies(studies.open_storage(storage))
    table = Table(title=f"studies in {specs.mask_url(specs.resolve_storage(storage))}")
    for col in ("name", "spec", "kind", "trials", "created"):
        table.add_column(col)
    for r in rows:
        created = time.strftime("%Y-%m-%d %H:%M", time.localtime(r["created"])) if r["created"] else ""
        table.add_row(r["name"], r["spec"], r["kind"], str(r["trials"]), created)
    console.print(table)


@studies_app.command("show")
def studies_show(
    name: Annotated[str, typer.Argument(help="Study name (or spec name: its newest study).")],
    storage: StorageOpt = None,
) -> None:
    """Trials, states, best parameters, importances, and the expected best value per budget."""
    _show_search(name, storage)


def _show_search(name: str, storage: str | None) -> None:
    from ablate import report as rep
    from ablate import studies

    ref = studies.load(name, studies.open_storage(storage))
    summary = rep.search_summary(ref.study, ref.spec)
    table = Table(title=f"{ref.name}: trials")
    for col in ("#", "state", "configuration", "value", "epochs", "note"):
        table.add_column(col, justify="right" if col in ("#", "value", "epochs") else "left")
    for t in summary.trials:
        table.add_row(str(t.number), t.state, t.label, _fmt(t.value), str(t.epochs), t.note)
    console.print(table)
    console.print("trials by state: " + ", ".join(f"{k} {v}" for k, v in summary.states.items()))
    if summary.best is not None:
        console.print(f"best: trial #{summary.best.number} {summary.best.label} -> "
                      f"{summary.metric} {_fmt(summary.best.value)}")
    if summary.importances:
        console.print("parameter importances (fANOVA): " + ", ".join(
            f"{k} {v:.2f}" for k, v in summary.importances.items()))
    if summary.expected_max:
        points = sorted({1, 2, 3, 5, 10, 20, 50, len(summary.expected_max)})
        cells = [f"{n}: {_fmt(summary.expected_max[n - 1])}" for n in points
                 if n <= len(summary.expected_max)]
        console.print(f"expected best {summary.metric} with n trials (Dodge et al. 2019; a pruned trial "
                      "counts with the value it had reached): " + ", ".join(cells))


def _fmt(v: float | None) -> str:
    return "" if v is None or not math.isfinite(v) else f"{v:.4f}"


@studies_app.command("export")
def studies_export(
    name: Annotated[str, typer.Argument(help="Study name (or spec name: its newest study).")],
    format: Annotated[str, typer.Option("--format", help="csv or json.")] = "csv",
    output: Annotated[Path | None, typer.Option("--output", "-o", help="File \\[default: stdout].")] = None,
    storage: StorageOpt = None,
) -> None:
    """Export every trial (state, parameters, value, user attributes) as CSV or JSON."""
    from ablate import report as rep
    from ablate import studies

    if format not in ("csv", "json"):
        raise AblateError(f"--format {format!r}: use csv or json")
    ref = studies.load(name, studies.open_storage(storage))
    text = rep.export(ref.study, format)
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
    import signal

    from ablate.tracking import Tracker, runs_url
    from ablate.worker import sigterm_as_interrupt

    uri = specs.resolve_tracking_uri(tracking_uri)
    if uri.startswith(("http://", "https://")):
        console.print(f"{specs.mask_url(uri)} is a tracking server: open it in a browser")
        return
    base = f"http://{host}:{port}"
    cmd = [sys.executable, "-m", "mlflow", "server", "--host", host, "--port", str(port), "--workers", "1"]
    # The store's URL goes by environment (a password stays out of process listings). The job
    # runner serves only MLflow's GenAI features; it costs seven processes.
    env = {"MLFLOW_SERVER_ENABLE_JOB_EXECUTION": "false", **os.environ, "MLFLOW_BACKEND_STORE_URI": uri}
    server = subprocess.Popen(cmd, env=env, start_new_session=True)
    console.print(Text.assemble(f"MLflow UI on {specs.mask_url(uri)}: ", (base, "bold"), " (Ctrl-C stops it)"))
    for name, exp_id in Tracker(uri).experiments():
        console.print(f"  {name}: {runs_url(base, exp_id)}")
    code = 0
    # Ctrl-C (SIGINT) stops the UI also where it was started with SIGINT ignored (a background job
    # of a script inherits that), as does SIGTERM.
    signal.signal(signal.SIGINT, signal.default_int_handler)
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
    try:
        app()
    except AblateError as e:
        message = Text.assemble(("error:", "red"), f" {specs.mask_url(str(e))}")
        err_console.print(message, highlight=False, soft_wrap=True)
        raise SystemExit(2) from None
    except KeyboardInterrupt:
        err_console.print("interrupted")
        raise SystemExit(130) from None
