"""`ablate roadmap`: phases of studies, decisions on validation, tuned settings carried forward, a registered model.

One roadmap is trained once for the session (`trained_roadmap`) on small synthetic pairs; the tests read its stores,
and the ones that need more (a re-run, Ctrl-C in phase 2, a failed decision) run beside it.
"""

from __future__ import annotations

import json
import math
import os
import re
import shutil
import signal
import sqlite3
import subprocess
import time
from pathlib import Path
from typing import Any

import numpy as np
import optuna
import pytest
import torch
from scipy import stats as sps
from support import ablate_command, independent_retrieval, run_cli

from ablate.specs import SyntheticSpec
from ablate.study import records
from ablate.training.data import synthetic_pairs

SMALL = SyntheticSpec(n_ligands=400, pocket_dim=8, ligand_dim=12, latent_dim=4)
"""Enough pairs (about 380 to train) for the batch search's largest batch of 256."""
ARGS = ["roadmap", "--data", "pairs.npz", "--epochs", "12", "--n-trials", "3", "--seeds", "0,1,2",
        "--set", "model.hidden=[16]", "--force", "--jobs", "1"]
"""A short roadmap: the full runs 12 epochs, the quick check 2, the searches 3 trials; --force goes past decisions
that so few epochs may fail."""
MODEL = "ablate-quick-start"


def _roadmap(folder: Path, *args: str, timeout: float = 600) -> subprocess.CompletedProcess[str]:
    env = {**os.environ, "COLUMNS": "200"}
    for var in ("MLFLOW_TRACKING_URI", "ABLATE_STORAGE"):
        env.pop(var, None)
    return subprocess.run(ablate_command(*args), cwd=folder, capture_output=True, text=True, timeout=timeout, env=env)


@pytest.fixture(scope="session")
def trained_roadmap(tmp_path_factory: pytest.TempPathFactory, mlflow_template: Path) -> tuple[Path, str]:
    """A finished roadmap (its folder and output), trained once for the session."""
    folder = tmp_path_factory.mktemp("roadmap")
    synthetic_pairs(SMALL).save(folder / "pairs.npz")
    shutil.copy(mlflow_template, folder / "mlflow.db")
    done = _roadmap(folder, *ARGS)
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    return folder, done.stdout


def _identity(out: str) -> str:
    found = re.search(r"^roadmap (\S+): ", out, re.M)
    assert found, out[-2000:]
    return found.group(1)


def _studies(folder: Path) -> dict[str, optuna.Study]:
    storage = f"sqlite:///{folder / 'optuna.db'}"
    return {s.study_name: optuna.load_study(study_name=s.study_name, storage=storage)
            for s in optuna.get_all_study_summaries(storage)}


def _study(folder: Path, step: str) -> optuna.Study:
    (study,) = [s for name, s in _studies(folder).items() if name.startswith(f"quick-start-{step}-")]
    return study


def _by_seed(study: optuna.Study, experiment: str, metric: str) -> dict[int, float]:
    return {t.params["seed"]: t.user_attrs[records.SELECTED][metric] for t in study.get_trials(deepcopy=False)
            if t.state == optuna.trial.TrialState.COMPLETE and t.params["experiment"] == experiment}


def _client(folder: Path) -> Any:
    from mlflow import MlflowClient

    return MlflowClient(tracking_uri=f"sqlite:///{folder / 'mlflow.db'}")


# --------------------------------------------------------------------------------------
# The final model
# --------------------------------------------------------------------------------------


