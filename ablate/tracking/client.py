"""MLflow through MlflowClient with explicit run ids (never the fluent, global active-run state).

NaN or inf never reaches MLflow: non-finite values are left out of the batch and named in a
``diverged`` tag instead. Metrics are sent in one batched call per epoch; when epochs are shorter
than ``flush_seconds`` consecutive epochs share a call, so logging stays a small fraction of
training time on tiny models. Everything buffered is sent before a run ends, however it ends.

In a SQLite or PostgreSQL store the metric rows go into MLflow's own tables in one multi-row
INSERT (its SQLAlchemy models, inside its managed session), with the run's latest values upserted
as MLflow keeps them: the same rows ``log_batch`` writes, at a tenth of the cost per row, because
MLflow's ORM path builds and flushes one object per value. Anything unusual (a run not active, a row
already stored, another store) goes through ``log_batch``.
"""

from __future__ import annotations

import json
import logging
import math
import os
import subprocess
import time
from collections.abc import Iterator, Mapping, Sequence
from concurrent.futures import Future, ThreadPoolExecutor
from contextlib import contextmanager, suppress
from pathlib import Path
from typing import Any

from ablate.errors import AblateError
from ablate.stores import in_memory, mask_url, resolve_tracking_uri, split_credentials

# MLflow's telemetry thread edits os.environ while requests reads it, which fails calls at random
# on machines without internet access; a run's tracking needs no telemetry.
os.environ.setdefault("MLFLOW_DISABLE_TELEMETRY", "true")
# a progress bar per artifact download (a checkpoint to resume from) is noise in a terminal and a log
os.environ.setdefault("MLFLOW_ENABLE_ARTIFACTS_PROGRESS_BAR", "false")

PARAM_VALUE_LIMIT = 6000
GROUPED_VIEW = "ablate-by-experiment"
"""The key of the shared MLflow UI view of a suite's runs grouped by experiment."""
_GROUPED_VIEW_TAG = f"mlflow.sharedViewState.{GROUPED_VIEW}"
_LOGGED_ARTIFACTS = "mlflow.loggedArtifacts"
"""The run tag through which the MLflow UI finds table artifacts."""
BATCH_LIMIT = 1000
MODEL = "model"
"""The artifact path of a run's model (its weights at the validation-selected epoch)."""
SPLIT_FILE = "split.json"
"""The artifact with the row indices of a run's train, validation and test pairs."""


def _quiet_mlflow() -> None:
    for name in ("mlflow", "alembic", "mlflow.store.db.utils"):
        logging.getLogger(name).setLevel(logging.WARNING)
    # its warning that pickled models run code when loaded, on every model logged (see Tracker.log_model)
    logging.getLogger("mlflow.pytorch").setLevel(logging.ERROR)


