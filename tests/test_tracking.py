"""MLflow tracking: what a run holds, how it ends, NaN kept out, passwords masked."""

from __future__ import annotations

import json
import math

import pytest
from mlflow import MlflowClient
from support import tiny_run

from ablate.stores import mask_url
from ablate.tracking.batches import MetricBatch
from ablate.tracking.client import Tracker
from ablate.tracking.runs import train_and_log
from ablate.training.stability import Instability


@pytest.fixture
def tracker(mlflow_uri, request):
    t = Tracker(mlflow_uri)
    t.test_experiment = t.experiment_id(request.node.name)
    return t


def _run(tracker, spec, **kw):
    return train_and_log(spec, tracker, tracker.test_experiment, "run", **kw)


def test_a_run_holds_params_tags_per_epoch_metrics_and_artifacts(tracker, tmp_path):
    spec = tiny_run(loss="infonce", epochs=4)
    outcome = _run(tracker, spec)
    client = MlflowClient(tracker.uri)
    run = client.get_run(outcome.run_id)
    assert run.info.status == "FINISHED"
    assert run.data.params["loss"] == "infonce"
    assert run.data.params["temperature"] == "0.07"
    assert run.data.params["model.hidden"] == "[16]"
    assert run.data.params["data.synthetic.n_ligands"] == "60"
    tags = run.data.tags
    for key in ("ablate.loss", "ablate.device", "torch.version", "ablate.data_fingerprint"):
        assert tags[key]
    assert tags["ablate.device"] == "cpu"
    history = client.get_metric_history(outcome.run_id, "val/top1")
    assert [m.step for m in sorted(history, key=lambda m: m.step)] == [0, 1, 2, 3]
    assert [m.value for m in sorted(history, key=lambda m: m.step)] == [h["val/top1"] for h in outcome.history]
    for key in ("train/loss", "train/inbatch_top1", "val/loss", "val/cosine", "val/top5", "val/top10",
                "val/mrr", "val/median_rank", "lr", "grad_norm", "epoch_seconds"):
        assert len(client.get_metric_history(outcome.run_id, key)) == 4, key
    artifacts = {a.path for a in client.list_artifacts(outcome.run_id)}
    assert {"spec.json", "final_metrics.json"} <= artifacts
    local = client.download_artifacts(outcome.run_id, "final_metrics.json", str(tmp_path))
    with open(local) as f:
        final = json.load(f)
    assert final["final"]["val/mrr"] == pytest.approx(outcome.history[-1]["val/mrr"])


def test_nan_never_reaches_mlflow_and_the_run_is_tagged_diverged(tracker):
    spec = tiny_run(epochs=8, model={"factory": "support:breaks_after", "kwargs": {"calls": 12}})
    outcome = _run(tracker, spec)
    assert outcome.diverged
    client = MlflowClient(tracker.uri)
    run = client.get_run(outcome.run_id)
    assert "train/loss" in run.data.tags["ablate.diverged"]
    assert run.data.tags["ablate.stopped_by"] == "nonfinite"
    for key in ("train/loss", "val/loss", "val/cosine", "grad_norm"):
        values = [m.value for m in client.get_metric_history(outcome.run_id, key)]
        assert all(math.isfinite(v) for v in values)
        assert len(values) == len(outcome.history) - 1  # the diverged epoch is left out


def test_ctrl_c_ends_the_run_killed_and_keeps_what_was_logged(tracker):
    def interrupt(result, history):
        if result.epoch == 2:
            raise KeyboardInterrupt
        return None

    with pytest.raises(KeyboardInterrupt):
        _run(tracker, tiny_run(epochs=6), on_epoch=interrupt)
    client = MlflowClient(tracker.uri)
    (run,) = client.search_runs([tracker.test_experiment])
    assert run.info.status == "KILLED"
    assert len(client.get_metric_history(run.info.run_id, "val/top1")) == 3


