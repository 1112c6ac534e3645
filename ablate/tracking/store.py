"""The MLflow store before MLflow is imported: its URL, reachability and permissions checked at once, and a new
SQLite store created whole (migrated in a temporary file, then renamed into place) or not at all."""

from __future__ import annotations

import json
import os
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

from ablate.errors import AblateError
from ablate.stores import in_memory, mask_url, split_credentials, sqlite_file


@contextmanager
def first_use_lock(uri: str) -> Iterator[None]:
    """Serialise opening a SQLite MLflow store between processes: the first one creates its schema.

    Two processes that open a new store at once would both run MLflow's migrations and one of them
    fail ('table ... already exists'); an exclusive lock on a file beside the database prevents that.
    """
    db = sqlite_file(uri)
    if db is None:
        yield
        return
    import fcntl

    db.parent.mkdir(parents=True, exist_ok=True)
    with open(db.with_name(db.name + ".lock"), "a") as handle:
        fcntl.flock(handle, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(handle, fcntl.LOCK_UN)


def create_whole(uri: str) -> None:
    """A new SQLite store appears whole or not at all: MLflow's schema is migrated in a file beside it, which is then
    renamed into place (Ctrl-C or kill -9 during a first migration left a store every later command refused). A
    store left half-created by an older version is explained in one line with the command that clears it."""
    db = sqlite_file(uri)
    if db is None:
        return
    if db.exists():
        _refuse_half_created(db, uri)
        return
    from mlflow import MlflowClient

    creating = db.with_name(f".{db.name}.{os.getpid()}-{time.monotonic_ns()}.creating")  # never a name reused
    try:
        store = MlflowClient(tracking_uri=f"sqlite:///{creating}")._tracking_client.store  # migrates the schema
        engine = getattr(store, "engine", None)
        if engine is not None:
            engine.dispose()  # closed before it moves
        os.replace(creating, db)
    finally:
        creating.unlink(missing_ok=True)


def _refuse_half_created(db: Path, uri: str) -> None:
    import sqlite3
    from urllib.parse import quote

    try:
        con = sqlite3.connect(f"file:{quote(str(db))}?mode=ro", uri=True, timeout=0.5)
        try:
            names = {row[0] for row in con.execute("SELECT name FROM sqlite_master WHERE type = 'table'")}
            runs = con.execute("SELECT COUNT(*) FROM runs").fetchone()[0] if "runs" in names else 0
        finally:
            con.close()
    except sqlite3.Error:
        return  # MLflow says what is wrong with it
    if any(name.startswith("_alembic_tmp_") for name in names):
        fix = f"remove it (rm {db}) and run the command again" if runs == 0 else \
            f"run `mlflow db upgrade {uri}` to finish it"
        raise AblateError(f"the MLflow store {mask_url(uri)} was left half-created (a command was stopped during "
                          f"its schema migration) and holds {runs} run(s); {fix}")


DATABASE_SCHEMES = ("sqlite", "postgresql", "mysql", "mssql")
"""URI schemes of MLflow's SQL store (MLflow retries a failed connection for about 100 s)."""

CONNECT_TIMEOUT = 5.0
"""Seconds a store check waits for a database or a tracking server before it gives up."""

API_PROBE = "/api/2.0/mlflow/experiments/search?max_results=1"
"""The MLflow REST call that tells a tracking server from any other web server."""


def check_uri(uri: str) -> str:
    """The scheme of a tracking URI ('' for a folder) that ablate can log to and keep, else one AblateError; looks
    at the URI only (no connection, no import), so a mistake answers at once."""
    scheme = uri.partition("://")[0].split("+")[0].lower() if "://" in uri else ""
    local = not scheme and ("/" in uri or uri.startswith("."))  # a folder: MLflow's file store
    if (scheme not in ("http", "https", "file", *DATABASE_SCHEMES) and not local) or in_memory(uri):
        raise AblateError(
            f"tracking URI {mask_url(uri)}: not a store ablate can log to and keep; give a SQLite file "
            "(sqlite:///mlflow.db), a database (postgresql://user@host/db), an MLflow tracking server "
            "(http://host:5000) or a folder (file:///path/to/mlruns)")
    return scheme


def check_store(uri: str, timeout: float = CONNECT_TIMEOUT, *, writable: bool = True) -> str:
    """Check that an MLflow store answers (and takes writes), within seconds; returns the URI MLflow is given.

    A tracking server's ``user:password@`` moves into MLFLOW_TRACKING_USERNAME / MLFLOW_TRACKING_PASSWORD
    (of this process and the processes it starts): MLflow reads credentials from there, not from the URL.
    Every failure is one AblateError with the password masked.
    """
    scheme = check_uri(uri)
    if scheme in ("http", "https"):
        bare, user, password = split_credentials(uri)
        if user is not None:
            os.environ["MLFLOW_TRACKING_USERNAME"] = user
        if password is not None:
            os.environ["MLFLOW_TRACKING_PASSWORD"] = password
        _check_server(bare, mask_url(uri), timeout)
        return bare
    if scheme == "sqlite":
        _check_sqlite(uri, timeout, writable)
    elif scheme in DATABASE_SCHEMES:
        _check_database(uri, timeout, writable)
    return uri


def _check_server(uri: str, shown: str, timeout: float) -> None:
    """Fail fast on a tracking server that is unreachable, refuses us, or is no MLflow server."""
    import base64
    import ssl
    import urllib.request

    request = urllib.request.Request(uri.rstrip("/") + API_PROBE, headers={"Accept": "application/json"})
    user, password = os.environ.get("MLFLOW_TRACKING_USERNAME"), os.environ.get("MLFLOW_TRACKING_PASSWORD")
    token = os.environ.get("MLFLOW_TRACKING_TOKEN")
    if user and password:
        pair = base64.b64encode(f"{user}:{password}".encode()).decode()
        request.add_header("Authorization", f"Basic {pair}")
    elif token:
        request.add_header("Authorization", f"Bearer {token}")
    context = None
    if uri.startswith("https://"):
        if os.environ.get("MLFLOW_TRACKING_INSECURE_TLS", "").lower() in ("true", "1"):
            context = ssl._create_unverified_context()
        else:
            context = ssl.create_default_context(cafile=os.environ.get("MLFLOW_TRACKING_SERVER_CERT_PATH"))
    fix = "check the URL: it is the address `mlflow server` prints, e.g. http://host:5000"
    try:
        with urllib.request.urlopen(request, timeout=timeout, context=context) as response:
            body = response.read(1 << 20)
    except urllib.error.HTTPError as e:
        if e.code in (401, 403):
            raise AblateError(
                f"the MLflow tracking server {shown} refused access (HTTP {e.code}); give user:password@ in "
                "the URL or set MLFLOW_TRACKING_USERNAME and MLFLOW_TRACKING_PASSWORD (or MLFLOW_TRACKING_TOKEN)"
            ) from None
        if e.code < 500:
            raise AblateError(
                f"{shown} answers HTTP but is not an MLflow tracking server (HTTP {e.code} on "
                f"{API_PROBE.partition('?')[0]}); {fix}") from None
        said = _server_message(e)
        raise AblateError(
            f"the MLflow tracking server {shown} fails (HTTP {e.code} on {API_PROBE.partition('?')[0]}"
            f"{': ' + said if said else ''}); see the server's log") from None
    except (OSError, ValueError) as e:
        why = str(getattr(e, "reason", e))
    else:
        try:
            answer = json.loads(body)
        except ValueError:
            answer = None
        if isinstance(answer, dict):
            return
        raise AblateError(f"{shown} answers HTTP but is not an MLflow tracking server (no JSON from "
                          f"{API_PROBE.partition('?')[0]}); {fix}")
    raise AblateError(
        f"cannot reach the MLflow tracking server {shown} ({mask_url(why)}); "
        "check the URL and that `mlflow server` is running there"
    )


def _server_message(error: Any) -> str:
    """The ``message`` of an MLflow error response, masked and on one line ('' when there is none)."""
    try:
        message = json.loads(error.read(1 << 16)).get("message", "")
    except Exception:
        return ""
    return first_line(mask_url(str(message)))[:200] if message else ""


def _check_sqlite(uri: str, timeout: float, writable: bool) -> None:
    """A SQLite store's folder must take new files and its database, if there is one, writes (or reads)."""
    import sqlite3
    import tempfile
    from urllib.parse import quote

    path = uri.partition(":///")[2].split("?", 1)[0]
    if not path or path == ":memory:":
        return
    db = Path(path)
    where = f"the MLflow store {uri}"
    if db.exists() and not writable:
        try:
            con = sqlite3.connect(f"file:{quote(str(db))}?mode=ro", uri=True, timeout=min(timeout, 0.5))
            try:
                con.execute("PRAGMA schema_version")
            finally:
                con.close()
        except sqlite3.Error as e:
            raise AblateError(f"{where}: cannot read {db} ({e}); point --tracking-uri at an MLflow SQLite "
                              "database") from None
        return
    try:
        db.parent.mkdir(parents=True, exist_ok=True)
        with tempfile.NamedTemporaryFile(dir=db.parent, prefix=".ablate-write-check-"):
            pass
    except OSError as e:
        raise AblateError(f"{where}: cannot write in its folder {db.parent} ({e.strerror or e}); "
                          "choose a writable place with --tracking-uri sqlite:///PATH/mlflow.db") from None
    if not db.exists():
        return
    try:
        # A short busy timeout: a store another process is writing to is a writable store.
        con = sqlite3.connect(f"file:{quote(str(db))}?mode=rw", uri=True, timeout=min(timeout, 0.5))
        try:
            con.execute("BEGIN IMMEDIATE")
            con.execute("ROLLBACK")
        finally:
            con.close()
    except sqlite3.Error as e:
        if "locked" in str(e):  # another process is writing: the store works
            return
        fix = ("make the file writable or choose another --tracking-uri" if "readonly" in str(e) else
               "point --tracking-uri at an MLflow SQLite database, or at a new file")
        raise AblateError(f"{where}: cannot write to {db} ({e}); {fix}") from None


def _check_database(uri: str, timeout: float, writable: bool) -> None:
    """A database server must accept a connection within ``timeout`` seconds (and, PostgreSQL, writes)."""
    import sqlalchemy

    scheme = uri.partition("://")[0].split("+")[0].lower()
    connect_args: dict[str, Any] = {}
    if scheme in ("postgresql", "mysql"):
        connect_args["connect_timeout"] = max(1, int(timeout))
    shown = mask_url(uri)
    try:
        engine = sqlalchemy.create_engine(uri, connect_args=connect_args, poolclass=sqlalchemy.pool.NullPool)
    except ImportError as e:
        raise AblateError(f"the MLflow store {shown} needs a database driver: {e}; install it "
                          "(for PostgreSQL: pip install 'ablate[postgres]')") from None
    except Exception as e:
        raise AblateError(f"the MLflow store {shown} is not a database URL SQLAlchemy reads "
                          f"({first_line(mask_url(str(e)))})") from None
    try:
        with engine.connect() as con:
            read_only = writable and scheme == "postgresql" and \
                con.execute(sqlalchemy.text("SHOW transaction_read_only")).scalar() == "on"
            if read_only:
                raise AblateError(f"the MLflow store {shown} is read-only (transaction_read_only = on); "
                                  "connect to the primary server or as a user that may write")
    except AblateError:
        raise
    except Exception as e:
        raise AblateError(f"cannot reach the MLflow store {shown}: {first_line(mask_url(str(e)))}; check the host, "
                          "port, database name and password, and that the server is running") from None
    finally:
        engine.dispose()


def first_line(text: str) -> str:
    text = text.strip()
    return text.splitlines()[0] if text else "(no message)"
