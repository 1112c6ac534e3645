"""`ablate tune stages`: a search over the multi-stage schedule's division of the run's epochs."""

from __future__ import annotations

import optuna
import pytest
from mlflow.tracking import MlflowClient
from support import run_cli

from ablate.errors import AblateError
from ablate.study.designs import from_document
from ablate.study.space import divide
from ablate.study.studyfiles import load_study


def test_a_division_gives_whole_epochs_within_the_run_and_keeps_a_stage_after_the_warm_up():
    assert divide(["stage1_epochs", "stage2_epochs"], [0.25, 0.5, 0.25], 300) == {"stage1_epochs": 75,
                                                                                  "stage2_epochs": 150}
    assert divide(["stage1_epochs", "stage2_epochs"], [1.0, 0.0, 0.0], 300) == {"stage1_epochs": 299,
                                                                                "stage2_epochs": 0}
    spec = load_study("stages", {}, epochs=40)
    study = optuna.create_study()
    for _ in range(30):
        run = spec.suggest(study.ask()).run
        assert 0 <= run.stage1_epochs < run.epochs == 40
        assert run.stage1_epochs + run.stage2_epochs <= 40 and run.stage3_start is None
    corners = [(r.stage1_epochs, r.stage2_epochs) for _, r in spec.preflight_runs()[1:]]
    assert corners == [(39, 0), (0, 40), (0, 0)]


@pytest.mark.parametrize(("change", "message"), [
    ({"base": {"loss": "infonce", "epochs": 10}}, "the base loss 'infonce' has none"),
    ({"params": {"stages": {"type": "division", "names": ["stage2_epochs", "stage1_epochs"]}}},
     "names must be the base loss's stage lengths, in order"),
    ({"base": {"loss": "multistage", "epochs": 10, "stage1_epochs": 2, "stage2_epochs": 3, "stage3_start": 8}},
     "the base run sets stage3_start"),
])
def test_a_division_that_cannot_split_the_stages_is_refused(change, message):
    doc = {"kind": "search", "name": "s", "objective": "val/mrr", "n_trials": 2,
           "base": {"loss": "multistage", "epochs": 10, "stage1_epochs": 2, "stage2_epochs": 3},
           "params": {"stages": {"type": "division", "names": ["stage1_epochs", "stage2_epochs"]}}, **change}
    with pytest.raises(AblateError, match=message):
        from_document(doc, source="stages.toml")


def test_tune_stages_trains_each_division_and_logs_it(workdir, monkeypatch, capsys):
    code, _, err = run_cli(["tune", "stages", "--epochs", "6", "--n-trials", "3", "--data", "pairs.npz",
                            "--set", "model.hidden=[16]", "--set", "batch_size=16"], monkeypatch, capsys)
    assert code == 0, err
    client = MlflowClient(f"sqlite:///{workdir / 'mlflow.db'}")
    exp = client.get_experiment_by_name("stages")
    runs = [r for r in client.search_runs([exp.experiment_id]) if "ablate.trial" in r.data.tags]
    assert len(runs) == 3
    for r in runs:
        s1, s2 = int(r.data.params["stage1_epochs"]), int(r.data.params["stage2_epochs"])
        assert 0 <= s1 < 6 and s1 + s2 <= 6
        stages = [m.value for m in client.get_metric_history(r.info.run_id, "stage")]
        expected = [1.0 if e < s1 else 2.0 if e < s1 + s2 else 3.0 for e in range(len(stages))]
        assert sorted(stages) == sorted(expected)  # each epoch trained in the stage the division gave it
