"""`ablate studies list | show | export`: what the stores hold, without training."""

from __future__ import annotations

import sys
import time
from pathlib import Path
from typing import TYPE_CHECKING, Annotated

import typer
from rich.table import Table

from ablate import stores
from ablate.cli.app import (
    StorageOpt,
    console,
    stores_of,
    studies_app,
)
from ablate.errors import AblateError

if TYPE_CHECKING:
    from ablate.compare import SearchSummary
    from ablate.session import StudySession


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
    name: Annotated[str, typer.Argument(metavar="STUDY", help="Study name (or spec name: its newest study).")],
    storage: StorageOpt = None,
) -> None:
    """Trials, states, best parameters, importances, and the expected best value per budget."""
    from ablate.session import StudySession

    show_study(StudySession.open(name, stores_of(storage, None)))


def show_study(session: StudySession) -> SearchSummary:
    """Print a study's trials, best trial, importances and expected best value; returns what it printed."""
    from ablate import render

    summary = session.summary()
    for line in render.summary_lines(session.name, summary):
        console.print(line)
    return summary


@studies_app.command("export")
def studies_export(
    name: Annotated[str, typer.Argument(metavar="STUDY", help="Study name (or spec name: its newest study).")],
    format: Annotated[str, typer.Option("--format", help="csv or json.")] = "csv",
    output: Annotated[Path | None, typer.Option("--output", "-o", help="File \\[default: stdout].")] = None,
    storage: StorageOpt = None,
) -> None:
    """Export every trial (state, parameters, value, user attributes) as CSV or JSON."""
    from ablate import render
    from ablate.session import StudySession

    if format not in ("csv", "json"):
        raise AblateError(f"--format {format!r}: use csv or json")
    session = StudySession.open(name, stores_of(storage, None))
    text = render.export(session.study, format)
    if output is None:
        sys.stdout.write(text)
    else:
        output.write_text(text)
        console.print(f"wrote {output}")
