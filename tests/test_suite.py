"""`ablate run-suite` and `ablate report`: one Optuna trial per (experiment, seed), resumable,
one MLflow child run per trial under one parent, a report with honest statistics."""

from __future__ import annotations

import json
import re
import shutil
from pathlib import Path

import numpy as np
import optuna
import pytest
from mlflow import MlflowClient
from support import run_cli

from ablate.errors import AblateError
from ablate.study import records
from ablate.study.studyfiles import load_study, study_name

SUITE = ["run-suite", "baseline-vs-multistage", "--epochs", "3", "--seeds", "0,1", "--data", "pairs.npz",
         "--set", "model.hidden=[16]", "--set", "model.dropout=0.0"]


def _study(workdir):
    spec = load_study("baseline-vs-multistage", {"seeds": [0, 1], "data.source": "pairs.npz",
                                                 "model.hidden": [16], "model.dropout": 0.0}, epochs=3)
    storage = f"sqlite:///{workdir / 'optuna.db'}"
    return optuna.load_study(study_name=study_name(spec), storage=storage), spec


def _child_runs(workdir, parent):
    client = MlflowClient(f"sqlite:///{workdir / 'mlflow.db'}")
    exp = client.get_experiment_by_name("baseline-vs-multistage")
    runs = client.search_runs([exp.experiment_id])
    return [r for r in runs if r.data.tags.get("mlflow.parentRunId") == parent]


@pytest.mark.slow
def test_suite_trains_each_experiment_and_seed_once_and_reports(workdir, monkeypatch, capsys):
    code, out, err = run_cli(SUITE, monkeypatch, capsys)
    assert code == 0, err + out
    study, spec = _study(workdir)
    trials = study.get_trials(states=(optuna.trial.TrialState.COMPLETE,))
    pairs = sorted((t.params["experiment"], t.params["seed"]) for t in trials)
    assert pairs == sorted((e, s) for e in spec.experiments for s in (0, 1))
    assert study.user_attrs[records.SPEC]["kind"] == "suite"

    parent = study.user_attrs[records.PARENT_RUN]
    children = _child_runs(workdir, parent)
    assert len(children) == 10
    assert sorted((r.data.tags["ablate.experiment"], int(r.data.tags["ablate.seed"])) for r in children) == pairs
    assert all(r.info.status == "FINISHED" for r in children)

    client = MlflowClient(f"sqlite:///{workdir / 'mlflow.db'}")
    parent_run = client.get_run(parent)
    assert parent_run.info.status == "FINISHED"
    assert parent_run.data.tags["ablate.complete"] == "true"
    # A few headline metrics on the parent (the headline's mean per experiment), the rest in a table.
    assert set(parent_run.data.metrics) == {f"{e}/test/top1" for e in spec.experiments}
    split = json.loads(Path(client.download_artifacts(parent, "split.json", str(workdir))).read_text())
    rows_in_file = len(np.load(workdir / "pairs.npz")["pocket"])
    assert sorted(split["train"] + split["val"] + split["test"]) == list(range(rows_in_file))
    assert parent_run.data.tags["mlflow.note.content"].startswith("- ")  # the verdict is its description
    artifacts = {a.path for a in client.list_artifacts(parent, "report")}
    assert {"report/report.md", "report/val_cosine.png", "report/val_top1.png"} <= artifacts

    # The table's numbers are the mean of the trials' final values.
    table = json.loads(Path(client.download_artifacts(parent, "comparison.json", str(workdir))).read_text())
    rows = [dict(zip(table["columns"], row, strict=True)) for row in table["data"]]
    cosine = next(r for r in rows if (r["experiment"], r["metric"], r["at"]) == ("infonce", "val/cosine", "final"))
    finals = [t.user_attrs["final"]["val/cosine"] for t in trials if t.params["experiment"] == "infonce"]
    assert cosine["mean"] == pytest.approx(sum(finals) / 2)
    top1 = [t.user_attrs["test"]["test/top1"] for t in trials if t.params["experiment"] == "baseline"]
    assert parent_run.data.metrics["baseline/test/top1"] == pytest.approx(sum(top1) / 2)
    assert [t.value for t in trials if t.params["experiment"] == "baseline"] == top1
    for child in children:  # each run's test metrics: one value, at its selected epoch
        (point,) = client.get_metric_history(child.info.run_id, "test/top1")
        assert point.step == int(child.data.tags["ablate.best_epoch"])
    selected = [r for r in rows if (r["metric"], r["at"]) == ("test/top1", "selected")]
    assert len(selected) == len(spec.experiments)
    report_md = (workdir / "reports" / study.study_name / "report.md").read_text()
    assert re.search(r"^\| baseline \(baseline\)( ★)? \| 2 \|", report_md, re.M)
    assert "Welch" in report_md and "Holm" in report_md
    assert "Each run keeps its epoch with the best val/mrr on validation; test metrics (test/top1 the headline) " \
        "score that model once and choose nothing; the winner is chosen on val/top1" in report_md
    assert "val/top1" in out and "baseline" in out

    # Running the same command again trains nothing and re-creates the report.
    code, out, err = run_cli(SUITE, monkeypatch, capsys)
    assert code == 0, err
    assert len(_child_runs(workdir, parent)) == 10
    assert len(study.get_trials()) == 10

    # More seeds extend the same study: only the new seed's trials are trained.
    more = [a if a != "0,1" else "0,1,2" for a in SUITE]
    code, out, err = run_cli(more, monkeypatch, capsys)
    assert code == 0, err
    assert len(_child_runs(workdir, parent)) == 15
    assert len(study.get_trials()) == 15
    assert "| baseline (baseline)" in (workdir / "reports" / study.study_name / "report.md").read_text()
    assert re.search(r"^\| baseline \(baseline\)( ★)? \| 3 \|",
                     (workdir / "reports" / study.study_name / "report.md").read_text(), re.M)
    run_cli(SUITE, monkeypatch, capsys)  # back to seeds 0 and 1: the report shows those only

    # `ablate report` rebuilds it from the stores alone.
    (workdir / "reports").rename(workdir / "old-reports")
    code, out, err = run_cli(["report", study.study_name], monkeypatch, capsys)
    assert code == 0, err
    assert (workdir / "reports" / study.study_name / "report.md").read_text() == report_md
    assert len(_child_runs(workdir, parent)) == 15
    # Published four times, the table on the parent holds one comparison, not four appended.
    again = workdir / "again"
    table = json.loads(Path(client.download_artifacts(parent, "comparison.json", str(again))).read_text())
    keys = [tuple(row[:3]) for row in table["data"]]
    assert len(keys) == len(set(keys)) and ("infonce", "val/top1", "final") in keys
    tables = json.loads(client.get_run(parent).data.tags["mlflow.loggedArtifacts"])
    assert tables == [{"path": "comparison.json", "type": "table"}]


