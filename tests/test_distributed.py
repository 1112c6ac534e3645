"""Many workers on one study: PostgreSQL storage, dead-worker recovery, --jobs on SQLite, secrets."""

from __future__ import annotations

import os
import signal
import subprocess
import threading
import time
from collections import Counter
from pathlib import Path

import optuna
import pytest
from mlflow import MlflowClient
from support import ablate_command, run_cli

from ablate.study import records, studies

pytestmark = pytest.mark.slow

TINY_RUN = ["--set", "data.source=pairs.npz", "--set", "model.hidden=[16]", "--set", "model.dropout=0.0"]
SECRET = "Sup3rSecretPw"


def _with_password(url: str) -> str:
    """The same database with a password in the URL (trust authentication ignores it)."""
    scheme, rest = url.split("://", 1)
    user, host = rest.split("@", 1)
    return f"{scheme}://{user}:{SECRET}@{host}"


def _workers(n: int, study: str, storage: str, cwd: Path, *extra: str) -> list[subprocess.Popen[str]]:
    env = {**os.environ, "PYTHONUNBUFFERED": "1", "COLUMNS": "200"}
    return [
        subprocess.Popen(ablate_command("worker", study, "--storage", storage, *extra), cwd=cwd, env=env,
                         stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, start_new_session=True)
        for _ in range(n)
    ]


def _wait(procs: list[subprocess.Popen[str]], timeout: float = 300) -> list[str]:
    logs = []
    for p in procs:
        out, _ = p.communicate(timeout=timeout)
        logs.append(out)
        assert p.returncode == 0, out
    return logs


def _mlflow(cwd: Path) -> MlflowClient:
    return MlflowClient(f"sqlite:///{cwd / 'mlflow.db'}")


def _child_runs(cwd: Path, experiment: str) -> list:
    client = _mlflow(cwd)
    exp = client.get_experiment_by_name(experiment)
    return [r for r in client.search_runs([exp.experiment_id]) if "mlflow.parentRunId" in r.data.tags]


def test_three_workers_share_a_search_of_12_trials(workdir, postgres_url, monkeypatch, capsys):
    storage = _with_password(postgres_url)
    code, out, err = run_cli(["tune", "temperature", "--n-trials", "12", "--jobs", "0", "--storage", storage,
                              "--set", "epochs=4", "--set", "batch_size=16", *TINY_RUN], monkeypatch, capsys)
    assert code == 0, err
    assert SECRET not in out + err
    ref = studies.load("temperature", studies.open_storage(storage))

    logs = _wait(_workers(3, ref.name, storage, workdir, "--array", "1"))  # one trial each, so all three work
    assert all(SECRET not in log for log in logs)

    trials = ref.study.get_trials()
    finished = [t for t in trials if t.state in (optuna.trial.TrialState.COMPLETE, optuna.trial.TrialState.PRUNED)]
    assert len(finished) == 12
    assert len({t.params["temperature"] for t in finished}) == 12  # no worker replays another's draws
    assert not [t for t in trials if t.state == optuna.trial.TrialState.FAIL
                and not t.user_attrs.get(records.SKIPPED)]
    run_ids = [t.user_attrs["mlflow_run_id"] for t in finished]
    assert len(set(run_ids)) == 12
    children = _child_runs(workdir, "temperature")
    assert {r.info.run_id for r in children} >= set(run_ids)
    assert sorted(int(r.data.tags["ablate.trial"]) for r in children if r.info.run_id in run_ids) == sorted(
        t.number for t in finished)
    # More than one worker did the work.
    assert len({r.data.tags["pid"] for r in children}) >= 2
    # The password never reaches MLflow.
    for r in children:
        assert SECRET not in repr(r.data.params) + repr(r.data.tags)


def test_two_workers_train_every_experiment_and_seed_of_the_suite_exactly_once(workdir, postgres_url,
                                                                                 monkeypatch, capsys):
    code, out, err = run_cli(["run-suite", "baseline-vs-multistage", "--jobs", "0", "--storage", postgres_url,
                              "--epochs", "3", "--seeds", "0,1", *TINY_RUN], monkeypatch, capsys)
    assert code == 0, err
    ref = studies.load("baseline-vs-multistage", studies.open_storage(postgres_url))
    assert f"start workers with: ablate worker {ref.name} --storage {postgres_url}" in " ".join(out.split())
    _wait(_workers(2, ref.name, postgres_url, workdir))

    children = _child_runs(workdir, "baseline-vs-multistage")
    trained = Counter((r.data.tags["ablate.experiment"], int(r.data.tags["ablate.seed"])) for r in children)
    expected = {(e, s) for e in ref.spec.experiments for s in (0, 1)}
    assert set(trained) == expected
    assert all(n == 1 for n in trained.values())
    complete = ref.study.get_trials(states=(optuna.trial.TrialState.COMPLETE,))
    assert len(complete) == 10

    code, _, err = run_cli(["report", ref.name, "--storage", postgres_url], monkeypatch, capsys)
    assert code == 0, err
    assert (workdir / "reports" / ref.name / "report.md").is_file()