class Tracker:
    """One MLflow store: experiments, runs, params, tags, metrics and artifacts by run id."""

    def __init__(self, uri: str | None = None, *, writable: bool = True):
        """Open the store after ``check_store`` (``writable=False``: a store only read, e.g. by ``ablate ui``)."""
        given = resolve_tracking_uri(uri)
        self._shown = mask_url(given)
        self.uri = check_store(given, writable=writable)  # before MLflow is imported: a mistake answers at once
        from mlflow import MlflowClient

        _quiet_mlflow()
        try:
            with _first_use_lock(self.uri):
                _create_whole(self.uri)
                self.client = MlflowClient(tracking_uri=self.uri)
                self._sql = _sql_store(self.client)
        except AblateError:
            raise
        except Exception as e:
            raise AblateError(
                f"cannot open the MLflow store {self._shown}: {_first_line(mask_url(str(e)))}"
            ) from None

    @property
    def shown_uri(self) -> str:
        """The tracking URI as given, with any password masked."""
        return self._shown

    def experiment_id(self, name: str) -> str:
        """The id of an experiment, created on first use (tolerating a concurrent creator)."""
        from mlflow.exceptions import MlflowException

        try:
            exp = self.client.get_experiment_by_name(name)
            if exp is not None:
                return str(exp.experiment_id)
            return str(self.client.create_experiment(name))
        except MlflowException as e:
            exp = self.client.get_experiment_by_name(name)
            if exp is not None:
                return str(exp.experiment_id)
            raise AblateError(
                f"MLflow store {self.shown_uri}: cannot create experiment {name!r}: "
                f"{_first_line(mask_url(str(e)))}"
            ) from None
        except Exception as e:
            raise AblateError(
                f"cannot reach the MLflow store {self.shown_uri}: {mask_url(str(e)).splitlines()[0]}"
            ) from None

    def experiments(self) -> list[tuple[str, str, bool]]:
        """(name, id, whether it has the grouped view) of every experiment in the store."""
        return [(e.name, str(e.experiment_id), _GROUPED_VIEW_TAG in e.tags) for e in self.client.search_experiments()]

    def share_grouped_view(self, experiment_id: str) -> None:
        """Keep in the experiment the MLflow UI view that groups its runs by the ``ablate.experiment`` tag (each
        experiment one line, the mean over seeds, with its band); ``grouped_url`` opens it."""
        exp = self.client.get_experiment(experiment_id)
        if _GROUPED_VIEW_TAG not in exp.tags:
            self.client.set_experiment_tag(experiment_id, _GROUPED_VIEW_TAG, json.dumps({"groupBy": {
                "aggregateFunction": "average", "groupByKeys": [{"mode": "tag", "groupByData": "ablate.experiment"}]}}))

    def start_run(
        self,
        experiment_id: str,
        name: str,
        tags: Mapping[str, Any] | None = None,
        parent_run_id: str | None = None,
        start_ms: int | None = None,
    ) -> str:
        """Create a RUNNING run (a child when a parent is given) and return its id. ``start_ms`` (ms since
        the epoch, default now) can only be given here: MLflow has no call that changes a run's start."""
        all_tags = {k: str(v) for k, v in (tags or {}).items()}
        if parent_run_id:
            all_tags["mlflow.parentRunId"] = parent_run_id
        run = self.client.create_run(experiment_id, start_time=start_ms, run_name=name, tags=all_tags)
        return str(run.info.run_id)

    def log_params(self, run_id: str, params: Mapping[str, Any]) -> None:
        """Log parameters in batches; values are stringified and masked."""
        from mlflow.entities import Param

        items = [
            Param(k, mask_url(_param_text(v))[:PARAM_VALUE_LIMIT]) for k, v in params.items()
        ]
        for i in range(0, len(items), 100):
            self.client.log_batch(run_id, params=items[i : i + 100])

    def set_tags(self, run_id: str, tags: Mapping[str, Any]) -> None:
        """Set tags (values stringified and masked)."""
        from mlflow.entities import RunTag

        items = [RunTag(k, mask_url(str(v))[:PARAM_VALUE_LIMIT]) for k, v in tags.items()]
        if items:
            self.client.log_batch(run_id, tags=items)

    def log_metrics(self, run_id: str, metrics: Mapping[str, float], step: int = 0) -> list[str]:
        """Log finite metrics at one step in one call; returns the keys left out as non-finite."""
        batch = MetricBatch(self, run_id, flush_seconds=0.0)
        skipped = batch.add(metrics, step)
        batch.flush()
        return skipped

    def write_metrics(self, run_id: str, metrics: Sequence[Any]) -> None:
        """Store metric rows (``mlflow.entities.Metric``) of one run: straight into a SQL store's tables, else by
        ``log_batch``."""
        if self._sql is not None:
            import sqlalchemy as sa

            try:
                if _insert_metrics(self._sql, run_id, metrics):
                    return
            except Exception as e:  # MLflow's own path decides; one that will fail again (a changed schema) ends ours
                if not isinstance(e.__cause__ or e, sa.exc.OperationalError) or "no such" in str(e):
                    self._sql = None
        for i in range(0, len(metrics), BATCH_LIMIT):
            self.client.log_batch(run_id, metrics=list(metrics[i : i + BATCH_LIMIT]))

    def log_dict(self, run_id: str, obj: Any, artifact_file: str) -> None:
        """Store a JSON artifact."""
        self.client.log_dict(run_id, obj, artifact_file)

    def log_table(self, run_id: str, columns: Mapping[str, Sequence[Any]], artifact_file: str) -> None:
        """Store a table artifact the MLflow UI shows as a table, replacing any earlier one of that name
        (``MlflowClient.log_table`` appends to it instead)."""
        names = list(columns)
        rows = [list(r) for r in zip(*(columns[n] for n in names), strict=True)]
        self.client.log_dict(run_id, {"columns": names, "data": rows}, artifact_file)  # pandas' "split" layout
        logged = json.loads(self.client.get_run(run_id).data.tags.get(_LOGGED_ARTIFACTS, "[]"))
        entry = {"path": artifact_file, "type": "table"}
        if entry not in logged:
            self.client.set_tag(run_id, _LOGGED_ARTIFACTS, json.dumps([*logged, entry]))

    def log_artifact(self, run_id: str, path: str | Path, artifact_path: str | None = None) -> None:
        """Store a file as an artifact."""
        self.client.log_artifact(run_id, str(path), artifact_path)

    def log_model(self, run_id: str, model: Any, name: str = MODEL) -> str:
        """Store a torch model as the run's MLflow model ``name`` (an MLflow 3 logged model whose source is the run) and
        return its id: ``mlflow.pytorch.load_model(f"runs:/{run_id}/model")`` loads it back as the same class.

        Made through the client with explicit ids (``create_logged_model``, ``log_model_artifacts``,
        ``finalize_logged_model``: what ``mlflow.pytorch.log_model`` does through the global active run). Saved
        pickled (``serialization_format="pickle"``), not as a ``torch.export`` graph: exporting costs seconds per
        worker process on the first model, fixes the batch size unless shapes are declared dynamic, and refuses
        some user models; pickling is instant and keeps the model's own class, which loads wherever ``ablate``
        (and a user's model factory) is importable. Load only models from stores you trust: unpickling runs code.
        """
        import tempfile

        import mlflow.pytorch
        import torch
        from mlflow.entities import LoggedModelStatus

        experiment_id = self.client.get_run(run_id).info.experiment_id
        logged = self.client.create_logged_model(experiment_id=experiment_id, name=name, source_run_id=run_id)
        try:
            with tempfile.TemporaryDirectory(prefix="ablate-model-") as tmp:
                folder = Path(tmp) / name
                mlflow.pytorch.save_model(model, str(folder), serialization_format="pickle",
                                          pip_requirements=[f"torch=={torch.__version__.split('+')[0]}"])
                self.client.log_model_artifacts(logged.model_id, str(folder))
        except BaseException:
            with suppress(Exception):
                self.client.finalize_logged_model(logged.model_id, LoggedModelStatus.FAILED)
            raise
        self.client.finalize_logged_model(logged.model_id, LoggedModelStatus.READY)
        return str(logged.model_id)

    def end_run(self, run_id: str, status: str = "FINISHED", end_ms: int | None = None) -> None:
        """Set a run's final status (FINISHED, FAILED or KILLED) and its end: ``end_ms`` (ms since the epoch) or now."""
        self.client.set_terminated(run_id, status=status, end_time=end_ms)

    def set_status(self, run_id: str, status: str) -> None:
        """Set a run's status without ending it (RUNNING when a suite resumes)."""
        self.client.update_run(run_id, status=status)

    @contextmanager
    def run_status(self, run_id: str) -> Iterator[None]:
        """End the run FINISHED, FAILED on an exception, KILLED on Ctrl-C or SIGTERM."""
        try:
            yield
        except KeyboardInterrupt:
            self.end_run(run_id, "KILLED")
            raise
        except BaseException:
            self.end_run(run_id, "FAILED")
            raise
        self.end_run(run_id, "FINISHED")


