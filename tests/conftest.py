"""Fixtures shared by the test files: a working directory, an MLflow store, a PostgreSQL database."""

from __future__ import annotations

import shutil
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest
from support import TINY

from ablate.data import synthetic_pairs

MYPY_TEST = "test_static.py::test_mypy_is_clean"
MYPY = pytest.StashKey[subprocess.Popen[str]]()


def _start_mypy() -> subprocess.Popen[str]:
    return subprocess.Popen([sys.executable, "-m", "mypy", "ablate"], cwd=Path(__file__).resolve().parent.parent,
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)


def pytest_collection_finish(session: pytest.Session) -> None:
    """Start mypy (half a minute, one process) in the background as soon as the run is known to include
    its test, so it checks the code on the second core while the other tests run."""
    if any(item.nodeid.endswith(MYPY_TEST) for item in session.items):
        session.config.stash[MYPY] = _start_mypy()


@pytest.fixture
def mypy_result(request: pytest.FixtureRequest) -> tuple[int, str]:
    """mypy's exit code and output on the package (started at collection, else now)."""
    proc = request.config.stash.get(MYPY, None) or _start_mypy()
    out, _ = proc.communicate(timeout=900)
    return proc.returncode, out


@pytest.fixture(scope="session")
def mlflow_template(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """An empty MLflow store, made once: creating one (its schema migrations) takes seconds."""
    from ablate.tracking import Tracker

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
