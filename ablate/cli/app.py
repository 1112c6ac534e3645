"""The command-line application: the typer app, its consoles, the options commands share, and their parsers."""

from __future__ import annotations

from typing import Annotated, Any

import typer
from rich.console import Console

from ablate import specs, stores
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
def _version(value: bool) -> None:
    if value:
        from ablate import __version__

        print(f"ablate {__version__}")
        raise typer.Exit()


@app.callback()
def _options(
    version: Annotated[bool, typer.Option("--version", callback=_version, is_eager=True, metavar="",
                                          help="Print the version and exit.")] = False,
) -> None:
    """Loss ablations and Optuna searches for pocket -> ligand embedding alignment, tracked in MLflow."""


studies_app = typer.Typer(help="List, inspect and export studies.", no_args_is_help=True)
app.add_typer(studies_app, name="studies")

# Markup is off: paths, URLs and messages print as they are, brackets included ([::1], ablate[postgres]).
console = Console(markup=False, soft_wrap=True)
err_console = Console(stderr=True, markup=False, soft_wrap=True)

def default_of(field: str) -> str:
    """The default of a run field (dotted for nested ones), for help texts; defaults live in ablate.specs. Read
    from the fields themselves: validating a whole RunSpec would import its loss (and torch) to print help."""
    model: Any = specs.RunSpec
    value: Any = None
    for part in field.split("."):
        value = model.model_fields[part].default
        model = type(value)
    return str(value)


StorageOpt = Annotated[
    str | None,
    typer.Option("--storage", metavar="URL", help="Optuna storage URL \\[default: $ABLATE_STORAGE or "
                 "sqlite:///optuna.db]; postgresql://... for many machines."),
]
TrackingOpt = Annotated[
    str | None,
    typer.Option("--tracking-uri", metavar="URI", help="MLflow tracking URI \\[default: $MLFLOW_TRACKING_URI or "
                 "sqlite:///mlflow.db]; http://host:5000 for a tracking server."),
]
SetOpt = Annotated[
    list[str] | None,
    typer.Option("--set", metavar="KEY=VALUE", help="Override a run field, e.g. lr=5e-4, model.dropout=0.1 or a "
                 "loss's own setting (margin=0.3); for one experiment of a suite, prefix KEY with experiments.NAME. "
                 "(repeatable)."),
]
JobsOpt = Annotated[
    str, typer.Option("--jobs", "-j", metavar="N", help="Trials trained in parallel on this machine, one process each; "
                      "auto: one per CUDA device, else one per CPU core (each on one thread); "
                      "0: only create the study, for remote workers.")
]
ArrayOpt = Annotated[
    str, typer.Option("--array", metavar="N", help="Compatible trials trained together as one array (each still "
                      "its own trial and MLflow run); auto: the size that measures fastest on this device; "
                      "1: one at a time.")
]
KeepOpt = Annotated[
    bool, typer.Option("--keep-checkpoints", metavar="", help="Keep each finished trial's checkpoint in its MLflow run "
                       "(by default only running and stopped trials keep one, to resume from).")
]
DevicesOpt = Annotated[
    str | None,
    typer.Option("--devices", metavar="DEVICES", help="Comma-separated devices, one worker process per device, "
                 "e.g. cuda:0,cuda:1; 'all' for every CUDA device."),
]
HeartbeatOpt = Annotated[
    int, typer.Option("--heartbeat", min=1, metavar="SECONDS", help="Seconds between worker heartbeats; a trial "
                      "whose worker is silent for 3 heartbeats is failed and re-queued (within 6).")
]


def flag(text: str, field: str | None = None, metavar: str | None = None) -> Any:
    """An option whose help shows the run field's default (its placeholder: N for a whole number, X otherwise)."""
    shown = metavar or ("N" if field and default_of(field).lstrip("-").isdigit() else "X")
    return typer.Option(metavar=shown, help=text + (f" \\[default: {default_of(field)}]" if field else "") + ".")


def parse_devices(devices: str | None) -> list[str]:
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


def stores_of(storage: str | None, tracking_uri: str | None, heartbeat: int | None = None) -> stores.Stores:
    return stores.Stores(storage, tracking_uri, stores.DEFAULT_HEARTBEAT_SECONDS if heartbeat is None else heartbeat)


def parse_array(text: str) -> int | None:
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


def parse_jobs(text: str, minimum: int = 0) -> int | None:
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


def parse_seeds(text: str) -> list[int]:
    try:
        return [int(s) for s in text.split(",") if s.strip()]
    except ValueError:
        raise AblateError(f"--seeds {text!r}: expected comma-separated integers, e.g. 0,1,2") from None
