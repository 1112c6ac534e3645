"""`ablate tune` and `ablate studies`: persistent searches, pruning recorded, budgets counted."""

from __future__ import annotations

import csv
import io
import math
import random
import re
import time

import optuna
import pytest
from mlflow import MlflowClient
from support import run_cli

from ablate.study import records, studies
from ablate.study.space import simplex_point
from ablate.study.studyfiles import load_study, study_name

TINY_SEARCH = ["--epochs", "4", "--set", "data.source=pairs.npz", "--set", "batch_size=16",
               "--set", "model.hidden=[16]", "--set", "model.dropout=0.0", "--set", "sampler.n_startup_trials=2",
               "--set", "pruner.n_startup_trials=2", "--set", "pruner.n_warmup_steps=1"]


def _load(workdir, name):
    storage = studies.open_storage(f"sqlite:///{workdir / 'optuna.db'}")
    return studies.load(name, storage)


def _finished(study):
    return [t for t in study.get_trials() if t.state in (optuna.trial.TrialState.COMPLETE,
                                                          optuna.trial.TrialState.PRUNED)]


@pytest.mark.slow
def test_tune_runs_a_persistent_search_and_counts_earlier_trials(workdir, monkeypatch, capsys):
    code, out, err = run_cli(["tune", "temperature", "--n-trials", "4", *TINY_SEARCH], monkeypatch, capsys)
    assert code == 0, err + out
    ref = _load(workdir, "temperature")
    first = _finished(ref.study)
    assert len(first) == 4
    for t in first:
        assert 0.01 <= t.params["temperature"] <= 0.5
        assert 1 <= t.user_attrs["epochs_trained"] <= 4
        # judged by its best epoch, a trial reports its best value so far to the pruner
        reported = [t.intermediate_values[e] for e in sorted(t.intermediate_values)]
        assert reported == sorted(reported)
        if t.state == optuna.trial.TrialState.COMPLETE:
            assert t.value == t.user_attrs["selected"]["val/mrr"] >= reported[-1]
            assert t.user_attrs["selected"]["val/mrr"] == max(
                m.value for m in MlflowClient(f"sqlite:///{workdir / 'mlflow.db'}").get_metric_history(
                    t.user_attrs["mlflow_run_id"], "val/mrr"))
            assert set(t.user_attrs["test"]) >= {"test/mrr", "test/top1"}
    assert "best (chosen on val/mrr): trial #" in out
    assert re.search(r"its selected model on test: test/mrr \d\.\d{4} \(scored once, chooses nothing\)", out)
    assert "expected best val/mrr with n trials" in out
    assert ref.spec.base.epochs == 4

    client = MlflowClient(f"sqlite:///{workdir / 'mlflow.db'}")
    parent = ref.study.user_attrs[records.PARENT_RUN]
    children = [r for r in client.search_runs([client.get_experiment_by_name("temperature").experiment_id])
                if r.data.tags.get("mlflow.parentRunId") == parent]
    assert sorted(int(r.data.tags["ablate.trial"]) for r in children) == sorted(t.number for t in first)
    for r in children:
        trial = next(t for t in first if t.number == int(r.data.tags["ablate.trial"]))
        assert r.data.tags["ablate.state"] == trial.state.name
        assert float(r.data.params["temperature"]) == pytest.approx(trial.params["temperature"])
    assert client.get_run(parent).info.status == "FINISHED"

    # Again with a budget of 6: the 4 earlier trials count, 2 more run, in the same study.
    code, out, err = run_cli(["tune", "temperature", "--n-trials", "6", *TINY_SEARCH], monkeypatch, capsys)
    assert code == 0, err
    ref2 = _load(workdir, "temperature")
    assert ref2.name == ref.name
    assert len(_finished(ref2.study)) == 6

    code, out, err = run_cli(["studies", "list"], monkeypatch, capsys)
    assert ref.name in out and "search" in out
    code, out, err = run_cli(["studies", "export", ref.name, "--format", "csv"], monkeypatch, capsys)
    assert code == 0
    rows = list(csv.DictReader(io.StringIO(out)))
    assert len(rows) == 6
    assert {"number", "state", "value", "params_temperature"} <= set(rows[0])


@pytest.mark.slow
def test_unstable_trials_are_pruned_with_the_rule_recorded(workdir, monkeypatch, capsys):
    args = ["tune", "temperature", "--n-trials", "2", *TINY_SEARCH, "--set", "epochs=8", "--set", "lr=1.0",
            "--set", "params.temperature.low=0.002", "--set", "params.temperature.high=0.003"]
    code, out, err = run_cli(args, monkeypatch, capsys)
    assert code == 0, err + out
    ref = _load(workdir, "temperature")
    client = MlflowClient(f"sqlite:///{workdir / 'mlflow.db'}")
    trials = _finished(ref.study)
    assert len(trials) == 2
    for t in trials:
        assert t.state == optuna.trial.TrialState.PRUNED
        assert t.user_attrs["pruned_by"]["rule"] == "loss_ceiling"
        assert t.user_attrs["epochs_trained"] <= 4
        run = client.get_run(t.user_attrs["mlflow_run_id"])
        assert run.data.tags["ablate.stopped_by"] == "loss_ceiling" and "ablate.pruned_by" not in run.data.tags
        assert run.data.tags["ablate.state"] == "PRUNED"
    code, out, err = run_cli(["studies", "show", ref.name], monkeypatch, capsys)
    assert "PRUNED" in out and "above the ceiling" in out