def test_an_error_ends_the_run_failed(tracker):
    def boom(result, history):
        raise RuntimeError("boom")

    with pytest.raises(RuntimeError):
        _run(tracker, tiny_run(epochs=3), on_epoch=boom)
    (run,) = MlflowClient(tracker.uri).search_runs([tracker.test_experiment])
    assert run.info.status == "FAILED"


def test_a_stop_from_the_hook_ends_the_run_finished_with_the_reason(tracker):
    def stop(result, history):
        return Instability("loss_ceiling", "too high", {"epoch": result.epoch}) if result.epoch == 1 else None

    outcome = _run(tracker, tiny_run(epochs=6), on_epoch=stop)
    run = MlflowClient(tracker.uri).get_run(outcome.run_id)
    assert run.info.status == "FINISHED"
    assert run.data.tags["ablate.stopped_by"] == "loss_ceiling"
    assert len(outcome.history) == 2


def test_metric_batches_are_sent_whole_even_when_flushed_late(tracker):
    exp = tracker.test_experiment
    run_id = tracker.start_run(exp, "batched")
    batch = MetricBatch(tracker, run_id, flush_seconds=3600)
    for step in range(5):
        skipped = batch.add({"a": float(step), "b": float("nan") if step == 3 else 1.0}, step)
        assert skipped == (["b"] if step == 3 else [])
    assert MlflowClient(tracker.uri).get_metric_history(run_id, "a") == []
    batch.flush()
    history = MlflowClient(tracker.uri).get_metric_history(run_id, "a")
    assert sorted(m.value for m in history) == [0, 1, 2, 3, 4]
    assert len(MlflowClient(tracker.uri).get_metric_history(run_id, "b")) == 4
    assert batch.nonfinite == {"b": 3}


@pytest.mark.parametrize(
    ("url", "masked"),
    [
        ("postgresql://ablate:s3cret@db:5432/optuna", "postgresql://ablate:***@db:5432/optuna"),
        ("postgresql+psycopg2://u:p%40ss@h/db", "postgresql+psycopg2://u:***@h/db"),
        ("http://user:pw@mlflow:5000", "http://user:***@mlflow:5000"),
        ("sqlite:///optuna.db", "sqlite:///optuna.db"),
        ("postgresql://ablate@db/optuna", "postgresql://ablate@db/optuna"),
        ("cannot reach postgresql://a:b@h/x: timeout", "cannot reach postgresql://a:***@h/x: timeout"),
        ("postgresql://h/db?user=u&password=s3cret&sslmode=require",
         "postgresql://h/db?user=u&password=***&sslmode=require"),
    ],
)
def test_passwords_in_urls_are_masked(url, masked):
    assert mask_url(url) == masked


def test_params_and_tags_are_masked_when_logged(tracker):
    exp = tracker.test_experiment
    run_id = tracker.start_run(exp, "masked")
    tracker.log_params(run_id, {"storage": "postgresql://u:topsecret@h/db"})
    tracker.set_tags(run_id, {"note": "http://a:topsecret@h:5000"})
    run = MlflowClient(tracker.uri).get_run(run_id)
    assert "topsecret" not in json.dumps(run.data.params) + json.dumps(run.data.tags)


def test_background_batches_are_all_written_by_close_and_errors_surface(tracker):
    exp = tracker.test_experiment
    run_id = tracker.start_run(exp, "background")
    batch = MetricBatch(tracker, run_id, flush_seconds=0.0, background=True)
    for step in range(20):
        batch.add({"a": float(step)}, step)
    batch.close()
    history = MlflowClient(tracker.uri).get_metric_history(run_id, "a")
    assert sorted(m.step for m in history) == list(range(20))

    broken = MetricBatch(tracker, "no-such-run", flush_seconds=0.0, background=True)
    broken.add({"a": 1.0}, 0)
    with pytest.raises(Exception, match="no-such-run"):
        broken.close()


def _stored(client, run_id, keys):
    history = {k: sorted((m.step, m.timestamp, m.value) for m in client.get_metric_history(run_id, k)) for k in keys}
    latest = {k: v for k, v in client.get_run(run_id).data.metrics.items()}
    return history, latest