@contextmanager
def _first_use_lock(uri: str) -> Iterator[None]:
    """Serialise opening a SQLite MLflow store between processes: the first one creates its schema.

    Two processes that open a new store at once would both run MLflow's migrations and one of them
    fail ('table ... already exists'); an exclusive lock on a file beside the database prevents that.
    """
    prefix = "sqlite:///"
    if not uri.startswith(prefix) or uri.endswith(":memory:"):
        yield
        return
    import fcntl

    db = Path(uri[len(prefix):].split("?", 1)[0])
    db.parent.mkdir(parents=True, exist_ok=True)
    with open(db.with_name(db.name + ".lock"), "a") as handle:
        fcntl.flock(handle, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(handle, fcntl.LOCK_UN)


def _create_whole(uri: str) -> None:
    """A new SQLite store appears whole or not at all: MLflow's schema is migrated in a file beside it, which is then
    renamed into place (Ctrl-C or kill -9 during a first migration left a store every later command refused). A
    store left half-created by an older version is explained in one line with the command that clears it."""
    prefix = "sqlite:///"
    if not uri.startswith(prefix) or in_memory(uri):
        return
    db = Path(uri[len(prefix):].split("?", 1)[0])
    if db.exists():
        _refuse_half_created(db, uri)
        return
    from mlflow import MlflowClient

    creating = db.with_name(f".{db.name}.{os.getpid()}-{time.monotonic_ns()}.creating")  # never a name reused
    try:
        store = MlflowClient(tracking_uri=f"{prefix}{creating}")._tracking_client.store  # migrates the schema
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
    import urllib.error
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
    return _first_line(mask_url(str(message)))[:200] if message else ""


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
                          f"({_first_line(mask_url(str(e)))})") from None
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
        raise AblateError(f"cannot reach the MLflow store {shown}: {_first_line(mask_url(str(e)))}; check the host, "
                          "port, database name and password, and that the server is running") from None
    finally:
        engine.dispose()