@pytest.mark.slow
def test_weights_search_samples_the_simplex_and_confirm_retrains_the_top_k(workdir, monkeypatch, capsys):
    args = ["tune", "weights", "--n-trials", "3", *TINY_SEARCH, "--set", "pruner.type=none",
            "--set", "confirm_seeds=[7,8]", "--confirm", "2"]
    code, out, err = run_cli(args, monkeypatch, capsys)
    assert code == 0, err + out
    ref = _load(workdir, "weights")
    for t in _finished(ref.study):
        w = t.user_attrs["values"]
        assert w["alpha"] + w["beta"] + w["gamma"] == pytest.approx(1.0)
        assert min(w["alpha"], w["beta"], w["gamma"]) >= 0
    confirm = _load(workdir, "weights-confirm")
    done = _finished(confirm.study)
    assert sorted(t.params["seed"] for t in done) == [7, 7, 8, 8]
    ranked = sorted((t for t in _finished(ref.study) if t.value is not None), key=lambda t: -t.value)[:2]
    assert set(confirm.spec.experiments) == {f"trial{t.number}" for t in ranked}
    for t in ranked:
        run = confirm.spec.experiments[f"trial{t.number}"]
        assert run.alpha == pytest.approx(t.user_attrs["values"]["alpha"])
    assert "confirming the top 2" in out


def test_batch_search_scales_the_learning_rate_by_the_square_root_rule():
    spec = load_study("batch")
    study = optuna.create_study(direction="maximize")
    for batch in (16, 32, 64, 128, 256):
        study.enqueue_trial({"batch_size": batch})
        trial = study.ask()
        run, values, _ = spec.suggest(trial)
        assert run.batch_size == batch
        assert run.lr == pytest.approx(5e-4 * math.sqrt(batch / 32))
        assert values["lr"] == run.lr


def test_temperature_search_file():
    spec = load_study("temperature")
    p = spec.params["temperature"]
    assert (p.type, p.log) == ("float", True)
    assert p.low <= 0.01 and p.high >= 0.5
    assert spec.sampler.type == "tpe" and spec.pruner.type == "median"
    assert spec.base.loss == "infonce"
    assert study_name(spec) == study_name(load_study("temperature", {"n_trials": 99}))


def test_simplex_points_sum_to_one_reach_every_corner_and_are_uniform():
    for u in ([0.0, 0.0], [1.0, 0.0], [0.0, 1.0], [0.3, 0.7], [1.0, 1.0]):
        w = simplex_point(u)
        assert sum(w) == pytest.approx(1.0) and min(w) >= 0
    assert simplex_point([1.0, 0.5]) == pytest.approx([1.0, 0.0, 0.0])
    assert simplex_point([0.0, 1.0]) == pytest.approx([0.0, 1.0, 0.0])
    assert simplex_point([0.0, 0.0]) == pytest.approx([0.0, 0.0, 1.0])
    # Uniform u -> uniform on the simplex: each weight has mean 1/3 and P(w_i > 1/2) = 1/4.
    rng = random.Random(0)
    points = [simplex_point([rng.random(), rng.random()]) for _ in range(40000)]
    for i in range(3):
        assert sum(p[i] for p in points) / len(points) == pytest.approx(1 / 3, abs=0.01)
        assert sum(p[i] > 0.5 for p in points) / len(points) == pytest.approx(0.25, abs=0.01)


def _temperatures(workdir):
    return [t.params["temperature"] for t in _load(workdir, "temperature").study.get_trials()
            if "temperature" in t.params]


@pytest.mark.slow
def test_a_seeded_search_run_twice_from_scratch_draws_the_same_configurations(tmp_path, monkeypatch, capsys):
    from support import TINY

    from ablate.training.data import synthetic_pairs

    draws = []
    for run in ("first", "second"):
        folder = tmp_path / run
        folder.mkdir()
        monkeypatch.chdir(folder)
        synthetic_pairs(TINY).save(folder / "pairs.npz")
        code, out, err = run_cli(["tune", "temperature", "--n-trials", "12", *TINY_SEARCH, "--epochs", "2"],
                                 monkeypatch, capsys)
        assert code == 0, err + out
        draws.append(_temperatures(folder))
    assert len(draws[0]) == 12 and len(set(draws[0])) == 12
    assert draws[0] == draws[1]


