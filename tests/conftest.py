"""Fixtures shared by the test files: a working directory, an MLflow store, a PostgreSQL database."""

from __future__ import annotations

import shutil
import subprocess
from collections.abc import Iterator
from concurrent.futures import Future, ThreadPoolExecutor
from pathlib import Path
from typing import Any

import pytest
from support import TINY

from ablate.training.data import synthetic_pairs

ROOT = Path(__file__).resolve().parent.parent
BACKGROUND = pytest.StashKey[dict[str, "Future[subprocess.CompletedProcess[str]]"]]()


_LIVE: set[subprocess.Popen[str]] = set()


def _run_command(argv: list[str]) -> subprocess.CompletedProcess[str]:
    with subprocess.Popen(argv, cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True) as proc:
        _LIVE.add(proc)
        try:
            out, err = proc.communicate(timeout=1800)
        finally:
            _LIVE.discard(proc)
    return subprocess.CompletedProcess(argv, proc.returncode, out, err)


def pytest_collection_finish(session: pytest.Session) -> None:
    """Start the commands of the tests marked ``background`` (single-process checks that take half a minute:
    mypy, a 50,000-squared metric) as soon as the run is known to include them, one after another, so
    they use the second core while the other tests run; each test then reads its command's result."""
    jobs = [(item.nodeid, marker.args[0]) for item in session.items
            if (marker := item.get_closest_marker("background")) is not None]
    if jobs:
        pool = ThreadPoolExecutor(max_workers=1, thread_name_prefix="background-test")
        session.config.stash[BACKGROUND] = {nodeid: pool.submit(_run_command, argv) for nodeid, argv in jobs}
        pool.shutdown(wait=False)


def pytest_sessionfinish(session: pytest.Session) -> None:
    """A run that ends early (Ctrl-C, -x) does not wait for background commands nobody will read."""
    for future in session.config.stash.get(BACKGROUND, {}).values():
        future.cancel()
    for proc in list(_LIVE):
        proc.kill()


@pytest.fixture
def background_result(request: pytest.FixtureRequest) -> subprocess.CompletedProcess[str]:
    """The finished command of this test's ``background`` marker (run now if it was not started)."""
    marker = request.node.get_closest_marker("background")
    assert marker is not None, "background_result needs @pytest.mark.background(argv)"
    future = request.config.stash.get(BACKGROUND, {}).get(request.node.nodeid)
    return future.result() if future is not None else _run_command(marker.args[0])


@pytest.fixture(scope="session")
def mlflow_template(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """An empty MLflow store, made once: creating one (its schema migrations) takes seconds."""
    from ablate.tracking.client import Tracker

    path = tmp_path_factory.mktemp("mlflow-template") / "mlflow.db"
    Tracker(f"sqlite:///{path}")
    return path


@pytest.fixture
def workdir(tmp_path: Path, monkeypatch: pytest.MonkeyPatch, request: pytest.FixtureRequest) -> Path:
    """A working directory with the tiny data in pairs.npz and an empty MLflow store (a copy of one made
    once per session); the stores default to files in it. Tests marked ``bare`` get no store."""
    monkeypatch.chdir(tmp_path)
    for var in ("MLFLOW_TRACKING_URI", "ABLATE_STORAGE"):
        monkeypatch.delenv(var, raising=False)
    synthetic_pairs(TINY).save(tmp_path / "pairs.npz")
    if request.node.get_closest_marker("bare") is None:
        shutil.copy(request.getfixturevalue("mlflow_template"), tmp_path / "mlflow.db")
    return tmp_path


@pytest.fixture(scope="session")
def mlflow_server_url(tmp_path_factory: pytest.TempPathFactory, mlflow_template: Path) -> Iterator[str]:
    """One MLflow tracking server for the session (starting one takes seconds); tests use their own experiments."""
    from support import mlflow_server

    folder = tmp_path_factory.mktemp("mlflow-server")
    shutil.copy(mlflow_template, folder / "server.db")
    with mlflow_server(folder) as url:
        yield url


@pytest.fixture(scope="session")
def mlflow_uri(tmp_path_factory: pytest.TempPathFactory) -> str:
    """One MLflow store for the whole session (creating one costs seconds); tests use own experiments."""
    return f"sqlite:///{tmp_path_factory.mktemp('mlflow') / 'mlflow.db'}"


PG_ADMIN_URL = "postgresql://postgres@127.0.0.1:5432/postgres"


@pytest.fixture
def postgres_url() -> Any:
    """A scratch PostgreSQL database for one test (ABLATE_TEST_POSTGRES names the server's admin URL)."""
    import os
    import uuid

    import sqlalchemy

    admin = os.environ.get("ABLATE_TEST_POSTGRES", PG_ADMIN_URL)
    try:
        engine = sqlalchemy.create_engine(admin, isolation_level="AUTOCOMMIT", connect_args={"connect_timeout": 5})
        conn = engine.connect()
    except (ImportError, sqlalchemy.exc.OperationalError) as e:
        pytest.skip(f"PostgreSQL not reachable at {admin}: {str(e).strip().splitlines()[0]}")
    name = f"ablate_test_{uuid.uuid4().hex[:10]}"
    conn.execute(sqlalchemy.text(f'CREATE DATABASE "{name}"'))
    base = admin.rsplit("/", 1)[0]
    try:
        yield f"{base}/{name}"
    finally:
        conn.execute(sqlalchemy.text(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)'))
        conn.close()
        engine.dispose()