@pytest.mark.slow
def test_the_final_model_is_the_configuration_and_run_best_on_validation(trained_roadmap):
    folder, out = trained_roadmap
    ablation = _study(folder, "ablation")
    means = {e: float(np.mean(list(_by_seed(ablation, e, "val/top1").values())))
             for e in ("baseline", "cosine", "infonce", "combined", "multistage")}
    chosen = max(means, key=lambda e: (means[e], -list(means).index(e)))
    seeds = _by_seed(ablation, chosen, "val/top1")
    seed = max(seeds, key=lambda s: (seeds[s], -s))
    (version,) = _client(folder).search_model_versions(f"name = '{MODEL}'")
    assert (version.tags["ablate.experiment"], version.tags["ablate.seed"]) == (chosen, str(seed))
    assert version.tags["ablate.chosen_by"] == "val/top1"
    assert version.tags["ablate.roadmap"] == _identity(out)
    run = _client(folder).get_run(version.run_id)
    assert run.data.tags["ablate.experiment"] == chosen and run.data.tags["ablate.seed"] == str(seed)
    assert version.tags["ablate.data_fingerprint"] == run.data.tags["ablate.data_fingerprint"] != ""
    # the description: the run's test metrics, and its configuration's test mean and 95 % interval over seeds
    tests = [t.user_attrs[records.TEST]["test/top1"] for t in ablation.get_trials(deepcopy=False)
             if t.params["experiment"] == chosen]
    mean, sem = float(np.mean(tests)), float(np.std(tests, ddof=1) / math.sqrt(len(tests)))
    half = sps.t.ppf(0.975, len(tests) - 1) * sem
    assert f"test/top1 over 3 seeds: {mean:.4g} [95 % CI {mean - half:.4g}, {mean + half:.4g}]" in version.description
    assert f"test/top1 {run.data.metrics['test/top1']:.4g}" in version.description
    assert f"registered as models:/{MODEL}/1" in out


@pytest.mark.slow
def test_the_registered_model_loads_and_reproduces_its_logged_test_metrics(trained_roadmap):
    import mlflow.pytorch

    folder, _ = trained_roadmap
    mlflow.set_tracking_uri(f"sqlite:///{folder / 'mlflow.db'}")
    try:
        model = mlflow.pytorch.load_model(f"models:/{MODEL}/latest")
    finally:
        mlflow.set_tracking_uri(None)
    (version,) = _client(folder).search_model_versions(f"name = '{MODEL}'")
    run = _client(folder).get_run(version.run_id)
    parent = run.data.tags["mlflow.parentRunId"]  # the suite's parent run holds its split
    split = json.loads(Path(_client(folder).download_artifacts(parent, "split.json", str(folder))).read_text())
    raw = dict(np.load(folder / "pairs.npz"))
    rows = split["test"]
    with torch.no_grad():
        pred = model(torch.from_numpy(raw["pocket"][rows]))
    want = independent_retrieval(pred, torch.from_numpy(raw["ligand"][rows]), torch.from_numpy(raw["ligand_id"][rows]))
    assert run.data.metrics["test/top1"] == pytest.approx(want["top1"], abs=1e-9)
    assert run.data.metrics["test/mrr"] == pytest.approx(want["mrr"], rel=1e-6)
    assert run.data.metrics["test/cosine"] == pytest.approx(want["cosine"], rel=1e-5)


# --------------------------------------------------------------------------------------
# Decisions and tuned settings
# --------------------------------------------------------------------------------------


@pytest.mark.slow
@pytest.mark.parametrize(("step", "experiment", "metric"), [("quick-check", "cosine", "val/cosine"),
                                                          ("infonce", "infonce", "val/top1")])
def test_each_decision_is_its_rule_on_an_independent_paired_test(trained_roadmap, step, experiment, metric):
    folder, out = trained_roadmap
    study = _study(folder, step)
    a, b = _by_seed(study, experiment, metric), _by_seed(study, "baseline", metric)
    seeds = sorted(a)
    diffs = [a[s] - b[s] for s in seeds]
    p = float(sps.ttest_rel([a[s] for s in seeds], [b[s] for s in seeds]).pvalue)
    passed = float(np.mean(diffs)) > 0 and p < 0.05
    line = next(x for x in out.splitlines() if " decision: " in x and f"{experiment} against baseline" in x)
    assert (" decision: passed:" in line) == passed
    assert f"difference {float(np.mean(diffs)):+.4f}" in line and f"Holm p = {p:.3g}" in line
    (version,) = _client(folder).search_model_versions(f"name = '{MODEL}'")
    assert version.tags[f"ablate.decision.{'quick-check' if step == 'quick-check' else 'infonce'}"].startswith(
        "passed" if passed else "failed (--force: going on)")


