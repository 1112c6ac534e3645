"""`ablate train`: a run lands in MLflow; a user's mistake is one line, exit code 2, no RUNNING run."""

from __future__ import annotations

import pytest
from mlflow import MlflowClient
from support import run_cli


def _runs(workdir):
    if not (workdir / "mlflow.db").exists():
        return []
    client = MlflowClient(f"sqlite:///{workdir / 'mlflow.db'}")
    exps = client.search_experiments()
    return client.search_runs([e.experiment_id for e in exps]) if exps else []


def test_train_logs_a_finished_run_and_prints_its_id(workdir, monkeypatch, capsys):
    code, out, err = run_cli(
        ["train", "--loss-fn", "combined", "--data", "pairs.npz", "--num-epochs", "3", "--batch-size", "16",
         "--alpha", "0.6", "--beta", "0.2", "--gamma", "0.2", "--experiment-name", "cli", "--set", "model.hidden=[16]",
         "--save-best", "best.pt"],
        monkeypatch, capsys,
    )
    assert code == 0, err
    (run,) = _runs(workdir)
    assert run.info.status == "FINISHED"
    assert run.info.run_id in out
    assert "ablate ui" in out
    assert run.data.params["alpha"] == "0.6"
    assert run.data.params["data.source"] == "pairs.npz"
    assert len(MlflowClient(f"sqlite:///{workdir / 'mlflow.db'}").get_metric_history(run.info.run_id, "val/top1")) == 3
    assert (workdir / "best.pt").is_file()


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (["--loss-fn", "infonse"], "--loss-fn: unknown loss 'infonse' (did you mean 'infonce'?)"),
        (["--temperature", "-0.1"], "--temperature: Input should be greater than 0"),
        (["--loss-fn", "combined", "--alpha", "0", "--beta", "0", "--gamma", "0"],
         "alpha, beta and gamma are all zero"),
        (["--loss-fn", "combined", "--alpha", "-1"], "--alpha: Input should be greater than or equal to 0"),
        (["--batch-size", "4096"], "batch of 4096 pairs"),
        (["--data", "missing.npz"], "missing.npz: no such data file"),
        (["--device", "cuda:7"], "'cuda:7' is not available"),
        (["--set", "epochs"], "expected KEY=VALUE"),
        (["--set", "epochs=0"], "--set epochs: Input should be greater than or equal to 1"),
        (["--set", "model.hiden=[8]"], "--set model.hiden: unknown key 'hiden'; did you mean 'hidden'?"),
        (["--set", "model.hidden=[x]"], "--set model.hidden: Input should be a valid list (got '[x]')"),
        (["--tracking-uri", "http://user:pw@127.0.0.1:9"], "cannot reach the MLflow tracking server http://user:***@"),
    ],
)
def test_mistakes_end_in_one_line_and_exit_code_2(workdir, monkeypatch, capsys, args, message):
    base = ["train", "--num-epochs", "2"] + ([] if "--data" in args else ["--data", "pairs.npz"])
    code, out, err = run_cli(base + args, monkeypatch, capsys)
    assert code == 2
    lines = [line for line in err.splitlines() if line.strip()]
    assert len(lines) == 1, err
    assert lines[0].startswith("error: ")
    assert message in lines[0]
    assert "Traceback" not in err + out
    assert all(r.info.status != "RUNNING" for r in _runs(workdir))
    assert _runs(workdir) == []


def test_help_shows_each_default_and_the_stores_it_uses(monkeypatch, capsys):
    code, out, _ = run_cli(["train", "--help"], monkeypatch, capsys)
    assert code == 0
    assert "[default: 0.001]" in out  # --lr; taken from the run spec's defaults
    assert "[default: $MLFLOW_TRACKING_URI or" in out
    code, out, _ = run_cli(["run-suite", "--help"], monkeypatch, capsys)
    assert "[default: $ABLATE_STORAGE or sqlite:///optuna.db]" in out


def test_without_a_terminal_train_prints_plain_lines_and_a_markdown_table(workdir, monkeypatch, capsys):
    code, out, err = run_cli(["train", "--data", "pairs.npz", "--epochs", "10", "--set", "model.hidden=[16]"],
                             monkeypatch, capsys)
    assert code == 0, err
    assert "━" not in out and "┃" not in out and "\r" not in out  # no live display, no box drawing
    assert [line.split(":")[1].split()[1] for line in out.splitlines() if line.startswith("mse: epoch ")] == [
        f"{k}/10" for k in range(1, 11)]
    assert "| metric | final epoch | selected epoch | test, selected model |" in out
    assert any(line.startswith("| top1 | ") and line.count("|") == 5 for line in out.splitlines())