def _first_line(text: str) -> str:
    text = text.strip()
    return text.splitlines()[0] if text else "(no message)"


class MetricBatch:
    """Per-epoch metrics for one run, sent in batches at most every ``flush_seconds``.

    With ``background=True`` a batch is written by one background thread while training goes
    on (in order; ``close`` waits for all of them and raises the first error); the runs of an
    array share one such thread by passing it as ``background``.
    """

    def __init__(self, tracker: Tracker, run_id: str, flush_seconds: float = 2.0,
                 background: bool | ThreadPoolExecutor = False):
        self.tracker = tracker
        self.run_id = run_id
        self.flush_seconds = flush_seconds
        self._pending: list[Any] = []
        self._last = time.monotonic()
        self.nonfinite: dict[str, int] = {}
        self._own = background is True
        self._writer = (background if isinstance(background, ThreadPoolExecutor) else
                        ThreadPoolExecutor(max_workers=1, thread_name_prefix="mlflow-metrics") if background else None)
        self._sent: list[Future[None]] = []

    def add(self, metrics: Mapping[str, float], step: int) -> list[str]:
        """Queue one step's finite metrics; returns the non-finite keys (never sent)."""
        from mlflow.entities import Metric

        now = int(time.time() * 1000)
        skipped = []
        for key, value in metrics.items():
            v = float(value)
            if math.isfinite(v):
                self._pending.append(Metric(key, v, now, step))
            else:
                skipped.append(key)
                self.nonfinite.setdefault(key, step)
        if time.monotonic() - self._last >= self.flush_seconds:
            self.flush()
        return skipped

    def flush(self) -> None:
        """Send everything queued (in the background thread, if there is one)."""
        pending, self._pending = self._pending, []
        self._last = time.monotonic()
        if not pending:
            return
        if self._writer is None:
            self._send(pending)
        else:
            self._sent = [f for f in self._sent if not f.done() or f.exception() is not None]
            self._sent.append(self._writer.submit(self._send, pending))

    def _send(self, metrics: list[Any]) -> None:
        self.tracker.write_metrics(self.run_id, metrics)

    def close(self) -> None:
        """Send what is queued and wait until everything has been written."""
        self.flush()
        if self._writer is not None:
            try:
                for f in self._sent:
                    f.result()
            finally:
                if self._own:
                    self._writer.shutdown(wait=True)
                self._sent = []


_UPSERT_DIALECTS = ("sqlite", "postgresql")


def _sql_store(client: Any) -> Any | None:
    """MLflow's SQLAlchemy store behind a client when its database takes our upsert (SQLite, PostgreSQL), else None."""
    try:
        from mlflow.store.tracking.sqlalchemy_store import SqlAlchemyStore

        store = getattr(getattr(client, "_tracking_client", None), "store", None)
        if isinstance(store, SqlAlchemyStore) and store.engine.dialect.name in _UPSERT_DIALECTS:
            return store
    except Exception:  # an MLflow that keeps its store elsewhere: log_batch for every row
        pass
    return None


