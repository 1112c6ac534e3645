"""Honest numbers: each run's epoch is selected on validation, early stopping reads validation, and the
selected model is scored once on held-out test pairs, logged with its split so anyone can recompute it."""

from __future__ import annotations

import json
import math
import re
from pathlib import Path

import numpy as np
import pytest
import torch
from mlflow import MlflowClient
from support import TINY, independent_retrieval, run_cli, tiny_run

from ablate.report.compare import SuiteReport, TrialResult, compute
from ablate.specs import DataSpec, RunSpec, SyntheticSpec
from ablate.study.designs import SuiteSpec
from ablate.training.data import PairedEmbeddings
from ablate.training.splits import load_split
from ablate.training.trainer import Trainer


def _train(trainer: Trainer, stop_after: int | None = None) -> list[tuple[int, dict[str, float], bool]]:
    out = []
    for results in trainer.array():
        (result,) = results.values()
        out.append((result.epoch, result.metrics, result.stopped_early))
        if stop_after is not None and result.epoch == stop_after:
            break
    return out


def _trainer(spec: RunSpec) -> Trainer:
    split = load_split(spec.data)
    return Trainer(spec, split.train, split.val, test=split.test)


# --------------------------------------------------------------------------------------
# Early stopping
# --------------------------------------------------------------------------------------


def _first_stop(values: list[float], patience: int, start: int = 0) -> int:
    """The epoch after which early stopping ends a run, from the rule's words: a counter of epochs in a row without
    a new best, counted only from ``start`` (the last stage's first epoch), reaches ``patience``."""
    best, without = -math.inf, 0
    for epoch, v in enumerate(values):
        improved = v > best
        best = max(best, v)
        if epoch >= start:
            without = 0 if improved else without + 1
            if without == patience:
                return epoch
    return len(values) - 1


def test_patience_stops_a_run_once_validation_has_not_improved_for_n_epochs():
    spec = tiny_run(loss="mse", lr=0.05, epochs=60)
    full = _train(_trainer(spec))
    mrr = [m["val/mrr"] for _, m, _ in full]
    want = _first_stop(mrr, 4)
    assert want < 59, "the tiny run should overfit within 60 epochs"
    stopped = _train(_trainer(spec.model_copy(update={"patience": 4})))
    assert [e for e, _, early in stopped if early] == [want]
    assert len(stopped) == want + 1  # nothing trained past it
    assert [m["val/mrr"] for _, m, _ in stopped] == pytest.approx(mrr[: want + 1], rel=1e-6)


def test_a_multistage_run_counts_patience_from_its_last_stage():
    spec = tiny_run(loss="multistage", stage1_epochs=3, stage2_epochs=9, epochs=40, patience=2,
                    stage_lrs=(0.05, 0.02, 0.01))
    trained = _train(_trainer(spec))
    mrr = [m["val/mrr"] for _, m, _ in trained]
    stop = trained[-1][0]
    assert trained[-1][2] and stop >= 12 + 2 - 1  # stage 3 starts at epoch 12
    assert stop == _first_stop(mrr, 2, start=12)


# --------------------------------------------------------------------------------------
# Scored once on test
# --------------------------------------------------------------------------------------


@pytest.mark.parametrize("loss", ["mse", "cosine"])
def test_the_test_metrics_are_the_selected_models_on_the_test_pairs(loss):
    spec = tiny_run(loss=loss, lr=0.02, epochs=12)
    trainer = _trainer(spec)
    history = _train(trainer)
    chosen = max(range(len(history)), key=lambda e: (history[e][1]["val/mrr"], -e))
    assert trainer.best.epoch == chosen
    metrics, floors = trainer.score_test()
    split = load_split(spec.data)
    model = trainer.selected_model()
    assert model is not None and not model.training
    with torch.no_grad():
        pred = model(split.test.pocket)
    want = independent_retrieval(pred, split.test.ligand, split.test.ligand_id)
    assert metrics["test/top1"] == pytest.approx(want["top1"], abs=1e-9)
    assert metrics["test/mrr"] == pytest.approx(want["mrr"], rel=1e-6)
    assert metrics["test/cosine"] == pytest.approx(want["cosine"], rel=1e-5)
    if loss == "mse":
        assert metrics["test/loss"] == pytest.approx(((pred - split.test.ligand) ** 2).mean().item(), rel=1e-5)
    assert floors["test/ef1"] == pytest.approx(1.0)
    # the validation metrics at the selected epoch are what the run reported then
    assert trainer.best.metrics["val/mrr"] == history[chosen][1]["val/mrr"]


