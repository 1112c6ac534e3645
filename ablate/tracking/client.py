"""MLflow through MlflowClient with explicit run ids (never the fluent, global active-run state).

NaN or inf never reaches MLflow: non-finite values are left out of the batch and named in a
``diverged`` tag instead. Metrics are sent in one batched call per epoch; when epochs are shorter
than ``flush_seconds`` consecutive epochs share a call, so logging stays a small fraction of
training time on tiny models. Everything buffered is sent before a run ends, however it ends.
The store is checked (``store``) before MLflow is imported; metric rows go through ``batches``.
"""

from __future__ import annotations

import json
import logging
import math
import os
import subprocess
import time
from collections.abc import Iterator, Mapping, Sequence
from contextlib import contextmanager, nullcontext, suppress
from pathlib import Path
from typing import Any

from ablate.errors import AblateError
from ablate.stores import mask_url, resolve_tracking_uri
from ablate.tracking.batches import MetricBatch, insert_metrics, sql_store
from ablate.tracking.store import check_store, create_whole, first_line, first_use_lock
from ablate.vocabulary import Tag

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
"""MLflow's limit on the entries of one ``log_batch`` request (of them at most 100 parameters and 100 tags)."""
_BATCH_PARAMS = 100
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
            with first_use_lock(self.uri) if writable else nullcontext():  # a store only read exists: no lock file
                if writable:
                    create_whole(self.uri)
                self.client = MlflowClient(tracking_uri=self.uri)
                self._sql = sql_store(self.client)
        except AblateError:
            raise
        except Exception as e:
            raise AblateError(
                f"cannot open the MLflow store {self._shown}: {first_line(mask_url(str(e)))}"
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
                f"{first_line(mask_url(str(e)))}"
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
        state = json.dumps(_grouped_view_state())
        if exp.tags.get(_GROUPED_VIEW_TAG) != state:
            self.client.set_experiment_tag(experiment_id, _GROUPED_VIEW_TAG, state)

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
        self.log_batch(run_id, params=params)

    def set_tags(self, run_id: str, tags: Mapping[str, Any]) -> None:
        """Set tags (values stringified and masked)."""
        self.log_batch(run_id, tags=tags)

    def log_batch(self, run_id: str, *, params: Mapping[str, Any] | None = None, tags: Mapping[str, Any] | None = None,
                  metrics: Mapping[str, float] | None = None, step: int = 0) -> None:
        """Log parameters, tags and one step's finite metrics, in one request where MLflow's batch limits allow
        (parameter and tag values stringified and masked)."""
        from mlflow.entities import Metric, Param, RunTag

        now = int(time.time() * 1000)
        ps = [Param(k, mask_url(_param_text(v))[:PARAM_VALUE_LIMIT]) for k, v in (params or {}).items()]
        ts = [RunTag(str(k), mask_url(str(v))[:PARAM_VALUE_LIMIT]) for k, v in (tags or {}).items()]
        ms = [Metric(k, float(v), now, step) for k, v in (metrics or {}).items() if math.isfinite(float(v))]
        if len(ps) <= _BATCH_PARAMS and len(ts) <= _BATCH_PARAMS and len(ps) + len(ts) + len(ms) <= BATCH_LIMIT:
            if ps or ts or ms:
                self.client.log_batch(run_id, metrics=ms, params=ps, tags=ts)
            return
        for i in range(0, len(ps), _BATCH_PARAMS):
            self.client.log_batch(run_id, params=ps[i : i + _BATCH_PARAMS])
        for i in range(0, len(ts), _BATCH_PARAMS):
            self.client.log_batch(run_id, tags=ts[i : i + _BATCH_PARAMS])
        for i in range(0, len(ms), BATCH_LIMIT):
            self.client.log_batch(run_id, metrics=ms[i : i + BATCH_LIMIT])

    def log_metrics(self, run_id: str, metrics: Mapping[str, float], step: int = 0) -> list[str]:
        """Log finite metrics at one step in one call; returns the keys left out as non-finite."""
        batch = MetricBatch(self, run_id, flush_seconds=0.0)
        skipped = batch.add(metrics, step)
        batch.flush()
        return skipped

    def histories(self, run_ids: Sequence[str], keys: Sequence[str]) -> dict[tuple[str, str], list[float]]:
        """Each run's per-epoch values of each metric key (by step, as ``get_metric_history`` gives them; a pair
        with no values is left out): from a SQL store's table in a few queries, else one request per run and key,
        several at a time (a report of 1,000 runs would otherwise wait on thousands of round trips)."""
        out: dict[tuple[str, str], list[tuple[int, int, float]]] = {}
        if self._sql is not None:
            import sqlalchemy as sa
            from mlflow.store.tracking.dbmodels.models import SqlMetric

            with self._sql.ManagedSessionMaker(read_only=True) as session:
                for i in range(0, len(run_ids), 500):
                    rows = session.execute(sa.select(SqlMetric.run_uuid, SqlMetric.key, SqlMetric.step,
                                                     SqlMetric.timestamp, SqlMetric.value, SqlMetric.is_nan)
                                           .where(SqlMetric.run_uuid.in_(run_ids[i : i + 500]),
                                                  SqlMetric.key.in_(list(keys))))
                    for run, key, step, stamp, value, nan in rows:  # MLflow keeps a NaN as 0 with is_nan set
                        out.setdefault((run, key), []).append((int(step), int(stamp),
                                                               math.nan if nan else float(value)))
        else:
            from concurrent.futures import ThreadPoolExecutor

            pairs = [(r, k) for r in run_ids for k in keys]
            with ThreadPoolExecutor(max_workers=8, thread_name_prefix="mlflow-history") as pool:
                for (r, k), hist in zip(pairs, pool.map(lambda p: self.client.get_metric_history(*p), pairs),
                                        strict=True):
                    if hist:
                        out[(r, k)] = [(int(m.step), int(m.timestamp), float(m.value)) for m in hist]
        return {pair: [v for *_, v in sorted(rows)] for pair, rows in out.items()}

    def write_metrics(self, run_id: str, metrics: Sequence[Any]) -> None:
        """Store metric rows (``mlflow.entities.Metric``) of one run: straight into a SQL store's tables, else by
        ``log_batch``."""
        if self._sql is not None:
            import sqlalchemy as sa

            try:
                if insert_metrics(self._sql, run_id, metrics):
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

    def log_model(self, run_id: str, model: Any, name: str = MODEL, experiment_id: str | None = None) -> str:
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

        if experiment_id is None:
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
        Tag.VERSION: __version__,
        "torch.version": torch.__version__,
        "host": platform.node(),
        "pid": str(os.getpid()),
    }
    commit = git_commit()
    if commit:
        tags["mlflow.source.git.commit"] = commit
    return tags