@pytest.mark.slow
def test_later_studies_train_with_the_values_each_search_found_best_on_validation(trained_roadmap):
    folder, _ = trained_roadmap

    def best(step: str) -> dict[str, object]:
        study = _study(folder, step)
        top = max((t for t in study.trials if t.state == optuna.trial.TrialState.COMPLETE), key=lambda t: t.value)
        return dict(top.user_attrs[records.VALUES])

    temperature, batch, weights, stages = best("temperature"), best("batch"), best("weights"), best("stages")
    spec = json.loads(json.dumps(_study(folder, "ablation").user_attrs[records.SPEC]))
    runs = spec["experiments"]
    assert runs["infonce"]["temperature"] == temperature["temperature"]
    assert runs["infonce"]["batch_size"] == batch["batch_size"] and runs["infonce"]["lr"] == batch["lr"]
    assert runs["combined"]["alpha"] == weights["alpha"] and runs["combined"]["gamma"] == weights["gamma"]
    assert (runs["multistage"]["stage1_epochs"], runs["multistage"]["stage2_epochs"]) == (
        stages["stage1_epochs"], stages["stage2_epochs"])  # the stages search ran at the full epochs too
    assert runs["baseline"]["batch_size"] == 16 and runs["baseline"]["lr"] == 1e-3  # the baseline takes nothing
    base = _study(folder, "batch").user_attrs[records.SPEC]["base"]
    assert base["temperature"] == temperature["temperature"]


@pytest.mark.slow
def test_the_report_says_each_phase_its_decision_and_what_chose_the_final_model(trained_roadmap):
    folder, out = trained_roadmap
    identity = _identity(out)
    report = (folder / "reports" / f"roadmap-{identity}" / "report.md").read_text()
    for heading in ("## Phase 1: Quick check", "## Phase 2: InfoNCE", "## Phase 3: Combination", "## Tuned settings",
                    "## The final model", "## Plots"):
        assert heading in report
    assert report.count("**Decision: ") == 2
    assert "Chosen on validation" in report and "never used to choose" in report
    assert f"Registered as `models:/{MODEL}/1`" in report
    for key in ("temperature", "batch_size", "alpha", "stage1_epochs"):
        assert re.search(rf"^\| {key} \| ", report, re.M)
    client = _client(folder)
    (run,) = client.search_runs([client.get_experiment_by_name("quick-start").experiment_id])
    assert run.data.tags["ablate.roadmap"] == identity and run.info.status == "FINISHED"
    assert {f.path for f in client.list_artifacts(run.info.run_id, "report")} >= {"report/report.md"}
    assert "ablate.decision.quick-check" in run.data.tags
    assert re.search(r"phase quick-check: [\d.]+ s of training", out)


@pytest.mark.slow
def test_a_rerun_trains_nothing_and_finds_the_same_registered_version(trained_roadmap, tmp_path):
    folder = tmp_path / "copy"
    shutil.copytree(trained_roadmap[0], folder)
    before = {name: len(s.trials) for name, s in _studies(folder).items()}
    again = _roadmap(folder, *ARGS)
    assert again.returncode == 0, again.stderr[-2000:]
    assert "training " not in again.stdout and "(registered before)" in again.stdout
    assert {name: len(s.trials) for name, s in _studies(folder).items()} == before
    assert len(_client(folder).search_model_versions(f"name = '{MODEL}'")) == 1
    # --until-phase stops after a phase, here with nothing left to train
    partial = _roadmap(folder, *ARGS, "--until-phase", "2", "--out", "partial")
    assert partial.returncode == 0 and "stopped after phase 2 (--until-phase)" in partial.stdout
    report = next((folder / "partial").glob("roadmap-*-until-phase-2/report.md")).read_text()
    assert "--until-phase 2" in report and "## The final model" not in report