def test_with_mixed_precision_the_test_metrics_are_those_of_the_model_as_logged():
    spec = tiny_run(loss="infonce", lr=0.02, epochs=4, amp=True)
    trainer = _trainer(spec)
    _train(trainer)
    assert trainer.amp.label != "off"  # the epochs ran under autocast
    metrics, _ = trainer.score_test()
    split = load_split(spec.data)
    model = trainer.selected_model()
    assert model is not None
    with torch.no_grad():
        want = independent_retrieval(model(split.test.pocket), split.test.ligand, split.test.ligand_id)
        wide = model(split.test.pocket.double())  # the data file's rows as they are, float64 included
    assert metrics["test/mrr"] == pytest.approx(want["mrr"], rel=1e-6)
    assert metrics["test/cosine"] == pytest.approx(want["cosine"], rel=1e-5)
    assert wide.dtype == torch.float32


def test_a_run_stopped_early_and_resumed_ends_with_the_same_test_metrics():
    spec = tiny_run(loss="infonce", learnable_temperature=True, temperature=0.2, lr=0.05, epochs=60, patience=3,
                    model={"hidden": [16], "dropout": 0.2})
    straight = _trainer(spec)
    whole = _train(straight)
    assert whole[-1][2], "the run should stop early"
    want, _ = straight.score_test()
    for cut in (1, len(whole) - 3):
        first = _trainer(spec)
        _train(first, stop_after=cut)
        state = first.checkpoint(0, cut)
        torch.manual_seed(999)
        second = _trainer(spec)
        second.restore(0, state)
        tail = _train(second)
        assert tail[-1][0] == whole[-1][0] and tail[-1][2]
        got, _ = second.score_test()
        assert got.keys() == want.keys()
        for key, value in want.items():
            assert got[key] == pytest.approx(value, rel=1e-6, abs=1e-9), (cut, key)


def test_selection_bias_shows_on_data_without_signal():
    """With the pairing shuffled nothing can be learnt: the validation top-1 at the epoch chosen by it is above
    chance (the maximum of noisy estimates), while the chosen models' test top-1 stays within chance's interval."""
    data = load_split(DataSpec(synthetic=TINY))
    shuffled = torch.randperm(len(data.train) + len(data.val) + len(data.test),
                              generator=torch.Generator().manual_seed(0))
    pairs = [data.train, data.val, data.test]
    ligand = torch.cat([p.ligand for p in pairs])[shuffled]
    ids = torch.cat([p.ligand_id for p in pairs])[shuffled]
    pocket = torch.cat([p.pocket for p in pairs])
    n_train, n_val = len(data.train), len(data.val)

    def part(lo: int, hi: int) -> PairedEmbeddings:
        return PairedEmbeddings(pocket[lo:hi], ligand[lo:hi], ids[lo:hi])

    train, val, test = part(0, n_train), part(n_train, n_train + n_val), part(n_train + n_val, len(pocket))
    runs = [tiny_run(loss="infonce", lr=0.01, epochs=30, seed=s, select_metric="val/top1") for s in range(8)]
    trainer = Trainer(runs, train, val, test=test)
    for _ in trainer.array():
        pass
    val_top1 = [m.best.value for m in trainer.every]
    test_top1 = [trainer.score_test(k)[0]["test/top1"] for k in range(len(runs))]
    # chance: a query's own ligand is first among the distinct ligands with probability 1 / (distinct ligands)
    chance_val = 1 / len(set(val.ligand_id.tolist()))
    p = 1 / len(set(test.ligand_id.tolist()))
    n = len(test) * len(runs)
    half = 1.96 * math.sqrt(p * (1 - p) / n)
    assert np.mean(val_top1) > chance_val + 2 * math.sqrt(chance_val * (1 - chance_val) / (len(val) * len(runs)))
    assert abs(np.mean(test_top1) - p) <= half


# --------------------------------------------------------------------------------------
# What a report chooses on
# --------------------------------------------------------------------------------------


def test_a_suites_winner_is_chosen_on_validation_never_on_test():
    runs = {name: RunSpec(loss=loss) for name, loss in (("baseline", "mse"), ("a", "cosine"), ("b", "infonce"))}
    spec = SuiteSpec(name="choose", objective="test/top1", baseline="baseline", seeds=[0, 1, 2], experiments=runs)
    # 'a' is better on validation at the selected epoch, 'b' on test
    val = {"baseline": 0.20, "a": 0.50, "b": 0.30}
    test = {"baseline": 0.20, "a": 0.25, "b": 0.60}
    trials = [TrialResult(i, e, s, "COMPLETE", {"val/top1": 0.1}, {"val/top1": val[e] + 0.01 * s},
                          {"test/top1": test[e] + 0.01 * s}, None)
              for i, (e, s) in enumerate((e, s) for e in runs for s in (0, 1, 2))]
    report = compute(SuiteReport("choose", spec, trials))
    assert report.winner == "a"
    assert report.headline_at == "selected"
    assert [c.diff for c in report.headline()] == pytest.approx([0.05, 0.40])