def _same_rows_both_ways(tracker, rows_per_call):
    """Write the same metric rows through ``write_metrics`` and through MLflow's own ``log_batch``."""
    from mlflow.entities import Metric

    client = MlflowClient(tracker.uri)
    fast, reference = (tracker.start_run(tracker.test_experiment, name) for name in ("fast", "reference"))
    for rows in rows_per_call:
        metrics = [Metric(k, v, ts, step) for k, v, ts, step in rows]
        tracker.write_metrics(fast, metrics)
        client.log_batch(reference, metrics=metrics)
    keys = {r[0] for rows in rows_per_call for r in rows}
    return _stored(client, fast, keys), _stored(client, reference, keys)


def _sql_store_tracker(uri, name):
    t = Tracker(uri)
    t.test_experiment = t.experiment_id(name)
    return t


@pytest.mark.parametrize("store", ["sqlite", "postgresql"])
def test_metric_rows_written_straight_into_a_sql_store_read_back_as_log_batch_s(store, tracker, request):
    if store == "postgresql":
        tracker = _sql_store_tracker(request.getfixturevalue("postgres_url"), "pg")
    else:
        tracker = _sql_store_tracker(tracker.uri, request.node.name)

    def refuse(*_, **__):
        raise AssertionError("the direct path fell back to log_batch")

    tracker.client.log_batch = refuse  # the direct path is the one under test (the reference has its own client)
    calls = [
        [("loss", 0.9, 1000, 0), ("top1", 0.1, 1000, 0), ("loss", 0.8, 1001, 1), ("top1", 0.2, 1001, 1)],
        [("loss", 0.7, 1002, 2), ("lr", 1e-3, 1002, 2), ("top1", 0.15, 1002, 2)],
        # steps out of order: a later call with an earlier step must not replace the latest value
        [("loss", 0.5, 1003, 1), ("top1", 0.3, 999, 2), ("top1", 0.25, 1002, 2)],
        [("lr", 5e-4, 1002, 2)],  # same step and time, smaller value: MLflow keeps the larger as latest
    ]
    (history, latest), (ref_history, ref_latest) = _same_rows_both_ways(tracker, calls)
    assert tracker._sql is not None
    assert history == ref_history
    assert latest == ref_latest == {"loss": 0.7, "top1": 0.25, "lr": 1e-3}


def test_rows_mlflow_must_judge_go_through_log_batch(tracker):
    from mlflow.entities import Metric

    client = MlflowClient(tracker.uri)
    run_id = tracker.start_run(tracker.test_experiment, "judged")
    row = [Metric("a", 1.0, 1000, 0)]
    tracker.write_metrics(run_id, row)
    tracker.write_metrics(run_id, [*row, Metric("a", 2.0, 1001, 1)])  # a row already stored: MLflow skips it
    assert sorted(m.value for m in client.get_metric_history(run_id, "a")) == [1.0, 2.0]
    tracker.write_metrics(run_id, [Metric("b", float("nan"), 1000, 0)])  # MLflow's own NaN handling
    assert math.isnan(client.get_run(run_id).data.metrics["b"])
    client.delete_run(run_id)
    with pytest.raises(Exception, match="must be in the 'active' state"):
        tracker.write_metrics(run_id, [Metric("a", 3.0, 1002, 2)])
    with pytest.raises(Exception, match="no-such-run"):
        tracker.write_metrics("no-such-run", row)