@pytest.mark.slow
def test_ctrl_c_in_phase_2_and_a_rerun_end_with_the_same_model_and_decisions(trained_roadmap, tmp_path,
                                                                            mlflow_template):
    folder = tmp_path / "interrupted"
    folder.mkdir()
    shutil.copy(trained_roadmap[0] / "pairs.npz", folder)
    shutil.copy(mlflow_template, folder / "mlflow.db")
    env = {**os.environ, "COLUMNS": "200"}
    proc = subprocess.Popen(ablate_command(*ARGS), cwd=folder, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                            text=True, env=env)
    deadline = time.monotonic() + 300
    while time.monotonic() < deadline and proc.poll() is None:  # a trial of phase 2's batch search is running
        try:
            with sqlite3.connect(folder / "optuna.db", timeout=1) as db:
                running = db.execute("SELECT count(*) FROM trials JOIN studies USING (study_id) WHERE study_name "
                                     "LIKE 'quick-start-batch-%' AND state = 'RUNNING'").fetchone()[0]
        except sqlite3.Error:
            running = 0
        if running:
            break
        time.sleep(0.05)
    proc.send_signal(signal.SIGINT)
    first, _ = proc.communicate(timeout=120)
    assert proc.returncode == 130, first[-2000:]
    assert "step infonce" not in first  # stopped inside phase 2, in a trial of the batch search
    batch = _study(folder, "batch").trials  # a trial stopped in training continues; one stopped while taken waits again
    assert not [t for t in batch if t.state == optuna.trial.TrialState.RUNNING]
    for t in batch:
        if t.user_attrs.get(records.ERROR) == records.INTERRUPTED:
            assert [c for c in batch if c.user_attrs.get(records.RESUMES) == t.number]
    done = _roadmap(folder, *ARGS)
    assert done.returncode == 0, done.stdout[-2000:] + done.stderr[-2000:]
    mine, theirs = _studies(folder), _studies(trained_roadmap[0])
    assert set(mine) == set(theirs)  # every study the same settings, so the same name

    def complete(study: optuna.Study) -> list[tuple[str, float]]:
        return sorted((json.dumps(t.params, sort_keys=True), float(t.value or 0)) for t in study.trials
                      if t.state == optuna.trial.TrialState.COMPLETE)

    for name, study in mine.items():  # each configuration trained once, to the same value as never interrupted
        assert complete(study) == complete(theirs[name]), name
    (a,) = _client(folder).search_model_versions(f"name = '{MODEL}'")
    (b,) = _client(trained_roadmap[0]).search_model_versions(f"name = '{MODEL}'")
    decisions = {k: v for k, v in a.tags.items() if k.startswith("ablate.decision.")}
    assert decisions == {k: v for k, v in b.tags.items() if k.startswith("ablate.decision.")} and decisions
    assert (a.tags["ablate.experiment"], a.tags["ablate.seed"]) == (b.tags["ablate.experiment"], b.tags["ablate.seed"])
    assert _client(folder).get_run(a.run_id).data.metrics["test/top1"] == \
        _client(trained_roadmap[0]).get_run(b.run_id).data.metrics["test/top1"]


# --------------------------------------------------------------------------------------
# A failed decision, the plan's mistakes, --dry-run
# --------------------------------------------------------------------------------------


def _no_direction(path: Path, n: int = 240, seed: int = 0) -> None:
    """Pairs whose targets' directions are random: only their norms follow the pockets, so cosine cannot help."""
    rng = np.random.default_rng(seed)
    pocket = rng.normal(size=(n, 8)).astype(np.float32)
    direction = rng.normal(size=(n, 12))
    direction /= np.linalg.norm(direction, axis=1, keepdims=True)
    ligand = (direction * (1.0 + np.abs(pocket[:, :1]) * 3)).astype(np.float32)
    np.savez(path, pocket=pocket, ligand=ligand, ligand_id=np.arange(n))