@pytest.mark.slow
def test_an_interrupted_suite_resumes_where_it_stopped(workdir, monkeypatch, capsys):
    from ablate.study import worker

    real = worker._Objective.__call__
    calls = {"n": 0}

    def interrupt_third(self, trial):
        calls["n"] += 1
        if calls["n"] == 3:
            raise KeyboardInterrupt
        return real(self, trial)

    monkeypatch.setattr(worker._Objective, "__call__", interrupt_third)
    code, _, err = run_cli([*SUITE, "--jobs", "1", "--array", "1"], monkeypatch, capsys)  # one trial at a time
    assert code == 130
    assert "run the same command again to resume" in err
    study, _ = _study(workdir)
    states = [t.state for t in study.get_trials()]
    assert states.count(optuna.trial.TrialState.COMPLETE) == 2
    # the third was stopped before its run started: back in the queue as it was, nothing failed or left running
    assert states.count(optuna.trial.TrialState.WAITING) == 8 and len(states) == 10
    parent = study.user_attrs[records.PARENT_RUN]
    assert MlflowClient(f"sqlite:///{workdir / 'mlflow.db'}").get_run(parent).info.status == "KILLED"

    monkeypatch.setattr(worker._Objective, "__call__", real)
    code, _, err = run_cli(SUITE, monkeypatch, capsys)
    assert code == 0, err
    complete = study.get_trials(states=(optuna.trial.TrialState.COMPLETE,))
    assert len(complete) == 10
    assert len({(t.params["experiment"], t.params["seed"]) for t in complete}) == 10
    assert MlflowClient(f"sqlite:///{workdir / 'mlflow.db'}").get_run(parent).info.status == "FINISHED"


def test_changed_settings_start_a_new_suite_run():
    a = load_study("baseline-vs-multistage")
    b = load_study("baseline-vs-multistage", {"experiments.infonce.temperature": 0.1})
    c = load_study("baseline-vs-multistage", {"description": "same runs, other words"})
    assert study_name(a) != study_name(b)
    assert study_name(a) == study_name(c)


def test_a_misspelt_experiment_in_set_is_an_error_not_a_new_experiment():
    with pytest.raises(AblateError, match="no experiment 'infonse'; did you mean 'infonce'"):
        load_study("baseline-vs-multistage", {"experiments.infonse.temperature": 0.1})


