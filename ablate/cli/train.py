"""`ablate train`: one run with the quick-start's flags, logged to MLflow."""

from __future__ import annotations

import contextlib
from pathlib import Path
from typing import TYPE_CHECKING, Annotated, Any

import typer
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn, TimeRemainingColumn
from rich.table import Table
from rich.text import Text

from ablate import specs, vocabulary
from ablate.cli.app import (
    SetOpt,
    TrackingOpt,
    app,
    console,
    default_of,
    err_console,
    flag,
)
from ablate.errors import AblateError
from ablate.losses import builtin_names
from ablate.study import studyfiles

if TYPE_CHECKING:
    from ablate.tracking.client import Tracker
    from ablate.tracking.runs import RunOutcome
    from ablate.training.selection import EpochResult
    from ablate.training.trainer import Trainer


# --------------------------------------------------------------------------------------
# ablate train
# --------------------------------------------------------------------------------------


_TRAIN_FLAGS = {"loss": "--loss-fn", "epochs": "--epochs", "data.source": "--data", "data.test_source": "--test-data"}


@app.command()
def train(
    loss_fn: Annotated[str, typer.Option("--loss-fn", metavar="LOSS", help=" | ".join(builtin_names()) + ", or your "
                                         "own: path/file.py:Class, package.module:Class or an installed entry point "
                                         "(its settings with --set)")] = default_of("loss"),
    lr: Annotated[float | None, flag("Learning rate (multistage uses its stage rates)", "lr")] = None,
    batch_size: Annotated[int | None, flag("Pairs per forward pass", "batch_size")] = None,
    num_epochs: Annotated[int | None, typer.Option(
        "--epochs", "--num-epochs", metavar="N",
        help=f"Epochs (--num-epochs: the quick-start's name) \\[default: {default_of('epochs')}].")] = None,
    temperature: Annotated[float | None, flag("InfoNCE temperature", "temperature")] = None,
    alpha: Annotated[float | None, flag("Combined: InfoNCE weight", "alpha")] = None,
    beta: Annotated[float | None, flag("Combined: cosine weight", "beta")] = None,
    gamma: Annotated[float | None, flag("Combined: MSE weight", "gamma")] = None,
    stage1_epochs: Annotated[int | None, flag("Multistage: MSE warm-up epochs", "stage1_epochs")] = None,
    stage2_epochs: Annotated[int | None, flag("Multistage: InfoNCE epochs", "stage2_epochs")] = None,
    data: Annotated[str | None, flag("A .npz/.pt/.parquet file with arrays pocket, ligand [, ligand_id, "
                                      "pocket_id, split], or 'synthetic' (the built-in benchmark)", "data.source",
                                      "FILE")] = None,
    test_data: Annotated[str | None, flag("Score the selected model on this file's pairs instead of a test split "
                                          "of --data", None, "FILE")] = None,
    patience: Annotated[int | None, typer.Option(
        min=1, metavar="N", help="Stop when the selection metric (validation) has not improved for N epochs "
        "\\[default: off].")] = None,
    seed: Annotated[int | None, flag("Seed of initialisation and batch order", "seed")] = None,
    device: Annotated[str | None, flag("auto (CUDA, then MPS, then CPU), cpu, cuda, cuda:N or mps", "device",
                                       "DEVICE")] = None,
    amp: Annotated[bool | None, typer.Option("--amp/--no-amp", metavar="",
                                             help="Mixed precision \\[default: on for CUDA]")] = None,
    accumulation_steps: Annotated[int | None, flag("Micro-batches per optimizer step (GradCache for "
                                                    "contrastive losses)", "accumulation_steps")] = None,
    experiment_name: Annotated[str, typer.Option(metavar="NAME", help="MLflow experiment.")] = specs.DEFAULT_EXPERIMENT,
    tracking_uri: TrackingOpt = None,
    save_best: Annotated[Path | None, typer.Option(metavar="FILE", help="Also write the selected epoch's model "
                                                   "state (a state_dict) here.")] = None,
    set_: SetOpt = None,
) -> None:
    """Train one model and log it to MLflow (the quick-start's experiments, one at a time).

    The epoch with the best validation selection metric (select_metric, default val/mrr) is kept; that model is scored once on the test split and logged as the run's MLflow model, with split.json (the row indices)."""  # noqa: E501 (one line: the help rewraps it)
    named: dict[str, Any] = {
        "loss": loss_fn, "lr": lr, "batch_size": batch_size, "epochs": num_epochs,
        "temperature": temperature, "alpha": alpha, "beta": beta, "gamma": gamma,
        "stage1_epochs": stage1_epochs, "stage2_epochs": stage2_epochs, "data.source": data,
        "seed": seed, "device": device, "amp": amp, "accumulation_steps": accumulation_steps,
        "data.test_source": test_data, "patience": patience,
    }
    overrides = studyfiles.parse_overrides(set_ or [])
    flags = {k: _TRAIN_FLAGS.get(k, "--" + k.replace("_", "-")) for k in named if k not in overrides}
    run = specs.run_from_options({**named, **overrides}, flags)  # mistakes end here, before torch is imported
    from ablate.stores import resolve_tracking_uri
    from ablate.tracking.store import check_store

    check_store(resolve_tracking_uri(tracking_uri))  # the MLflow store answers (seconds at most) before training
    if save_best is not None:
        if save_best.is_dir():
            raise AblateError(f"--save-best {save_best}: that is a folder; give a file name, e.g. "
                              f"{save_best / 'best.pt'}")
        studyfiles.writable_folder(save_best.parent, f"--save-best {save_best}")
    from ablate.training import files

    files.check(run.data)  # a mistake in a data file answers before torch is imported
    from ablate.tracking.client import Tracker, ui_hint
    from ablate.training.trainer import Trainer

    trainer = Trainer.from_spec(run)  # data, batch, device and model checked before MLflow is touched
    tracker = Tracker(tracking_uri)
    outcome = _train_with_progress(run, trainer, tracker, tracker.experiment_id(experiment_name))
    _print_outcome(run, outcome)
    chosen = outcome.best_run
    if save_best is not None and chosen.state is not None:
        try:
            trainer.save_best(save_best)
        except AblateError as e:
            raise AblateError(f"{e}; the run is kept, and the same model is MLflow's runs:/{outcome.run_id}/model") \
                from None
        console.print(f"selected model (epoch {chosen.epoch + 1}) saved to {save_best}")
    console.print(Text.assemble("MLflow run ", (outcome.run_id, "bold"), f" in experiment {experiment_name!r} "
                                f"at {tracker.shown_uri}; {ui_hint(tracker.uri)}"))


