"""`ablate ui` and `ablate dashboard`: the MLflow UI and optuna-dashboard on ablate's stores."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Annotated

import typer

from ablate import stores
from ablate.cli import servers
from ablate.cli.app import StorageOpt, TrackingOpt, app, console, err_console
from ablate.errors import AblateError

HostOpt = Annotated[str, typer.Option(metavar="HOST", help="Interface to bind; 0.0.0.0 exposes it to the network, "
                                      "without authentication.")]
PortOpt = Annotated[int, typer.Option(metavar="PORT", help="Port; 0 picks a free one.")]
VerboseOpt = Annotated[bool, typer.Option("--verbose", "-v", metavar="", help="Show the server's own log lines here "
                                          "instead of in a log file in the working folder (its path is printed).")]


def _prepare(what: str, store: str, host: str, port: int, log_name: str, verbose: bool
             ) -> tuple[int, str, Path | None]:
    """Claim the port, warn when it is open to the network, say where the log goes: (port, base URL, log)."""
    port = servers.claim_port(host, port)
    log = None if verbose else servers.log_path(log_name)
    warning = servers.exposure_warning(host, port, what)
    if warning:
        err_console.print(warning)
    console.print(f"Starting {what} on {stores.mask_url(store)}" + (f" (server log: {log})" if log else "") + " ...")
    return port, servers.base_url(host, port), log


def _is_dashboard(body: bytes) -> bool:
    """Whether an answer is optuna-dashboard's /api/meta."""
    try:
        return "artifact_is_available" in json.loads(body)
    except (ValueError, TypeError):
        return False


# --------------------------------------------------------------------------------------
# ablate ui
# --------------------------------------------------------------------------------------


@app.command()
def ui(
    tracking_uri: TrackingOpt = None,
    host: HostOpt = "127.0.0.1",
    port: PortOpt = 5000,
    verbose: VerboseOpt = False,
) -> None:
    """Start the MLflow UI on the store that run-suite, tune and train log to; print its URL (Ctrl-C stops it)."""
    uri = stores.resolve_tracking_uri(tracking_uri)
    if uri.startswith(("http://", "https://")):
        console.print(f"{stores.mask_url(uri)} is a tracking server: open it in a browser")
        return
    port = servers.claim_port(host, port)  # the cheap checks first
    from ablate.tracking.store import check_store

    check_store(uri, writable=False)  # a database that does not answer: one line in seconds, not a retrying server
    port, base, log = _prepare("the MLflow UI", uri, host, port, "mlflow-ui.log", verbose)
    command, env = servers.mlflow_command(host, port), servers.mlflow_env(uri)
    with servers.running("the MLflow UI", command, env, log) as server:
        from ablate.tracking.client import Tracker, grouped_url, runs_url  # imported while the server starts

        servers.wait_ready(server, f"{base}/health", lambda body: body.strip() == b"OK")
        experiments = Tracker(uri).experiments()
        console.print(f"MLflow UI: {base} (Ctrl-C stops it)")
        for name, exp_id, grouped in experiments:
            console.print(f"  {name}: {runs_url(base, exp_id)}")
            if grouped:
                console.print(f"    grouped by experiment: {grouped_url(base, exp_id)}")
        servers.serve(server)
    console.print("MLflow UI stopped")


# --------------------------------------------------------------------------------------
# ablate dashboard
# --------------------------------------------------------------------------------------


@app.command()
def dashboard(
    name: Annotated[str, typer.Argument(metavar="STUDY", help="Study name (or spec name: its newest study).")],
    storage: StorageOpt = None,
    host: HostOpt = "127.0.0.1",
    port: PortOpt = 8080,
    verbose: VerboseOpt = False,
) -> None:
    """Start optuna-dashboard on the study's storage and print the study's URL once it answers (Ctrl-C stops it)."""
    if not servers.dashboard_installed():
        raise AblateError(f"optuna-dashboard is not installed; install it with: {servers.DASHBOARD_INSTALL}")
    url = stores.resolve_storage(storage)
    port = servers.claim_port(host, port)  # its own arguments before the storage: a wrong port answers at once
    stores.require_storage(url)
    from ablate.study import studies

    optuna_storage = studies.open_storage(url, heartbeat_seconds=None)
    study = studies.load(name, optuna_storage)
    study_id = optuna_storage.get_study_id_from_name(study.name)
    port, base, log = _prepare("optuna-dashboard", url, host, port, "optuna-dashboard.log", verbose)
    command, env = servers.dashboard_command(host, port), servers.dashboard_env(url)
    with servers.running("optuna-dashboard", command, env, log) as server:
        servers.wait_ready(server, f"{base}/api/meta", _is_dashboard)
        console.print(f"optuna-dashboard: {base} (Ctrl-C stops it)")
        console.print(f"  study {study.name}: {base}/dashboard/studies/{study_id}")
        servers.serve(server)
    console.print("optuna-dashboard stopped")