@pytest.mark.slow
def test_parallel_and_resumed_searches_never_train_a_configuration_twice(workdir, monkeypatch, capsys):
    import signal
    import subprocess

    from support import ablate_command

    args = ["tune", "temperature", "--n-trials", "12", "--jobs", "2", "--array", "1", *TINY_SEARCH, "--epochs", "30"]
    proc = subprocess.Popen(ablate_command(*args), cwd=workdir, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                            text=True)
    storage = studies.open_storage(f"sqlite:///{workdir / 'optuna.db'}")
    deadline = time.time() + 240
    while time.time() < deadline and proc.poll() is None:
        time.sleep(0.5)
        try:
            ref = studies.load("temperature", storage)
        except Exception:
            continue
        if len(_finished(ref.study)) >= 4:
            break
    proc.send_signal(signal.SIGTERM)
    out, _ = proc.communicate(timeout=120)
    assert proc.returncode == 130, out
    assert 4 <= len(_finished(_load(workdir, "temperature").study)) < 12

    code, out, err = run_cli(args, monkeypatch, capsys)  # resumed
    assert code == 0, err + out
    ref = _load(workdir, "temperature")
    finished = [t.params["temperature"] for t in _finished(ref.study)]
    assert len(finished) == 12 and len(set(finished)) == 12
    # an interrupted trial is continued by one that takes over its run and checkpoint (same temperature);
    # no other configuration is drawn twice
    trials = ref.study.get_trials()
    continued = {t.user_attrs[records.RESUMES] for t in trials if records.RESUMES in t.user_attrs}
    drawn = [t.params["temperature"] for t in trials if "temperature" in t.params and t.number not in continued]
    assert len(set(drawn)) == len(drawn)


@pytest.mark.slow
def test_a_finite_space_caps_the_budget_and_never_repeats_a_configuration(workdir, monkeypatch, capsys):
    tiny = [a for a in TINY_SEARCH if a != "batch_size=16"]
    tiny = [a for i, a in enumerate(tiny) if not (a == "--set" and tiny[i + 1] == "--set")]
    code, out, err = run_cli(["tune", "batch", "--n-trials", "5", *tiny, "--epochs", "2", "--set",
                              "params.batch_size.choices=[4,8,16]", "--jobs", "2"], monkeypatch, capsys)
    assert code == 0, err + out
    assert "the search space has 3 configuration(s): the budget of 5 trials is capped at 3" in " ".join(out.split())
    ref = _load(workdir, "batch")
    assert sorted(t.params["batch_size"] for t in _finished(ref.study)) == [4, 8, 16]
    assert len(ref.study.get_trials()) == 3


def test_a_studys_value_is_named_by_its_objective(workdir, monkeypatch, capsys):
    code, _, err = run_cli(["tune", "temperature", "--jobs", "0", "--n-trials", "2", *TINY_SEARCH], monkeypatch, capsys)
    assert code == 0, err
    assert _load(workdir, "temperature").study.metric_names == ["val/mrr"]  # what optuna-dashboard shows


@pytest.mark.slow
def test_a_finished_searchs_rerun_reads_its_importances_back_and_touches_no_mlflow(workdir, monkeypatch, capsys):
    args = ["tune", "temperature", "--n-trials", "3", *TINY_SEARCH]
    code, _, err = run_cli(args, monkeypatch, capsys)
    assert code == 0, err
    kept = _load(workdir, "temperature").study.user_attrs["ablate.importances"]
    assert kept["trials"][0] == 3

    def refuse(*_: object, **__: object) -> None:
        raise AssertionError("computed again")

    monkeypatch.setattr(optuna.importance, "get_param_importances", refuse)
    monkeypatch.setattr("ablate.tracking.client.Tracker.__init__", refuse)
    code, out, err = run_cli(args, monkeypatch, capsys)
    assert code == 0, err + out
    if kept["values"]:
        assert "parameter importances (fANOVA): temperature 1.00" in out


def test_a_run_that_fails_after_its_end_tags_were_sent_is_tagged_fail_like_its_trial(workdir, monkeypatch, capsys):
    """A run's state tag goes out with its other end tags, before its model is logged and Optuna is told: when
    something fails in between, the trial ends FAIL and its run's tag says FAIL too, not the state it was about
    to have."""
    from mlflow import MlflowClient

    from ablate.tracking.client import Tracker
    from ablate.vocabulary import Tag

    def no_room(*args, **kwargs):
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(Tracker, "log_model", no_room)
    run_cli(["tune", "temperature", "--n-trials", "1", "--jobs", "1", "--array", "1", *TINY_SEARCH, "--epochs", "2"],
            monkeypatch, capsys)
    (trial,) = _load(workdir, "temperature").study.get_trials()
    assert trial.state == optuna.trial.TrialState.FAIL and "No space left" in trial.user_attrs["error"]
    run = MlflowClient(f"sqlite:///{workdir / 'mlflow.db'}").get_run(trial.user_attrs["mlflow_run_id"])
    assert run.data.tags[Tag.STATE] == "FAIL" and run.info.status == "FAILED"
