"""`ablate ui`: the MLflow UI on the same store."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
from typing import TYPE_CHECKING, Annotated

import typer
from rich.text import Text

from ablate import stores
from ablate.cli.app import (
    TrackingOpt,
    app,
    console,
)
from ablate.errors import AblateError

if TYPE_CHECKING:
    pass


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