def test_a_killed_worker_s_trial_fails_by_heartbeat_and_is_retried(workdir, postgres_url, monkeypatch, capsys):
    code, _, err = run_cli(["tune", "temperature", "--n-trials", "4", "--jobs", "0", "--storage", postgres_url,
                              "--set", "epochs=120", "--set", "batch_size=16", "--set", "pruner.type=none",
                              *TINY_RUN], monkeypatch, capsys)
    assert code == 0, err
    ref = studies.load("temperature", studies.open_storage(postgres_url))
    victim, survivor = _workers(2, ref.name, postgres_url, workdir, "--heartbeat", "1", "--array", "1")

    deadline = time.time() + 180
    doomed = None
    while doomed is None and time.time() < deadline:
        time.sleep(0.5)
        for t in ref.study.get_trials(states=(optuna.trial.TrialState.RUNNING,)):
            run = t.user_attrs.get("mlflow_run_id")
            if run and len(t.intermediate_values) >= 3 and \
                    _mlflow(workdir).get_run(run).data.tags.get("pid") == str(victim.pid):
                doomed = t
    assert doomed is not None, "the first worker never got a trial"
    os.killpg(victim.pid, signal.SIGKILL)
    victim.wait(timeout=30)

    _wait([survivor], timeout=400)
    failed = ref.study.get_trials(states=(optuna.trial.TrialState.FAIL,))
    assert [t.number for t in failed] == [doomed.number]
    retries = [t for t in ref.study.get_trials()
               if optuna.storages.RetryHeartbeatStaleTrialCallback.retried_trial_number(t) == doomed.number]
    assert len(retries) == 1
    assert retries[0].state == optuna.trial.TrialState.COMPLETE
    assert retries[0].params == doomed.params
    complete = ref.study.get_trials(states=(optuna.trial.TrialState.COMPLETE,))
    assert len(complete) == 4
    # The retry continued the dead worker's MLflow run from its last checkpoint, to the end.
    run = _mlflow(workdir).get_run(doomed.user_attrs["mlflow_run_id"])
    assert retries[0].user_attrs["mlflow_run_id"] == run.info.run_id
    assert run.info.status == "FINISHED"
    assert 0 < int(run.data.tags["ablate.resumed_from_epoch"]) <= len(doomed.intermediate_values) * 5 + 5
    assert sorted(m.step for m in _mlflow(workdir).get_metric_history(run.info.run_id, "val/mrr")) == list(range(120))


def test_jobs_on_the_embedded_sqlite_store_run_without_lock_errors(workdir, monkeypatch, capsys):
    # 10 trials x 100 epochs: work enough (launch.WORK_FOR_ALL) that the second process starts at once
    code, out, err = run_cli(["run-suite", "baseline-vs-multistage", "--jobs", "2", "--array", "1", "--epochs", "100",
                              "--seeds", "0,1", *TINY_RUN], monkeypatch, capsys)
    assert code == 0, err + out
    assert "locked" not in (out + err).lower()
    storage = f"sqlite:///{workdir / 'optuna.db'}"
    ref = studies.load("baseline-vs-multistage", studies.open_storage(storage))
    states = Counter(t.state.name for t in ref.study.get_trials())
    assert states == {"COMPLETE": 10}
    children = _child_runs(workdir, "baseline-vs-multistage")
    assert len(children) == 10
    assert "with 2 worker(s)" in out  # both started at once; which of them takes which trial is up to the load
    labels = Counter((r.data.tags["ablate.experiment"], r.data.tags["ablate.seed"]) for r in children)
    assert len(labels) == 10 and set(labels.values()) == {1}  # every trial trained exactly once


def test_two_sqlite_workers_cannot_both_take_one_queued_trial(tmp_path):
    # Worker A has read the queued trial as WAITING and is about to mark it RUNNING; worker B
    # tries to take the same trial meanwhile. B must wait for A and then find it taken.
    url = f"sqlite:///{tmp_path / 'optuna.db'}"
    a, b = studies.open_storage(url, heartbeat_seconds=None), studies.open_storage(url, heartbeat_seconds=None)
    study = optuna.create_study(storage=a, study_name="race")
    study.enqueue_trial({})
    (trial_id,) = [t._trial_id for t in study.get_trials()]
    taken: list[bool] = []
    with a.engine.connect() as conn:
        conn.begin()
        state = conn.exec_driver_sql("SELECT state FROM trials WHERE trial_id = ?", (trial_id,)).scalar()
        assert state == "WAITING"
        other = threading.Thread(target=lambda: taken.append(
            b.set_trial_state_values(trial_id, optuna.trial.TrialState.RUNNING)))
        other.start()
        other.join(timeout=1.0)
        assert other.is_alive()  # B waits for A's transaction
        conn.exec_driver_sql("UPDATE trials SET state = 'RUNNING' WHERE trial_id = ?", (trial_id,))
        conn.commit()
    other.join(timeout=60)
    assert taken == [False]