def _insert_metrics(store: Any, run_id: str, metrics: Sequence[Any]) -> bool:
    """Insert finite metric rows of an active run into MLflow's ``metrics`` table and keep ``latest_metrics``
    as MLflow does (a key's row is replaced by a strictly later (step, timestamp, value)); all or nothing.

    Returns False, having written nothing, where ``log_batch`` must decide: a non-finite value, a run
    that is not active or not there, or a row already stored (MLflow skips those).
    """
    import sqlalchemy as sa
    from mlflow.store.tracking.dbmodels.models import SqlLatestMetric, SqlMetric, SqlRun

    if not metrics or not all(math.isfinite(m.value) for m in metrics):
        return not metrics
    rows: list[dict[str, Any]] = []
    latest: dict[str, dict[str, Any]] = {}
    for m in metrics:
        row = {"key": m.key, "value": float(m.value), "timestamp": int(m.timestamp), "step": int(m.step),
               "is_nan": False, "run_uuid": run_id}
        rows.append(row)
        old = latest.get(m.key)
        if old is None or (row["step"], row["timestamp"], row["value"]) > (old["step"], old["timestamp"], old["value"]):
            latest[m.key] = row
    from sqlalchemy.dialects import postgresql, sqlite

    table = SqlLatestMetric.__table__
    dialect = sqlite if store.engine.dialect.name == "sqlite" else postgresql
    insert: Any = dialect.insert(table)
    new = insert.excluded
    upsert = insert.on_conflict_do_update(
        index_elements=[table.c.key, table.c.run_uuid],
        set_={"value": new.value, "timestamp": new.timestamp, "step": new.step, "is_nan": new.is_nan},
        where=sa.tuple_(new.step, new.timestamp, new.value) > sa.tuple_(table.c.step, table.c.timestamp, table.c.value),
    )
    try:
        with store.ManagedSessionMaker(read_only=False) as session:
            stage = session.execute(sa.select(SqlRun.lifecycle_stage).where(SqlRun.run_uuid == run_id)).scalar()
            if stage != "active":
                return False
            session.execute(sa.insert(SqlMetric.__table__), rows)
            session.execute(upsert, [latest[k] for k in sorted(latest)])  # one lock order for every writer
    except Exception as e:
        if isinstance(e.__cause__, sa.exc.IntegrityError) or isinstance(e, sa.exc.IntegrityError):
            return False  # rolled back; MLflow skips the rows it already has
        raise
    return True


def _param_text(v: Any) -> str:
    if isinstance(v, (list, tuple, dict)):
        return json.dumps(v)
    return str(v)


def git_commit(path: str | Path = ".") -> str | None:
    """The commit checked out at ``path``, when it is a git work tree."""
    try:
        out = subprocess.run(
            ["git", "-C", str(path), "rev-parse", "HEAD"],
            capture_output=True, text=True, timeout=5, check=False,
        )
    except (OSError, subprocess.SubprocessError):
        return None
    return out.stdout.strip() or None if out.returncode == 0 else None


def runs_url(base: str, experiment_id: str) -> str:
    """The MLflow UI page of an experiment's runs table (MLflow 3 opens its GenAI view otherwise)."""
    return f"{base}/#/experiments/{experiment_id}/runs?workflowType=machine_learning"


def grouped_url(base: str, experiment_id: str) -> str:
    """The MLflow UI's charts of a suite's runs grouped by experiment (the view ``share_grouped_view`` keeps)."""
    return f"{runs_url(base, experiment_id)}&viewStateShareKey={GROUPED_VIEW}&compareRunsMode=CHART"


def ui_hint(uri: str) -> str:
    """How to open the MLflow UI on this store."""
    if uri.startswith(("http://", "https://")):
        return f"open {mask_url(uri)} in a browser"
    same = uri == resolve_tracking_uri(None)
    return "run `ablate ui` and open the printed URL" + ("" if same else f" (with --tracking-uri {mask_url(uri)})")


def environment_tags() -> dict[str, str]:
    """Tags that say where a run ran: versions, host, git commit."""
    import platform

    import torch

    from ablate import __version__

    tags = {
        "ablate.version": __version__,
        "torch.version": torch.__version__,
        "host": platform.node(),
        "pid": str(os.getpid()),
    }
    commit = git_commit()
    if commit:
        tags["mlflow.source.git.commit"] = commit
    return tags
