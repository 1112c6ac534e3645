"""`ablate submit --scheduler slurm` on a real SLURM (`.ci/slurm` starts a single-node one) and an Optuna storage on
PostgreSQL: a job array finishes a study with each trial once; a task cancelled mid-trial, or stopped by its time
limit, hands its trial on to be continued from its checkpoint, nothing lost or trained twice."""

from __future__ import annotations

import os
import re
import shutil
import subprocess
import time
from pathlib import Path
from typing import Any

import optuna
import pytest
from support import TINY, ablate_command, run_cli

from ablate.specs import SyntheticSpec
from ablate.study import records
from ablate.training.data import synthetic_pairs

SEARCH = """\
kind = "search"
name = "{name}"
n_trials = {trials}
[base]
loss = "infonce"
epochs = {epochs}
batch_size = 16
data = {{ source = "{data}" }}
model = {{ hidden = [16] }}
[params.temperature]
type = "float"
low = 0.05
high = 0.5
[pruner]
type = "none"
"""


def _slurm_up() -> bool:
    if shutil.which("sbatch") is None or shutil.which("sinfo") is None:
        return False
    out = subprocess.run(["sinfo", "-h", "-o", "%T"], capture_output=True, text=True, timeout=10)
    return out.returncode == 0 and any(s in out.stdout for s in ("idle", "mixed", "allocated"))


slurm = pytest.mark.skipif(not _slurm_up(), reason="no SLURM cluster answers here (.ci/slurm starts one)")


@pytest.fixture
def study(workdir: Path, postgres_url: str, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
          ) -> Any:
    """A search created (not trained) on PostgreSQL; returns a function (name, trials, epochs) -> its full name."""
    monkeypatch.setenv("ABLATE_STORAGE", postgres_url)
    monkeypatch.setenv("MLFLOW_TRACKING_URI", f"sqlite:///{workdir / 'mlflow.db'}")
    synthetic_pairs(TINY).save(workdir / "pairs.npz")

    def make(name: str, trials: int, epochs: int) -> str:
        (workdir / f"{name}.toml").write_text(SEARCH.format(name=name, trials=trials, epochs=epochs,
                                                           data=workdir / "pairs.npz"))
        code, out, err = run_cli(["tune", f"{name}.toml", "--jobs", "0"], monkeypatch, capsys)
        assert code == 0, err
        return re.search(rf"study ({name}-\w+) in", out).group(1)  # type: ignore[union-attr]

    return make


def _submit(*args: str) -> str:
    done = subprocess.run(ablate_command("submit", *args), capture_output=True, text=True, timeout=120,
                          env=dict(os.environ))
    assert done.returncode == 0, done.stdout + done.stderr
    return re.search(r"submitted job (\d+)", done.stdout).group(1)  # type: ignore[union-attr]


def _wait(job: str, timeout: float = 300) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        out = subprocess.run(["squeue", "-h", "-j", job], capture_output=True, text=True).stdout
        if not out.strip():
            return
        time.sleep(0.5)
    subprocess.run(["scancel", job])
    pytest.fail(f"job {job} still running after {timeout} s")


def _trials(name: str) -> list[optuna.trial.FrozenTrial]:
    return optuna.load_study(study_name=name, storage=os.environ["ABLATE_STORAGE"]).get_trials(deepcopy=False)


def _runs(workdir: Path, name: str) -> list[Any]:
    from mlflow import MlflowClient

    client = MlflowClient(tracking_uri=f"sqlite:///{workdir / 'mlflow.db'}")
    exp = client.get_experiment_by_name(name.rsplit("-", 1)[0])
    return [r for r in client.search_runs([exp.experiment_id]) if "ablate.trial" in r.data.tags]


def _each_configuration_once(name: str, trials: int) -> list[optuna.trial.FrozenTrial]:
    done = [t for t in _trials(name) if t.state == optuna.trial.TrialState.COMPLETE]
    assert len(done) == trials and len({t.params["temperature"] for t in done}) == trials
    assert not [t for t in _trials(name) if t.state in (optuna.trial.TrialState.RUNNING,
                                                        optuna.trial.TrialState.WAITING)]
    return done


@slurm
@pytest.mark.slow
def test_a_two_task_array_finishes_a_ten_trial_study_each_trial_once(workdir, study):
    name = study("array", 10, 20)
    job = _submit(name, "--workers", "2", "--array", "1", "--heartbeat", "2")
    script = (workdir / "slurm" / f"{name}.sbatch").read_text()
    assert "#SBATCH --array=0-1" in script and "#SBATCH --signal=B:TERM@120" in script and "--requeue" in script
    assert "--storage" not in script and "--tracking-uri" not in script  # the URLs come from the environment
    _wait(job)
    done = _each_configuration_once(name, 10)
    runs = _runs(workdir, name)
    assert sorted(int(r.data.tags["ablate.trial"]) for r in runs) == sorted(t.number for t in done)
    assert all(re.fullmatch(rf"{job}_[01]", r.data.tags["ablate.slurm_job"]) for r in runs)
    assert all(t.user_attrs[records.SCHEDULER_JOB].startswith(f"{job}_") for t in done)
    shown = subprocess.run(ablate_command("studies", "show", name), capture_output=True, text=True, timeout=120)
    assert f"SLURM job {job}_" in shown.stdout