def test_a_searchs_objective_cannot_be_a_test_metric(workdir, monkeypatch, capsys):
    code, _out, err = run_cli(["tune", "temperature", "--set", "objective=test/mrr", "--epochs", "2"],
                             monkeypatch, capsys)
    assert code == 2
    (line,) = [x for x in err.splitlines() if x.strip()]
    assert "a search's objective cannot be a test metric (test/mrr)" in line and "optimise val/mrr" in line


def test_a_search_selects_each_trials_epoch_by_its_objective():
    from ablate.study.studyfiles import load_study

    spec = load_study("temperature", {"objective": "val/top1"})
    assert spec.base.select_metric == "val/top1"
    assert load_study("temperature", {}).base.select_metric == "val/mrr"


# --------------------------------------------------------------------------------------
# The model and the split, logged
# --------------------------------------------------------------------------------------


@pytest.fixture
def trained_run(workdir, monkeypatch, capsys):
    code, out, err = run_cli(["train", "--loss-fn", "cosine", "--lr", "0.05", "--data", "pairs.npz",
                              "--epochs", "60", "--patience", "3", "--set", "model.hidden=[16]",
                              "--experiment-name", "sel"], monkeypatch, capsys)
    assert code == 0, err
    client = MlflowClient(f"sqlite:///{workdir / 'mlflow.db'}")
    (run,) = client.search_runs([client.get_experiment_by_name("sel").experiment_id])
    return client, run, out


def test_ablate_train_logs_its_split_test_metrics_and_a_model_that_reproduces_them(trained_run, workdir):
    import mlflow.pytorch

    client, run, out = trained_run
    run_id = run.info.run_id
    best = int(run.data.tags["ablate.best_epoch"])
    stopped = int(run.data.tags["ablate.stopped_early_at"])
    assert stopped - best == 3 and "stopped early after epoch" in out
    assert len(client.get_metric_history(run_id, "val/mrr")) == stopped + 1
    history = client.get_metric_history(run_id, "test/top1")
    assert [m.step for m in history] == [best]  # one value, at the selected epoch

    split = json.loads(Path(client.download_artifacts(run_id, "split.json", str(workdir))).read_text())
    raw = np.load(workdir / "pairs.npz")
    assert sorted(split["train"] + split["val"] + split["test"]) == list(range(len(raw["pocket"])))
    assert not set(raw["ligand_id"][split["train"]]) & set(raw["ligand_id"][split["test"]])

    mlflow_model = mlflow.pytorch.load_model(f"runs:/{run_id}/model")
    rows = split["test"]
    with torch.no_grad():
        pred = mlflow_model(torch.from_numpy(raw["pocket"][rows]))
    want = independent_retrieval(pred, torch.from_numpy(raw["ligand"][rows]), torch.from_numpy(raw["ligand_id"][rows]))
    metrics = run.data.metrics
    assert metrics["test/top1"] == pytest.approx(want["top1"], abs=1e-9)
    assert metrics["test/mrr"] == pytest.approx(want["mrr"], rel=1e-6)
    assert metrics["test/cosine"] == pytest.approx(want["cosine"], rel=1e-5)
    assert {f"test/{k}" for k in ("loss", "top5", "top10", "median_rank", "ef1", "bedroc", "auroc")} <= set(metrics)


def test_the_split_kind_is_said_on_the_run(trained_run):
    _, run, out = trained_run
    how = run.data.tags["ablate.split"]
    assert re.fullmatch(r"ligand-disjoint split, \d+/\d+/\d+ %", how) and how in out
    assert run.data.params["test_pairs"] == str(len(load_split(DataSpec(source="pairs.npz")).test))


def test_bad_split_values_through_the_cli_are_one_line(workdir, monkeypatch, capsys):
    raw = dict(np.load(workdir / "pairs.npz"))
    raw["split"] = np.array(["train"] * (len(raw["pocket"]) - 1) + ["valid"])
    np.savez(workdir / "labelled.npz", **raw)
    code, _out, err = run_cli(["train", "--data", "labelled.npz", "--epochs", "2"], monkeypatch, capsys)
    assert code == 2
    (line,) = [x for x in err.splitlines() if x.strip()]
    assert "labelled.npz: array 'split'" in line and "'valid'" in line


def test_an_external_test_set_through_the_cli(workdir, monkeypatch, capsys):
    from ablate.training.data import synthetic_pairs

    synthetic_pairs(SyntheticSpec(**{**TINY.model_dump(), "n_ligands": 30}), seed=7).save(workdir / "bench.npz")
    code, _out, err = run_cli(["train", "--data", "pairs.npz", "--test-data", "bench.npz", "--epochs", "2",
                              "--experiment-name", "ext"], monkeypatch, capsys)
    assert code == 0, err
    client = MlflowClient(f"sqlite:///{workdir / 'mlflow.db'}")
    (run,) = client.search_runs([client.get_experiment_by_name("ext").experiment_id])
    assert run.data.params["test_pairs"] == str(len(np.load(workdir / "bench.npz")["pocket"]))
    assert run.data.tags["ablate.split"].endswith("test pairs from bench.npz")