@pytest.mark.slow
def test_a_failed_decision_stops_the_roadmap_with_advice_and_exit_code_0(workdir, monkeypatch, capsys):
    _no_direction(workdir / "flat.npz")
    code, out, err = run_cli(["roadmap", "--data", "flat.npz", "--epochs", "30", "--seeds", "0,1,2",
                              "--set", "model.hidden=[16]", "--jobs", "1"], monkeypatch, capsys)
    assert code == 0, err
    assert re.search(r"phase 1 decision: failed: cosine against baseline on val/cosine", out)
    assert "advice: Cosine does not improve on MSE here" in out and "--force" in out
    assert "phase 2/3" not in out
    assert [s.study_name.rsplit("-", 1)[0] for s in optuna.get_all_study_summaries("sqlite:///optuna.db")] == [
        "quick-start-quick-check"]
    report = next((workdir / "reports").glob("roadmap-*/report.md")).read_text()
    assert "**The roadmap stopped: phase 1 (quick-check): the decision failed" in report
    assert "Advice: Cosine does not improve" in report and "Not reached." in report
    from mlflow import MlflowClient

    assert MlflowClient(tracking_uri="sqlite:///mlflow.db").search_registered_models() == []


@pytest.mark.parametrize(("args", "message"), [
    (["--set", "phases.quick-check.decision.metric=test/cosine"], "a decision cannot read a test metric"),
    (["--set", "phases.quick-check.decision.metric=train/loss"], "a decision reads a validation metric (val/...)"),
    (["--set", "seeds.0=5"], "--set seeds.0: seeds is a list of values; give all of it"),
    (["--set", "phases.nope.title=x"], "no phase named 'nope' (the plan has: quick-check, infonce, combination)"),
    (["--set", "bogus=1"], "--set bogus: neither a roadmap setting"),
    (["--set", "phases.combination.steps.ablation.tuned.combined=[\"later\"]"], "'later', which is not a search step"),
    (["--set", "phases.infonce.decision.experiment=cosine"],
     "the decision's experiment 'cosine' must be one of infonce"),
    (["--until-phase", "4"], "--until-phase 4: the plan has 3 phases"),
    (["--jobs", "0"], "--jobs 0: a roadmap trains each phase before it decides"),
    (["--plan", "temperature"], "not a roadmap (kind = 'search'); run it with `ablate tune temperature`"),
])
@pytest.mark.bare
def test_a_plan_mistake_is_one_line_and_creates_nothing(workdir, monkeypatch, capsys, args, message):
    code, _out, err = run_cli(["roadmap", *args], monkeypatch, capsys)
    assert code == 2 and message in err and len(err.strip().splitlines()) == 1, err
    assert not (workdir / "optuna.db").exists() and not (workdir / "mlflow.db").exists()


@pytest.mark.bare
def test_dry_run_prints_the_studies_trials_and_epochs_of_each_phase(workdir, monkeypatch, capsys):
    code, out, _ = run_cli(["roadmap", "--dry-run", "--epochs", "30", "--n-trials", "4", "--seeds", "0,1,2"],
                           monkeypatch, capsys)
    assert code == 0
    # 50 of 300 epochs -> 5 of 30; the searches 100 -> 10 and 60 -> 6 epochs; suites 2 (or 5) experiments x 3 seeds
    for line in ("quick-check: suite quick-start-quick-check: 2 experiments x 3 seeds = 6 trials x 5 epochs = 30 "
                 "epochs",
                 "temperature: search quick-start-temperature: temperature on val/mrr = 4 trials x 10 epochs = 40",
                 "batch: search quick-start-batch: batch_size on val/mrr = 4 trials x 6 epochs = 24 epochs; takes "
                 "temperature tuned",
                 "phase 1: at most 30 run-epochs",
                 "ablation: suite quick-start-ablation: 5 experiments x 3 seeds = 15 trials x 30 epochs = 450 epochs",
                 "final: the winner of ablation on validation, registered as ablate-quick-start; at most 884 "
                 "run-epochs in all"):
        assert line in out, out
    assert not {"optuna.db", "mlflow.db", "reports"} & {p.name for p in workdir.iterdir()}