def test_an_unreachable_storage_is_one_line_with_the_password_masked(workdir):
    url = f"postgresql://ablate:{SECRET}@127.0.0.1:9/optuna"
    proc = subprocess.run(ablate_command("studies", "list", "--storage", url), cwd=workdir,
                          capture_output=True, text=True, timeout=120)
    assert proc.returncode == 2
    assert SECRET not in proc.stdout + proc.stderr
    lines = [line for line in proc.stderr.splitlines() if line.strip()]
    assert len(lines) == 1 and "postgresql://ablate:***@127.0.0.1:9/optuna" in lines[0], proc.stderr
    assert "Traceback" not in proc.stderr


def test_a_worker_for_a_missing_study_says_how_to_start_it(workdir, postgres_url):
    proc = subprocess.run(ablate_command("worker", "nope", "--storage", postgres_url), cwd=workdir,
                          capture_output=True, text=True, timeout=120)
    assert proc.returncode == 2
    assert "no study 'nope'" in proc.stderr and "ablate run-suite" in proc.stderr



def test_sigterm_stops_every_worker_process_cleanly_even_with_sigint_ignored(workdir):
    # Started in the background (nohup, CI): SIGINT is ignored, so only SIGTERM can stop the run.
    cmd = ablate_command("run-suite", "baseline-vs-multistage", "--jobs", "2", "--array", "1", "--epochs", "4000",
                         "--seeds", "0,1", *TINY_RUN)
    proc = subprocess.Popen(cmd, cwd=workdir, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                            preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_IGN))
    storage = f"sqlite:///{workdir / 'optuna.db'}"
    deadline = time.time() + 180
    running = []
    while len(running) < 2 and time.time() < deadline and proc.poll() is None:
        time.sleep(1)
        if (workdir / "optuna.db").exists():
            try:
                study = studies.load("baseline-vs-multistage", studies.open_storage(storage)).study
            except Exception:
                continue
            running = [t for t in study.get_trials(states=(optuna.trial.TrialState.RUNNING,))
                       if len(t.intermediate_values) or t.user_attrs.get("mlflow_run_id")]
    assert len(running) == 2, proc.stdout.read() if proc.poll() is not None else "no two trials running"
    time.sleep(2)
    proc.send_signal(signal.SIGTERM)
    out, _ = proc.communicate(timeout=120)
    assert proc.returncode == 130, out
    assert "run the same command again to resume" in out

    study = studies.load("baseline-vs-multistage", studies.open_storage(storage)).study
    states = Counter(t.state.name for t in study.get_trials())
    assert states["RUNNING"] == 0 and states["FAIL"] == 2, states
    client = _mlflow(workdir)
    for t in study.get_trials(states=(optuna.trial.TrialState.FAIL,)):
        assert client.get_run(t.user_attrs["mlflow_run_id"]).info.status == "KILLED"
    assert client.get_run(study.user_attrs[records.PARENT_RUN]).info.status == "KILLED"


def test_a_device_that_does_not_exist_is_one_line_before_any_trial(workdir, monkeypatch, capsys):
    code, _, err = run_cli(["run-suite", "baseline-vs-multistage", "--devices", "cuda:5", "--epochs", "2",
                              *TINY_RUN], monkeypatch, capsys)
    assert code == 2
    assert "'cuda:5' is not available" in err
    assert not (workdir / "optuna.db").exists()


@pytest.mark.bare
def test_workers_log_to_an_mlflow_tracking_server(workdir, monkeypatch, capsys, mlflow_server_url):
    url = mlflow_server_url  # shared by the session's tests, each in its own experiment
    code, out, err = run_cli(["run-suite", "baseline-vs-multistage", "--jobs", "2", "--epochs", "2",
                              "--seeds", "0", "--tracking-uri", url, *TINY_RUN], monkeypatch, capsys)
    assert code == 0, err + out
    client = MlflowClient(url)
    exp = client.get_experiment_by_name("baseline-vs-multistage")
    runs = client.search_runs([exp.experiment_id])
    children = [r for r in runs if "mlflow.parentRunId" in r.data.tags]
    assert len(children) == 5
    assert all(len(client.get_metric_history(r.info.run_id, "val/mrr")) == 2 for r in children)
    assert not (workdir / "mlflow.db").exists()  # nothing went to the local default store