CURVES = ("val/top1", "val/mrr", "val/bedroc", "val/cosine")
"""The per-epoch curves the grouped view opens on, first, one line per experiment (the mean over its seeds)."""


def _grouped_view_state() -> dict[str, Any]:
    """The MLflow UI's view state (what its Share button keeps): runs grouped by ``ablate.experiment``, and a first
    section of line charts per epoch of the headline metrics; the UI adds every other metric's chart below it (the
    parent run's one-value summaries among them)."""
    section = "ablate-curves"
    line = {"type": "LINE", "runsCountToCompare": 10, "metricSectionId": section, "deleted": False,
            "isGenerated": False, "lineSmoothness": 0, "xAxisScaleType": "linear", "scaleType": "linear",
            "range": {}, "xAxisKey": "step", "selectedXAxisMetricKey": "", "yAxisKey": "metric",
            "yAxisExpressions": [], "ignoreOutliers": False, "useGlobalXaxisKey": True,
            "useGlobalLineSmoothing": True}
    return {
        "groupBy": {"aggregateFunction": "average",
                    "groupByKeys": [{"mode": "tag", "groupByData": str(Tag.EXPERIMENT)}]},
        "compareRunSections": [{"uuid": section, "name": "per-epoch curves by experiment", "display": True,
                                "isReordered": False, "deleted": False, "isGenerated": False}],
        "compareRunCharts": [{**line, "uuid": f"ablate-{key}", "metricKey": key, "selectedMetricKeys": [key],
                              "displayName": key} for key in CURVES],
        "isAccordionReordered": True,
        "hideEmptyCharts": True,
    }