def test_a_direct_write_that_fails_unexpectedly_leaves_the_rows_to_log_batch(mlflow_uri, monkeypatch, request):
    from mlflow.entities import Metric

    import ablate.tracking.client as tracking

    tracker = _sql_store_tracker(mlflow_uri, request.node.name)
    run_id = tracker.start_run(tracker.test_experiment, "fallback")

    def broken(*_):
        raise RuntimeError("no such column: metrics.value")  # as a changed schema would fail

    def locked(*_):
        import sqlalchemy as sa
        from mlflow.exceptions import MlflowException

        raise MlflowException("database is locked") from sa.exc.OperationalError("INSERT", {}, Exception("locked"))

    monkeypatch.setattr(tracking, "insert_metrics", locked)
    tracker.write_metrics(run_id, [Metric("a", 1.0, 1000, 0)])
    assert tracker._sql is not None  # a passing failure: that batch went through log_batch, the next tries again
    monkeypatch.setattr(tracking, "insert_metrics", broken)
    tracker.write_metrics(run_id, [Metric("a", 2.0, 1001, 1)])
    assert sorted(m.value for m in MlflowClient(tracker.uri).get_metric_history(run_id, "a")) == [1.0, 2.0]
    assert tracker._sql is None  # one that will fail again: the tracker does not try the direct path again


def test_a_new_sqlite_store_appears_whole_or_not_at_all(tmp_path, monkeypatch):
    import mlflow.store.db.utils

    from ablate.tracking.client import Tracker

    def stopped(*_: object, **__: object) -> None:
        raise KeyboardInterrupt  # Ctrl-C in the middle of the first schema migration

    monkeypatch.setattr(mlflow.store.db.utils, "_initialize_tables", stopped)
    with pytest.raises(KeyboardInterrupt):
        Tracker(f"sqlite:///{tmp_path / 'mlflow.db'}")
    assert sorted(p.name for p in tmp_path.iterdir() if not p.name.endswith(".lock")) == []
    monkeypatch.undo()
    tracker = Tracker(f"sqlite:///{tmp_path / 'mlflow.db'}")  # the next command creates it
    assert tracker.experiment_id("x")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["mlflow.db", "mlflow.db.lock"]


def test_a_store_left_half_created_is_explained_with_the_command_that_clears_it(tmp_path):
    import sqlite3

    from ablate.errors import AblateError
    from ablate.tracking.client import Tracker

    db = tmp_path / "mlflow.db"
    con = sqlite3.connect(db)
    con.execute("CREATE TABLE experiments (experiment_id INTEGER)")
    con.execute("CREATE TABLE _alembic_tmp_latest_metrics (key TEXT)")
    con.commit()
    con.close()
    with pytest.raises(AblateError, match=rf"was left half-created .* holds 0 run\(s\); remove it \(rm {db}\)"):
        Tracker(f"sqlite:///{db}")


def test_metric_histories_of_many_runs_are_read_at_once_as_mlflow_gives_them(tracker):
    """A report reads every run's curves at once (from a SQL store's table); the values are those of MLflow's own
    get_metric_history, by step, and the same without the SQL shortcut."""
    from mlflow.entities import Metric

    exp = tracker.experiment_id("histories")
    runs = [tracker.start_run(exp, f"r{i}") for i in range(3)]
    for i, run in enumerate(runs):
        metrics = [Metric("val/mrr", 0.1 * i + step / 100, 1000 + step, step) for step in (2, 0, 1)]
        tracker.client.log_batch(run, metrics=[*metrics, Metric("train/loss", 1.0, 1000, 0)])
    tracker.client.log_batch(runs[0], metrics=[Metric("val/mrr", 0.5, 999, 1)])  # a second value at step 1
    keys = ["val/mrr", "train/loss", "val/top1"]
    expected = {(r, k): [m.value for m in sorted(tracker.client.get_metric_history(r, k),
                                                   key=lambda m: (m.step, m.timestamp))]
                for r in runs for k in keys}
    expected = {pair: values for pair, values in expected.items() if values}
    assert tracker._sql is not None  # a SQLite store: read from its table
    read = tracker.histories(runs, keys)
    assert read == expected and read[(runs[0], "val/mrr")] == [0.0, 0.5, 0.01, 0.02]
    assert (runs[0], "val/top1") not in read
    sql, tracker._sql = tracker._sql, None
    try:
        assert tracker.histories(runs, keys) == expected  # through get_metric_history, several at a time
    finally:
        tracker._sql = sql