def _train_with_progress(run: specs.RunSpec, trainer: Trainer, tracker: Tracker, exp_id: str) -> RunOutcome:
    """Train and log the run with a progress bar (a plain line every tenth of the epochs without a terminal);
    Ctrl-C ends it KILLED with exit code 130, a failing loss is one line."""
    from ablate.study.launch import sigterm_as_interrupt
    from ablate.tracking.client import SPLIT_FILE
    from ablate.tracking.runs import train_and_log
    from ablate.training.splits import load_split

    progress = Progress(
        TextColumn("[bold]{task.description}"), BarColumn(), MofNCompleteColumn(),
        TextColumn("{task.fields[info]}", markup=False), TimeElapsedColumn(), TimeRemainingColumn(),
        console=console,
    )
    task = progress.add_task(f"{run.loss}", total=run.epochs, info="")
    live = console.is_terminal
    every = max(1, run.epochs // 10)

    def on_epoch(result: EpochResult, history: list[dict[str, float]]) -> None:
        m = result.metrics
        info = (f"loss {m['train/loss']:.4f}  val cos {m['val/cosine']:.3f}  "
                f"top1 {m['val/top1']:.3f}" + (f"  [{result.stage}]" if result.stage else ""))
        progress.update(task, completed=result.epoch + 1, info=info)
        if not live and ((result.epoch + 1) % every == 0 or result.stopped_early):
            console.print(f"{run.loss}: epoch {result.epoch + 1}/{run.epochs} {info}", highlight=False)

    started: list[str] = []
    split = load_split(run.data)

    def on_start(run_id: str) -> None:
        started.append(run_id)
        tracker.log_dict(run_id, split.document(), SPLIT_FILE)

    try:
        with progress if live else contextlib.nullcontext(), sigterm_as_interrupt():
            outcome = train_and_log(trainer, tracker, exp_id, f"{run.loss}-s{run.seed}", on_epoch=on_epoch,
                                    on_start=on_start)
    except KeyboardInterrupt:
        done = int(progress.tasks[task].completed)
        err_console.print(f"interrupted after {done} of {run.epochs} epochs: "
                          + (f"MLflow run {started[0]} ended KILLED with the metrics of those epochs"
                             if started else "no MLflow run was created"))
        raise typer.Exit(130) from None
    if outcome.error is not None:
        raise AblateError(f"{outcome.error}; MLflow run {outcome.run_id} ended FAILED after "
                          f"{len(outcome.history)} epochs")
    return outcome


def _print_outcome(run: specs.RunSpec, outcome: RunOutcome) -> None:
    """The final and the selected epoch and the test score of the selected model: a table in a terminal,
    Markdown without one; why the run stopped."""
    from ablate.training.splits import load_split

    chosen = outcome.best_run
    selected = (f"epoch {chosen.epoch + 1} selected by {chosen.select} (validation), its model scored once on test"
                if chosen.epoch >= 0 else f"no epoch selected: {chosen.select} was never finite")
    title = f"{run.loss}: {len(outcome.history)} epochs; {selected} ({load_split(run.data).how})"
    columns = ("metric", "final epoch", "selected epoch", "test, selected model")
    rows = []
    for key in ("train/loss", "val/loss", *vocabulary.SUMMARY_METRICS, "val/median_rank"):
        if key in outcome.final:
            cells = [outcome.final[key], outcome.selected.get(key), outcome.test.get(vocabulary.on_split(key, "test"))]
            name = "train loss" if key == "train/loss" else key.split("/", 1)[1]
            rows.append([name, *("" if v is None else f"{v:.4f}" for v in cells)])
    if console.is_terminal:
        table = Table(title=title, caption="final and selected epoch: validation pairs (train loss: training)")
        for i, column in enumerate(columns):
            table.add_column(column, justify="right" if i else "left")
        for row in rows:
            table.add_row(*row)
        console.print(table)
    else:
        lines = [f"**{title}**", "", "| " + " | ".join(columns) + " |", "|---|---:|---:|---:|"]
        console.print("\n".join([*lines, *("| " + " | ".join(row) + " |" for row in rows)]), highlight=False)
    if outcome.stopped is not None:
        console.print(f"stopped: {outcome.stopped.message}", style="yellow")
    if outcome.stopped_early_at is not None:
        console.print(f"stopped early after epoch {outcome.stopped_early_at + 1}: {chosen.select} had not improved "
                      f"for {run.patience} epochs")