@slurm
@pytest.mark.slow
def test_scancel_of_one_task_mid_trial_hands_its_trial_on_and_the_study_still_finishes(workdir, study):
    name = study("cancel", 6, 400)
    job = _submit(name, "--workers", "2", "--array", "1", "--heartbeat", "2")
    deadline = time.monotonic() + 120
    victim = None
    while victim is None and time.monotonic() < deadline:  # task 1's trial, running with a checkpoint
        victim = next((t for t in _trials(name) if t.state == optuna.trial.TrialState.RUNNING
                       and t.user_attrs.get(records.SCHEDULER_JOB) == f"{job}_1"
                       and t.user_attrs.get(records.CHECKPOINT) is not None), None)
        time.sleep(0.1)
    assert victim is not None, "task 1 never ran a trial"
    subprocess.run(["scancel", f"{job}_1"], check=True)
    _wait(job)
    done = _each_configuration_once(name, 6)
    stopped = next(t for t in _trials(name) if t.number == victim.number)
    assert stopped.state == optuna.trial.TrialState.FAIL and stopped.user_attrs[records.ERROR] == records.INTERRUPTED
    (after,) = [t for t in done if t.user_attrs.get(records.RESUMES) == victim.number]
    assert after.user_attrs[records.SCHEDULER_JOB] == f"{job}_0"
    run = next(r for r in _runs(workdir, name) if r.info.run_id == after.user_attrs[records.RUN_ID])
    assert int(run.data.tags["ablate.resumed_from_epoch"]) > 0 and run.info.status == "FINISHED"
    assert all(r.info.status == "FINISHED" for r in _runs(workdir, name))


SUITE = """\
kind = "suite"
name = "limit"
seeds = [0]
objective = "val/mrr"
[base]
loss = "infonce"
epochs = {epochs}
batch_size = 16
data = {{ source = "{data}" }}
model = {{ hidden = [256, 256] }}
[experiments.long]
"""
LONG_EPOCHS = 500
"""About 90 s of training on LARGE pairs (longer under load): longer than the time before SLURM's signal, which
SLURM may send up to 60 s early: with a 2-minute limit and --signal-before 45 it comes 15 to 75 s in."""
LARGE = SyntheticSpec(n_ligands=2000, n_families=200, pocket_dim=8, ligand_dim=12, latent_dim=4)


@slurm
@pytest.mark.slow
def test_a_task_out_of_time_checkpoints_and_its_trial_resumes_mid_run_in_the_next_task(workdir, study, monkeypatch,
                                                                                      capsys):
    synthetic_pairs(LARGE).save(workdir / "large.npz")
    (workdir / "limit.toml").write_text(SUITE.format(epochs=LONG_EPOCHS, data=workdir / "large.npz"))
    code, out, err = run_cli(["run-suite", "limit.toml", "--jobs", "0"], monkeypatch, capsys)
    assert code == 0, err
    name = re.search(r"study (limit-\w+) in", out).group(1)  # type: ignore[union-attr]
    reference = workdir / "reference"  # the same run, never stopped, beside it
    reference.mkdir()
    alone = subprocess.Popen(ablate_command(
        "train", "--loss-fn", "infonce", "--data", str(workdir / "large.npz"), "--epochs", str(LONG_EPOCHS),
        "--batch-size", "16", "--set", "model.hidden=[256,256]", "--seed", "0", "--tracking-uri",
        f"sqlite:///{reference / 'mlflow.db'}"), cwd=reference, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
        text=True, env={k: v for k, v in os.environ.items() if k not in ("ABLATE_STORAGE", "MLFLOW_TRACKING_URI")})
    job = _submit(name, "--workers", "1", "--time", "2", "--signal-before", "45", "--heartbeat", "2")
    _wait(job, timeout=240)
    (stopped,) = [t for t in _trials(name) if t.state == optuna.trial.TrialState.FAIL]
    assert stopped.user_attrs[records.ERROR] == records.INTERRUPTED
    assert 0 < stopped.user_attrs[records.CHECKPOINT] < LONG_EPOCHS - 1  # it stopped mid-run, checkpointed
    log = next((workdir / "slurm" / "logs").glob(f"{name}-{job}_0.out")).read_text()
    assert "interrupted" in log
    _wait(_submit(name, "--workers", "1", "--heartbeat", "2"), timeout=300)  # the next task continues it
    (after,) = [t for t in _trials(name) if t.state == optuna.trial.TrialState.COMPLETE]
    assert after.user_attrs[records.RESUMES] == stopped.number
    run = next(r for r in _runs(workdir, name) if r.info.run_id == after.user_attrs[records.RUN_ID])
    assert int(run.data.tags["ablate.resumed_from_epoch"]) == stopped.user_attrs[records.CHECKPOINT] + 1
    out, _ = alone.communicate(timeout=600)
    assert alone.returncode == 0, out[-2000:]
    from mlflow import MlflowClient

    client = MlflowClient(tracking_uri=f"sqlite:///{reference / 'mlflow.db'}")
    (never,) = client.search_runs([client.get_experiment_by_name("ablate").experiment_id])
    for key in ("val/mrr", "val/top1", "test/mrr", "test/top1", "train/loss"):
        assert run.data.metrics[key] == pytest.approx(never.data.metrics[key], abs=1e-6), key