def test_the_suite_file_encodes_the_quick_start_experiments():
    spec = load_study("baseline-vs-multistage")
    e = spec.experiments
    assert list(e) == ["baseline", "cosine", "infonce", "combined", "multistage"]
    assert (e["baseline"].loss, e["baseline"].lr, e["baseline"].batch_size) == ("mse", 1e-3, 16)
    assert (e["cosine"].loss, e["cosine"].lr, e["cosine"].batch_size) == ("cosine", 1e-3, 16)
    assert (e["infonce"].lr, e["infonce"].batch_size, e["infonce"].temperature) == (5e-4, 32, 0.07)
    assert (e["combined"].alpha, e["combined"].beta, e["combined"].gamma) == (0.5, 0.3, 0.2)
    assert (e["combined"].lr, e["combined"].batch_size) == (5e-4, 32)
    assert (e["multistage"].stage1_epochs, e["multistage"].stage2_epochs, e["multistage"].batch_size) == (50, 100, 32)
    assert all(r.epochs == 300 for r in e.values())
    assert spec.baseline_name == "baseline"
    assert len(spec.seeds) >= 3


def test_epochs_shortcut_keeps_the_multistage_proportions():
    spec = load_study("baseline-vs-multistage", epochs=60)
    m = spec.experiments["multistage"]
    assert (m.epochs, m.stage1_epochs, m.stage2_epochs, m.stage3_start) == (60, 10, 20, None)
    assert all(r.epochs == 60 for r in spec.experiments.values())


@pytest.mark.slow
def test_until_precise_adds_seeds_in_rounds_up_to_the_maximum(workdir, monkeypatch, capsys):
    # the headline at the final epoch on validation: the tiny data's test split is too small to vary by seed
    base = [a for a in SUITE if a not in ("--seeds", "0,1")] + ["--set", "objective=val/top1"]
    code, out, err = run_cli([*base, "--seeds", "0,1", "--until-precise", "1e-9", "--max-seeds", "4"], monkeypatch,
                             capsys)
    assert code == 0, err + out
    text = " ".join(out.split())
    assert "2 seeds: the widest val/top1 interval is" in text and "adding seeds 2..3" in text
    assert "4 seeds (--max-seeds): the widest val/top1 interval is still" in text
    study, _ = _study(workdir)
    assert sorted({t.params["seed"] for t in study.get_trials()}) == [0, 1, 2, 3]
    assert len(study.get_trials(states=(optuna.trial.TrialState.COMPLETE,))) == 20

    # precise enough already: nothing is added
    code, out, err = run_cli([*base, "--seeds", "0,1,2,3", "--until-precise", "100"], monkeypatch, capsys)
    assert code == 0, err + out
    assert "4 seeds: every val/top1 interval is within ± 100" in " ".join(out.split())
    assert len(study.get_trials()) == 20


@pytest.mark.slow
def test_the_parent_run_spans_the_study_not_the_command_that_ends_it(workdir, monkeypatch, capsys, mlflow_template):
    import time

    code, out, err = run_cli([*SUITE, "--seeds", "0", "--epochs", "2", "--jobs", "1", "--array", "1"],
                             monkeypatch, capsys)
    assert code == 0, err + out
    study = optuna.load_study(study_name=re.search(r"study (\S+) in", out)[1],
                              storage=f"sqlite:///{workdir / 'optuna.db'}")
    trials = study.get_trials()
    first = min(t.datetime_start for t in trials).timestamp() * 1000
    last = max(t.datetime_complete for t in trials).timestamp() * 1000
    client = MlflowClient(f"sqlite:///{workdir / 'mlflow.db'}")
    parent = study.user_attrs[records.PARENT_RUN]
    assert abs(client.get_run(parent).info.end_time - last) < 1000

    # A command stopped after the last trial but before it ended the parent run leaves it RUNNING;
    # a later report ends it, at the study's end, not its own.
    client.update_run(parent, "RUNNING")
    time.sleep(2)
    code, out, err = run_cli(["report", study.study_name, "--out", "again"], monkeypatch, capsys)
    assert code == 0, err + out
    run = client.get_run(parent).info
    assert run.status == "FINISHED"
    assert abs(run.end_time - last) < 1000

    # A report into another MLflow store makes the parent run there: it starts and ends with the study.
    time.sleep(1)
    shutil.copy(mlflow_template, workdir / "moved.db")
    moved = f"sqlite:///{workdir / 'moved.db'}"
    code, out, err = run_cli(["report", study.study_name, "--out", "moved", "--tracking-uri", moved],
                             monkeypatch, capsys)
    assert code == 0, err + out
    study = optuna.load_study(study_name=study.study_name, storage=f"sqlite:///{workdir / 'optuna.db'}")
    run = MlflowClient(moved).get_run(study.user_attrs[records.PARENT_RUN]).info
    assert run.status == "FINISHED"
    assert abs(run.start_time - first) < 1000 and abs(run.end_time - last) < 1000
