"""`ablate studies list | show | export`: what the stores hold, without training."""

from __future__ import annotations

import sys
import time
from pathlib import Path
from typing import TYPE_CHECKING, Annotated

import typer
from rich import box
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
    from ablate.report.compare import SearchSummary
    from ablate.study.session import StudySession


# --------------------------------------------------------------------------------------
# studies list | show | export
# --------------------------------------------------------------------------------------


@studies_app.command("list")
def studies_list(storage: StorageOpt = None) -> None:
    """Studies in the storage, oldest first."""
    from ablate.study import studies

    url = stores.resolve_storage(storage)
    if not stores.storage_exists(url):  # nothing to list, and nothing is created
        console.print(f"no studies in {stores.mask_url(url)}: no Optuna storage there yet")
        return
    rows = studies.list_studies(studies.open_storage(storage))
    table = Table(title=f"studies in {stores.mask_url(stores.resolve_storage(storage))}", title_justify="left",
                  box=box.SIMPLE_HEAD, show_edge=False, padding=(0, 1), pad_edge=False)
    table.add_column("study (spec-hash)", overflow="fold")  # never cut: it is what the other commands take
    for col in ("kind", "finished", "failed", "created"):
        table.add_column(col, justify="right" if col in ("finished", "failed") else "left", no_wrap=True)
    for r in rows:
        created = time.strftime("%Y-%m-%d %H:%M", time.localtime(r["created"])) if r["created"] else ""
        table.add_row(r["name"], r["kind"], f"{r['finished']}/{r['owed']}", str(r["failed"]), created)
    console.print(table)


SHOWN_TRIALS = 50
"""How many trials `studies show` lists (the newest) unless asked for all."""


@studies_app.command("show")
def studies_show(
    name: Annotated[str, typer.Argument(metavar="STUDY", help="Study name (or spec name: its newest study).")],
    storage: StorageOpt = None,
    every: Annotated[bool, typer.Option("--all", help=f"List every trial, not the newest {SHOWN_TRIALS}.")] = False,
) -> None:
    """A study's trials (the newest few) and why any stopped early, the best trial, importances, the expected best per
    budget."""
    from ablate.study.session import StudySession

    show_study(StudySession.open(name, stores_of(storage, None), reading=True), every)


def show_study(session: StudySession, every: bool = False) -> SearchSummary:
    """Print a study's trials (the newest ``SHOWN_TRIALS``, or ``every`` one), best trial, importances and
    expected best value; returns what it printed."""
    from ablate.report import render

    summary = session.summary()
    limit = None if every else SHOWN_TRIALS
    if console.is_terminal:  # fits the terminal: lines word-wrap, the table is made for 80 columns
        for item in render.summary_lines(session.name, summary, limit):
            console.print(item, soft_wrap=False)
    else:  # a log: nothing is cut or wrapped
        console.print(render.summary_markdown(session.name, summary, limit), highlight=False)
    return summary


@studies_app.command("export")
def studies_export(
    name: Annotated[str, typer.Argument(metavar="STUDY", help="Study name (or spec name: its newest study).")],
    format: Annotated[str, typer.Option("--format", metavar="FORMAT", help="csv or json.")] = "csv",
    output: Annotated[Path | None, typer.Option("--output", "-o", metavar="FILE",
                                                   help="File \\[default: stdout].")] = None,
    storage: StorageOpt = None,
) -> None:
    """Export every trial (state, parameters, value, user attributes) as CSV or JSON."""
    from ablate.study import records, studyfiles
    from ablate.study.session import StudySession

    if format not in ("csv", "json"):
        raise AblateError(f"--format {format!r}: use csv or json")
    if output is not None:  # checked before the study is read
        if output.is_dir():
            raise AblateError(f"--output {output}: that is a folder; give a file name, e.g. {output / 'trials.csv'}")
        studyfiles.writable_folder(output.parent, f"--output {output}", create=False)
    session = StudySession.open(name, stores_of(storage, None), reading=True)
    text = records.export(session.study, format)
    if output is None:
        sys.stdout.write(text)
        return
    try:
        output.write_text(text)
    except OSError as e:
        raise AblateError(f"--output {output}: cannot write it ({e.strerror or e})") from None
    console.print(f"wrote {output}")
