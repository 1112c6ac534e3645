"""Checkpoints: a trial stopped at any epoch continues exactly as if it had never stopped."""

from __future__ import annotations

import math
import os
import shutil
import signal
import subprocess
import time

import optuna
import pytest
import torch
from mlflow import MlflowClient
from support import ablate_command, tiny_run

from ablate.study import records, studies
from ablate.training.splits import load_split
from ablate.training.trainer import Trainer


def _trained(trainer: Trainer, stop_after: int | None = None) -> list[dict[str, float]]:
    history = []
    for results in trainer.array():
        (result,) = results.values()
        history.append(result.metrics)
        if stop_after is not None and result.epoch == stop_after:
            break
    return history


@pytest.mark.parametrize("spec", [
    tiny_run(loss="infonce", learnable_temperature=True, temperature=0.2, lr=0.05, epochs=6),
    tiny_run(loss="multistage", stage1_epochs=2, stage2_epochs=2, epochs=6, model={"hidden": [16], "dropout": 0.3}),
    tiny_run(loss="combined", grad_clip=0.05, lr_schedule="cosine", warmup_epochs=2, epochs=6),
], ids=["learnable-temperature", "multistage-dropout", "combined-clipped-cosine"])
def test_a_run_restored_from_any_epoch_continues_exactly(spec):
    split = load_split(spec.data)
    train, val = split.train, split.val
    straight = _trained(Trainer(spec, train, val))
    for cut in (0, 2, 4):
        first = Trainer(spec, train, val)
        head = _trained(first, stop_after=cut)
        state = {**first.checkpoint(0, cut), "history": head}
        torch.manual_seed(12345)  # whatever the new process's random state, the checkpoint's is restored
        second = Trainer(spec, train, val)
        second.restore(0, state)
        assert second.start_epoch == cut + 1
        tail = _trained(second)
        for got, want in zip(head + tail, straight, strict=True):
            for key, value in want.items():
                if key != "epoch_seconds" and math.isfinite(value):
                    assert got[key] == pytest.approx(value, rel=1e-6, abs=1e-9), (cut, key)


def test_a_checkpoint_from_another_kind_of_device_resumes_with_a_fresh_dropout_stream():
    """A CUDA generator's state cannot seed a CPU one: the stream is reseeded from the seed and the epoch
    (as it is for a checkpoint written before runs had a stream of their own)."""
    spec = tiny_run(loss="infonce", epochs=4, model={"hidden": [16], "dropout": 0.3})
    split = load_split(spec.data)
    train, val = split.train, split.val
    first = Trainer(spec, train, val)
    head = _trained(first, stop_after=1)
    state = {**first.checkpoint(0, 1), "history": head}
    moved = {**state, "noise": torch.zeros(16, dtype=torch.uint8), "noise_device": "cuda"}
    old = {k: v for k, v in state.items() if k not in ("noise", "noise_device")}
    tails = []
    for saved in (moved, old):
        second = Trainer(spec, train, val)
        second.restore(0, saved)
        tails.append([{k: v for k, v in m.items() if k != "epoch_seconds"} for m in _trained(second)])
    assert len(tails[0]) == 2 and tails[0] == tails[1]
    straight = _trained(Trainer(spec, train, val))
    assert tails[0][0]["train/loss"] != straight[2]["train/loss"]  # other masks than the run never stopped


SUITE_FILE = """
kind = "suite"
name = "resume"
objective = "val/mrr"
seeds = [0]
[base]
epochs = {epochs}
batch_size = 16
data = {{ source = "pairs.npz" }}
model = {{ hidden = [16] }}
[experiments.infonce]
loss = "infonce"
lr = 0.01
"""


@pytest.mark.slow
def test_a_trial_killed_mid_run_resumes_from_its_checkpoint_and_ends_as_if_never_stopped(workdir, tmp_path,
                                                                                          mlflow_template, request):
    epochs = 300  # seconds of training on the tiny data: the kill lands while the trial trains
    (workdir / "resume.toml").write_text(SUITE_FILE.format(epochs=epochs))
    args = ["run-suite", "resume.toml", "--jobs", "1", "--array", "1", "--heartbeat", "1"]
    # the same suite, never stopped, in another folder (on the other core, meanwhile)
    other = tmp_path / "straight"
    other.mkdir()
    shutil.copy(mlflow_template, other / "mlflow.db")
    suite = SUITE_FILE.format(epochs=epochs).replace("pairs.npz", str(workdir / "pairs.npz"))
    (other / "resume.toml").write_text(suite)
    log = (tmp_path / "straight.log").open("w")
    straight_run = subprocess.Popen(ablate_command(*args), cwd=other, stdout=log, stderr=subprocess.STDOUT)
    request.addfinalizer(straight_run.kill)  # if the test fails before it ends
    proc = subprocess.Popen(ablate_command(*args), cwd=workdir, stdout=subprocess.DEVNULL,
                            stderr=subprocess.STDOUT, start_new_session=True)
    storage = studies.open_storage(f"sqlite:///{workdir / 'optuna.db'}", heartbeat_seconds=None)
    deadline, checkpoint = time.time() + 180, None
    while time.time() < deadline and proc.poll() is None:
        time.sleep(0.1)
        try:
            trials = studies.load("resume", storage).study.get_trials(states=(optuna.trial.TrialState.RUNNING,))
        except Exception:
            continue
        # the first checkpoint will do: how soon the next one comes depends on what the first cost (a budget of
        # the time), which a busy machine can stretch past the end of the trial
        if trials and (checkpoint := trials[0].user_attrs.get(records.CHECKPOINT)) is not None:
            break
    assert checkpoint is not None and proc.poll() is None, "no checkpoint was written while the trial ran"
    os.killpg(proc.pid, signal.SIGKILL)
    proc.wait(timeout=30)

    done = subprocess.run(ablate_command(*args), cwd=workdir, capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stdout + done.stderr
    study = studies.load("resume", storage).study
    (resumed,) = study.get_trials(states=(optuna.trial.TrialState.COMPLETE,))
    client = MlflowClient(f"sqlite:///{workdir / 'mlflow.db'}")
    run = client.get_run(resumed.user_attrs[records.RUN_ID])
    started = int(run.data.tags["ablate.resumed_from_epoch"])
    assert checkpoint + 1 <= started < epochs
    steps = sorted(m.step for m in client.get_metric_history(run.info.run_id, "val/mrr"))
    assert steps == list(range(epochs))  # one metric history, every epoch once
    assert "checkpoint" not in {a.path for a in client.list_artifacts(run.info.run_id)}  # removed once finished

    assert straight_run.wait(timeout=600) == 0, (tmp_path / "straight.log").read_text()
    (straight,) = studies.load("resume", studies.open_storage(f"sqlite:///{other / 'optuna.db'}")).study.get_trials(
        states=(optuna.trial.TrialState.COMPLETE,))
    for key, value in straight.user_attrs[records.FINAL].items():
        if key != "epoch_seconds":
            assert resumed.user_attrs[records.FINAL][key] == pytest.approx(value, rel=1e-6, abs=1e-9), key
