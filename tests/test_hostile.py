"""Hostile inputs: every user mistake is one line on stderr, exit code 2, found before any training or store;
a path built from a study name never leaves its folder; stores fail within seconds; passwords stay masked."""

from __future__ import annotations

import base64
import http.server
import json
import os
import shutil
import signal
import subprocess
import sys
import threading
import time
import types
from collections.abc import Iterator
from pathlib import Path
from typing import Any, ClassVar

import numpy as np
import pytest
from support import run_cli

from ablate.errors import AblateError
from ablate.specs import ModelSpec
from ablate.stores import mask_url, split_credentials
from ablate.study.interface import valid_study_name
from ablate.study.studyfiles import MAX_NESTING, MAX_STUDY_FILE_BYTES, load_study, safe_folder
from ablate.tracking.client import Tracker
from ablate.tracking.store import API_PROBE, check_store
from ablate.training.models import build_model

pytestmark = pytest.mark.bare  # the tests check that no store is created

SUITE = """\
kind = "suite"
{extra}
seeds = [0]

[base]
epochs = 2
batch_size = 16
data = {{ source = "pairs.npz" }}
model = {{ hidden = [16] }}

[experiments.a]
loss = "mse"

[experiments.b]
loss = "cosine"
"""

SEARCH = """\
kind = "search"
name = "probe"
n_trials = 2

[base]
loss = "infonce"
epochs = 2
batch_size = 16
data = {{ source = "pairs.npz" }}
model = {{ hidden = [16] }}

{params}
"""


def _stores(workdir: Path) -> list[str]:
    return sorted(p.name for p in workdir.iterdir() if p.name.startswith(("optuna.db", "mlflow.db")))


def _one_line_error(workdir: Path, args: list[str], monkeypatch: pytest.MonkeyPatch,
                    capsys: pytest.CaptureFixture[str], *expected: str, no_store: bool = True) -> str:
    """Run the CLI; assert one 'error:' line with every expected text, exit 2, no traceback, no training and
    (unless ``no_store`` is False) no store."""
    code, out, err = run_cli(args, monkeypatch, capsys)
    lines = [line for line in err.splitlines() if line.strip()]
    assert code == 2, err + out
    assert len(lines) == 1, err
    assert lines[0].startswith("error: "), err
    for text in expected:
        assert text in lines[0], lines[0]
    assert "Traceback" not in err + out
    assert "training" not in out
    if no_store:
        assert _stores(workdir) == []
    else:  # the session opened the Optuna storage first: no study was created in it, MLflow was not touched
        import optuna

        assert optuna.get_all_study_summaries(f"sqlite:///{workdir / 'optuna.db'}") == []
        assert not (workdir / "mlflow.db").exists()
    return lines[0]


def _write(workdir: Path, name: str, text: str) -> str:
    (workdir / name).write_text(text)
    return name


# --------------------------------------------------------------------------------------
# 1. A study name is a safe slug; a folder built from a name stays inside its base
# --------------------------------------------------------------------------------------


@pytest.mark.parametrize("name", ["../../etc/x", "/tmp/abs", "a/b", "..", ".hidden", "-flag", "x" * 65, "a b",
                                  "a\\b", ""])
def test_a_study_name_that_is_not_a_safe_slug_is_refused_before_any_store(workdir, monkeypatch, capsys, name):
    path = _write(workdir, "study.toml", SUITE.format(extra=f"name = {json.dumps(name)}"))
    line = _one_line_error(workdir, ["run-suite", path, "--out", "reports"], monkeypatch, capsys,
                           "study.toml: name: a study name is 1 to 64 letters, digits")
    assert "not starting with '.' or '-'" in line
    assert not (workdir / "reports").exists()
    assert not (workdir.parent / "etc").exists()


def test_a_file_name_that_is_not_a_safe_slug_is_refused_with_the_fix(workdir, monkeypatch, capsys):
    path = _write(workdir, "my study.toml", SUITE.format(extra=""))
    _one_line_error(workdir, ["run-suite", path], monkeypatch, capsys,
                    "my study.toml: the file name 'my study' is not a valid study name", "rename the file or set name")
    assert load_study(path, {"name": "my-study"}).name == "my-study"  # or give the name with --set


def test_safe_names_are_accepted_from_the_file_and_from_the_file_name(workdir):
    assert load_study(_write(workdir, "v1.2_lr-sweep.toml", SUITE.format(extra=""))).name == "v1.2_lr-sweep"
    spec = load_study(_write(workdir, "other.toml", SUITE.format(extra='name = "' + "n" * 64 + '"')))
    assert spec.name == "n" * 64
    assert load_study("baseline-vs-multistage").name == "baseline-vs-multistage"
    assert [valid_study_name(n) for n in ("_x", "a.b", "9", ".x", "x/y", "é")] == [True, True, True, False, False,
                                                                                   False]


def test_an_experiment_name_that_cannot_be_an_mlflow_key_is_refused_before_any_store(workdir, monkeypatch, capsys):
    text = SUITE.format(extra='name = "probe"').replace("[experiments.b]", '[experiments."lr=1e-3"]')
    path = _write(workdir, "probe.toml", text)
    _one_line_error(workdir, ["run-suite", path], monkeypatch, capsys,
                    "experiments.lr=1e-3: an experiment name is 1 to 64 letters")


def test_safe_folder_keeps_every_path_inside_its_base(tmp_path):
    base = tmp_path / "reports"
    assert safe_folder(base, "suite-1a2b3c4d") == base / "suite-1a2b3c4d"
    for name in ("../x", "..", ".", "/etc", "a/b", "a/../../x", "", "x\0y", "a\\b"):
        with pytest.raises(AblateError, match="cannot name a folder inside"):
            safe_folder(base, name)
    base.mkdir()
    (base / "escape").symlink_to(tmp_path.parent)
    with pytest.raises(AblateError, match="outside"):
        safe_folder(base, "escape")
    (base / "inside").symlink_to(base / "suite")
    assert safe_folder(base, "inside") == base / "inside"


# --------------------------------------------------------------------------------------
# 2. Mistakes that were tracebacks
# --------------------------------------------------------------------------------------


def test_a_study_file_that_is_not_utf8_is_one_line(workdir, monkeypatch, capsys):
    (workdir / "probe.toml").write_bytes(SUITE.format(extra='name = "probe"\n# caf\xe9').encode("latin-1"))
    _one_line_error(workdir, ["run-suite", "probe.toml"], monkeypatch, capsys,
                    "probe.toml: not UTF-8 text (byte 0xe9 on line 3); save the study file as UTF-8")


def test_a_byte_order_mark_is_accepted(workdir):
    (workdir / "probe.toml").write_bytes(b"\xef\xbb\xbf" + SUITE.format(extra='name = "bom"').encode())
    assert load_study("probe.toml").name == "bom"


@pytest.mark.parametrize(("text", "depth"), [
    ("[" + ".".join(["a"] * 5000) + "]\n", 5000),
    ("[" + ".".join(["a"] * (MAX_NESTING + 2)) + "]\n", MAX_NESTING + 2),
    ("x = " + "[" * 5000 + "]" * 5000 + "\n", 5000),
])
def test_tables_or_lists_nested_too_deep_are_one_line(workdir, monkeypatch, capsys, text, depth):
    path = _write(workdir, "probe.toml", SUITE.format(extra='name = "probe"') + text)
    _one_line_error(workdir, ["run-suite", path, "--epochs", "2"], monkeypatch, capsys,
                    f"nested more than {MAX_NESTING} levels deep")


def test_a_set_value_nested_too_deep_is_one_line(workdir, monkeypatch, capsys):
    path = _write(workdir, "probe.toml", SUITE.format(extra='name = "probe"'))
    _one_line_error(workdir, ["run-suite", path, "--set", "description=" + "[" * 3000 + "]" * 3000],
                    monkeypatch, capsys, f"nested more than {MAX_NESTING} levels deep")
    _one_line_error(workdir, ["run-suite", path, "--set", ".".join(["model"] * 200) + "=1"],
                    monkeypatch, capsys, f"nested more than {MAX_NESTING} levels deep")


BASE_AS_VALUE = 'kind = "suite"\nname = "probe"\nbase = 3\n[experiments.a]\nloss = "mse"\n'
EXPERIMENTS_AS_VALUE = 'kind = "suite"\nname = "probe"\nexperiments = 5\n[base]\nloss = "mse"\n'
EXPERIMENT_AS_VALUE = 'kind = "suite"\nname = "probe"\n[experiments]\na = "x"\n'


@pytest.mark.parametrize(("text", "flags", "message"), [
    (BASE_AS_VALUE, ["--epochs", "3"], "base must be a table ([base]), got base = 3"),
    (BASE_AS_VALUE, ["--set", "lr=0.1"], "base must be a table ([base]), got base = 3"),
    (EXPERIMENTS_AS_VALUE, ["--epochs", "3"], "experiments must be a table ([experiments]), got experiments = 5"),
    (EXPERIMENTS_AS_VALUE, ["--set", "lr=0.1"], "experiments must be a table ([experiments]), got experiments = 5"),
    (EXPERIMENT_AS_VALUE, ["--epochs", "3"], "experiments.a must be a table ([experiments.a]), got 'x'"),
])
def test_a_table_given_as_a_value_is_one_line_with_epochs_or_set(workdir, monkeypatch, capsys, text, flags, message):
    path = _write(workdir, "probe.toml", text)
    _one_line_error(workdir, ["run-suite", path, *flags], monkeypatch, capsys, f"probe.toml: {message}")


def test_params_given_as_a_value_is_one_line_with_set(workdir, monkeypatch, capsys):
    path = _write(workdir, "probe.toml", SEARCH.format(params="").replace("n_trials = 2", "n_trials = 2\nparams = 5"))
    assert load_study.__name__  # the file parses; the mistake is the value of params
    _one_line_error(workdir, ["tune", path, "--set", "lr=0.1"], monkeypatch, capsys,
                    "probe.toml: params must be a table ([params]), got params = 5")


def test_multistage_stages_of_the_wrong_type_are_validated_not_multiplied(workdir, monkeypatch, capsys):
    text = SUITE.format(extra='name = "probe"').replace('loss = "cosine"',
                                                        'loss = "multistage"\nstage1_epochs = [10]')
    path = _write(workdir, "probe.toml", text)
    _one_line_error(workdir, ["run-suite", path, "--epochs", "3"], monkeypatch, capsys,
                    "experiments.b.stage1_epochs: Input should be a valid integer")


def test_epochs_and_set_on_a_search_change_its_base_and_add_no_experiments():
    spec = load_study("temperature", {"lr": 0.1, "model.hidden": [8]}, epochs=2)
    assert (spec.kind, spec.base.epochs, spec.base.lr, spec.base.model.hidden) == ("search", 2, 0.1, [8])
    suite = load_study("baseline-vs-multistage", {"lr": 0.1}, epochs=30)
    assert {e: (r.epochs, r.lr) for e, r in suite.experiments.items()} == {e: (30, 0.1) for e in suite.experiments}
    assert (suite.experiments["multistage"].stage1_epochs, suite.experiments["multistage"].stage2_epochs) == (5, 10)


@pytest.mark.parametrize(("param", "message"), [
    ('type = "float"\nlow = 0.05\nhigh = 0.2\nstep = 0', "params.temperature: step must be a number above 0, got 0"),
    ('type = "float"\nlow = 0.05\nhigh = 0.2\nstep = -0.05', "step must be a number above 0, got -0.05"),
    ('type = "float"\nlow = 0.05\nhigh = 0.2\nstep = 0.5', "step (0.5) is wider than the range 0.05..0.2"),
    ('type = "float"\nlow = 0.05\nhigh = 0.2\nstep = 0.04',
     "the range 0.05..0.2 is not a whole number of steps of 0.04"),
    ('type = "float"\nlow = 0.05\nhigh = inf', "params.temperature.high: Input should be a finite number"),
    ('type = "float"\nlow = 0.05\nhigh = 0.2\nchoices = [1, 2]', "a float parameter takes no choices"),
])
def test_a_bad_step_or_range_is_one_line_before_any_store(workdir, monkeypatch, capsys, param, message):
    path = _write(workdir, "probe.toml", SEARCH.format(params=f"[params.temperature]\n{param}"))
    _one_line_error(workdir, ["tune", path], monkeypatch, capsys, message)


@pytest.mark.parametrize(("params", "message"), [
    ('[params.batch_size]\ntype = "int"\nlow = 16\nhigh = 64\nstep = 0', "step must be a whole number above 0"),
    ('[params.batch_size]\ntype = "int"\nlow = 16\nhigh = 64\nstep = 2.5', "step must be a whole number above 0"),
    ('[params.batch_size]\ntype = "int"\nlow = 16\nhigh = 64\nstep = 64', "step (64.0) is wider than the range"),
    ('[params.batch_size]\ntype = "int"\nlow = 16.5\nhigh = 64', "an int parameter needs whole-number low and high"),
    ('[params.batch_size]\ntype = "float"\nlow = 16\nhigh = 64',
     'params.batch_size: batch_size takes whole numbers, but a float parameter draws fractions; use type = "int"'),
    ('[params."data.synthetic.n_ligands"]\ntype = "float"\nlow = 50\nhigh = 60',
     "data.synthetic.n_ligands takes whole numbers"),
    ('[params.w]\ntype = "simplex"\nnames = ["alpha", "beta", "alpha"]',
     "params.w: names must be distinct run fields; alpha is named twice"),
    ('[params.w]\ntype = "simplex"\nnames = ["alpha", "epochs"]', "epochs takes whole numbers"),
    ('[params.alpha]\ntype = "float"\nlow = 0.1\nhigh = 0.9\n[params.w]\ntype = "simplex"\nnames = ["alpha", "beta"]',
     "params.w: 'alpha' is already searched by params.alpha"),
    ('[params.lr]\ntype = "categorical"\nchoices = [0.1, 0.1]', "choices must be distinct"),
])
def test_a_parameter_that_would_fail_at_trial_time_is_one_line_before_any_store(workdir, monkeypatch, capsys,
                                                                                 params, message):
    path = _write(workdir, "probe.toml", SEARCH.format(params=params))
    _one_line_error(workdir, ["tune", path], monkeypatch, capsys, message)


def test_a_good_step_gives_exactly_the_grid(workdir):
    params = '[params.batch_size]\ntype = "int"\nlow = 16\nhigh = 64\nstep = 16\n' \
             '[params.temperature]\ntype = "float"\nlow = 0.05\nhigh = 0.2\nstep = 0.05'
    spec = load_study(_write(workdir, "probe.toml", SEARCH.format(params=params)))
    assert spec.space_size() == 4 * 4  # {16, 32, 48, 64} x {0.05, 0.1, 0.15, 0.2}
    labels = [label for label, _ in spec.preflight_runs()]
    assert labels == ["base", "params.batch_size=batch_size=16", "params.batch_size=batch_size=64",
                      "params.temperature=temperature=0.05", "params.temperature=temperature=0.2"]


def test_a_search_kept_in_a_store_validates_again(workdir):
    from ablate.study.designs import from_document
    from ablate.study.studyfiles import spec_document

    params = '[params.temperature]\ntype = "float"\nlow = 0.05\nhigh = 0.2\n' \
             '[params.w]\ntype = "simplex"\nnames = ["alpha", "beta"]'
    spec = load_study(_write(workdir, "probe.toml", SEARCH.format(params=params)))
    assert from_document(spec_document(spec)) == spec


@pytest.mark.parametrize("command", ["run-suite", "train"])
def test_model_kwargs_the_built_in_head_does_not_take_are_one_line(workdir, monkeypatch, capsys, command):
    args = (["run-suite", _write(workdir, "probe.toml", SUITE.format(extra='name = "probe"'))] if command == "run-suite"
            else ["train", "--data", "pairs.npz", "--num-epochs", "1"])
    _one_line_error(workdir, [*args, "--set", "model.kwargs={nosuch=1}"], monkeypatch, capsys,
                    "model.kwargs: the built-in head (model.factory = \"mlp\") takes no keyword arguments, "
                    "got 'nosuch'")


def test_a_factory_with_the_wrong_signature_is_one_line_naming_it(workdir, monkeypatch, capsys):
    expected = ("model factory 'os:system' failed when called as os:system(", "TypeError",
                "a factory takes (in_dim, out_dim, **model.kwargs)")
    _one_line_error(workdir, ["train", "--data", "pairs.npz", "--num-epochs", "1", "--set", "model.factory=os:system"],
                    monkeypatch, capsys, *expected)
    path = _write(workdir, "probe.toml", SUITE.format(extra='name = "probe"'))
    line = _one_line_error(workdir, ["run-suite", path, "--set", "model.factory=os:system"], monkeypatch, capsys,
                           *expected, no_store=False)
    assert line.startswith("error: probe: a: model factory")  # the study and the experiment checked first


def test_factory_failures_become_errors_that_name_the_factory():
    with pytest.raises(AblateError, match=r"'support:two_layer' failed when called as support:two_layer\(4, 3, "
                                          r"nosuch=1\): TypeError: .*unexpected keyword argument 'nosuch'"):
        build_model(ModelSpec(factory="support:two_layer", kwargs={"nosuch": 1}), 4, 3)
    with pytest.raises(AblateError, match=r"model\.kwargs: the built-in head"):
        build_model(ModelSpec(kwargs={"hidden": 3}), 4, 3)
    with pytest.raises(AblateError, match="'os:sep' is a str, not a function or class"):
        build_model(ModelSpec(factory="os:sep"), 4, 3)
    with pytest.raises(AblateError, match=r"returned int, not a torch.nn.Module"):
        build_model(ModelSpec(factory="builtins:max"), 4, 3)
    with pytest.raises(AblateError, match="cannot import 'no_such_pkg'"):
        build_model(ModelSpec(factory="no_such_pkg:f"), 4, 3)
    model = build_model(ModelSpec(factory="support:two_layer", kwargs={"hidden": 5}), 4, 3)
    assert [tuple(p.shape) for p in model.parameters()] == [(5, 4), (5,), (3, 5), (3,)]
    head = build_model(ModelSpec(hidden=[7], dropout=0.0), 4, 3)
    assert [tuple(p.shape) for p in head.parameters()] == [(7, 4), (7,), (3, 7), (3,)]


# --------------------------------------------------------------------------------------
# 3. Stores: unreachable, read-only, not MLflow, credentials in the URL
# --------------------------------------------------------------------------------------


@pytest.fixture
def retries(monkeypatch: pytest.MonkeyPatch) -> list[float]:
    """The sleeps of MLflow's SQL connection retry loop (recorded, not slept)."""
    import mlflow.store.db.utils as db_utils

    slept: list[float] = []
    fake = types.SimpleNamespace(**{k: getattr(time, k) for k in dir(time) if not k.startswith("__")})
    fake.sleep = slept.append
    monkeypatch.setattr(db_utils, "time", fake)
    return slept


@pytest.fixture
def make_readonly() -> Iterator[Any]:
    """Make a folder read-only: nobody may create files in it (chmod for a user; the immutable attribute for root)."""
    undo: list[list[str]] = []

    def make(folder: Path) -> Path:
        if os.geteuid() != 0:
            folder.chmod(0o555)
            undo.append(["chmod", "755", str(folder)])
            return folder
        chattr = shutil.which("chattr")
        if not chattr or subprocess.run([chattr, "+i", str(folder)], capture_output=True).returncode != 0:
            pytest.skip("cannot make a read-only folder as root here (no chattr +i)")
        undo.append([chattr, "-i", str(folder)])
        return folder

    yield make
    for command in undo:
        subprocess.run(command, check=True)


@pytest.fixture
def readonly_folder(tmp_path: Path, make_readonly: Any) -> Path:
    """A read-only folder with only the lock file an earlier run leaves (opening it needs no new file)."""
    folder = tmp_path / "ro"
    folder.mkdir()
    (folder / "mlflow.db.lock").touch()
    return make_readonly(folder)


def test_an_unreachable_database_store_fails_at_once_with_the_password_masked(workdir, monkeypatch, capsys, retries):
    pytest.importorskip("psycopg")
    line = _one_line_error(workdir, ["train", "--data", "pairs.npz", "--num-epochs", "1", "--tracking-uri",
                                     "postgresql://u:tPw@rd@127.0.0.1:9/x"], monkeypatch, capsys,
                           "cannot reach the MLflow store postgresql://u:***@127.0.0.1:9/x", "Connection refused")
    assert "%40" not in line
    assert "tPw" not in line and "rd@" not in line
    assert retries == []


def test_a_store_in_a_read_only_folder_fails_at_once(workdir, monkeypatch, capsys, retries, readonly_folder):
    uri = f"sqlite:///{readonly_folder / 'mlflow.db'}"
    _one_line_error(workdir, ["train", "--data", "pairs.npz", "--num-epochs", "1", "--tracking-uri", uri],
                    monkeypatch, capsys, f"the MLflow store {uri}: cannot write in its folder")
    assert retries == []
    assert sorted(p.name for p in readonly_folder.iterdir()) == ["mlflow.db.lock"]


def test_an_existing_store_in_a_read_only_folder_can_still_be_read(tmp_path, make_readonly):
    folder = tmp_path / "kept"
    Tracker(f"sqlite:///{folder / 'mlflow.db'}").experiment_id("kept")
    make_readonly(folder)
    uri = f"sqlite:///{folder / 'mlflow.db'}"
    with pytest.raises(AblateError, match="cannot write in its folder"):
        Tracker(uri)
    reader = Tracker(uri, writable=False)
    assert "kept" in [name for name, _, _ in reader.experiments()]


def test_a_fresh_sqlite_store_opens_and_leaves_only_its_own_files(tmp_path, retries):
    tracker = Tracker(f"sqlite:///{tmp_path / 'new' / 'mlflow.db'}")
    exp = tracker.experiment_id("fresh")
    assert tracker.client.get_experiment(exp).name == "fresh"
    assert sorted(p.name for p in (tmp_path / "new").iterdir()) == ["mlflow.db", "mlflow.db.lock"]
    Tracker(tracker.uri)  # an existing store passes the write check too
    assert retries == []


def test_a_file_that_is_not_a_database_is_one_line(workdir, monkeypatch, capsys):
    (workdir / "notes.db").write_text("not a database\n" * 100)
    _one_line_error(workdir, ["train", "--data", "pairs.npz", "--num-epochs", "1", "--tracking-uri",
                              "sqlite:///notes.db"], monkeypatch, capsys, "notes.db", "not a database")


def test_a_read_only_postgresql_database_is_one_line_and_a_writable_one_passes(postgres_url):
    import sqlalchemy

    assert check_store(postgres_url) == postgres_url
    name = postgres_url.rsplit("/", 1)[1]
    engine = sqlalchemy.create_engine(postgres_url, isolation_level="AUTOCOMMIT")
    with engine.connect() as con:
        con.execute(sqlalchemy.text(f'ALTER DATABASE "{name}" SET default_transaction_read_only = on'))
    engine.dispose()
    with pytest.raises(AblateError, match=r"is read-only \(transaction_read_only = on\)"):
        check_store(postgres_url)
    assert check_store(postgres_url, writable=False) == postgres_url  # reading it is fine


class _Server:
    """An HTTP server on 127.0.0.1 in a thread, for as long as the with-block lasts."""

    def __init__(self, handler: type[http.server.BaseHTTPRequestHandler]):
        self.httpd = http.server.ThreadingHTTPServer(("127.0.0.1", 0), handler)
        self.url = f"http://127.0.0.1:{self.httpd.server_port}"

    def __enter__(self) -> _Server:
        threading.Thread(target=self.httpd.serve_forever, daemon=True).start()
        return self

    def __exit__(self, *exc: Any) -> None:
        self.httpd.shutdown()
        self.httpd.server_close()


class _Files(http.server.SimpleHTTPRequestHandler):
    """`python -m http.server`: answers every MLflow API path with 404."""

    def log_message(self, *args: Any) -> None:
        pass


def test_a_web_server_that_is_not_mlflow_is_one_line(workdir, monkeypatch, capsys):
    with _Server(_Files) as server:
        _one_line_error(workdir, ["train", "--data", "pairs.npz", "--num-epochs", "1", "--tracking-uri", server.url],
                        monkeypatch, capsys, f"{server.url} answers HTTP but is not an MLflow tracking server "
                        "(HTTP 404 on /api/2.0/mlflow/experiments/search)")


def test_a_suite_with_a_web_server_that_is_not_mlflow_is_one_line(workdir, monkeypatch, capsys):
    path = _write(workdir, "probe.toml", SUITE.format(extra='name = "probe"'))
    with _Server(_Files) as server:
        code, out, err = run_cli(["run-suite", path, "--tracking-uri", server.url, "--jobs", "1"], monkeypatch, capsys)
    lines = [line for line in err.splitlines() if line.strip()]
    assert code == 2 and len(lines) == 1, err
    assert "is not an MLflow tracking server" in lines[0]
    assert "Traceback" not in err + out
    assert not (workdir / "optuna.db").exists()  # checked before the study was created


USER, PASSWORD = "probe", "p@ss/w:rd"


class _MlflowWithBasicAuth(http.server.BaseHTTPRequestHandler):
    """Answers MLflow's experiment search (GET or POST) with no experiments, for USER:PASSWORD only."""

    seen: ClassVar[list[str]] = []

    def log_message(self, *args: Any) -> None:
        pass

    def _answer(self) -> None:
        self.seen.append(self.headers.get("Authorization", ""))
        if self.headers.get("Content-Length"):
            self.rfile.read(int(self.headers["Content-Length"]))
        good = "Basic " + base64.b64encode(f"{USER}:{PASSWORD}".encode()).decode()
        if self.headers.get("Authorization") != good:
            self.send_response(401)
            self.send_header("WWW-Authenticate", 'Basic realm="mlflow"')
            self.end_headers()
            return
        if self.path.partition("?")[0] != API_PROBE.partition("?")[0]:
            self.send_error(404)
            return
        body = b'{"experiments": []}'
        self.send_response(200)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)

    do_GET = do_POST = _answer


@pytest.fixture
def no_mlflow_credentials(monkeypatch: pytest.MonkeyPatch) -> None:
    """MLflow's credential variables unset now and restored after the test."""
    for var in ("MLFLOW_TRACKING_USERNAME", "MLFLOW_TRACKING_PASSWORD", "MLFLOW_TRACKING_TOKEN"):
        monkeypatch.setenv(var, "placeholder")
        monkeypatch.delenv(var)


def test_credentials_in_a_server_url_move_into_mlflows_variables(no_mlflow_credentials):
    from urllib.parse import quote

    _MlflowWithBasicAuth.seen = []
    with _Server(_MlflowWithBasicAuth) as server:
        url = server.url.replace("http://", f"http://{USER}:{quote(PASSWORD, safe='')}@")
        tracker = Tracker(url)
        assert tracker.uri == server.url
        assert tracker.shown_uri == server.url.replace("http://", f"http://{USER}:***@")
        assert os.environ["MLFLOW_TRACKING_USERNAME"] == USER
        assert os.environ["MLFLOW_TRACKING_PASSWORD"] == PASSWORD
        assert tracker.client.search_experiments() == []  # MLflow itself sent the credentials
        child = subprocess.run([sys.executable, "-c", "import os; print(os.environ['MLFLOW_TRACKING_PASSWORD'])"],
                               capture_output=True, text=True, check=True)
        assert child.stdout.strip() == PASSWORD
    assert len(_MlflowWithBasicAuth.seen) >= 2 and all(h.startswith("Basic ") for h in _MlflowWithBasicAuth.seen)


def test_wrong_credentials_are_one_line_with_the_password_masked(workdir, monkeypatch, capsys, no_mlflow_credentials):
    with _Server(_MlflowWithBasicAuth) as server:
        url = server.url.replace("http://", f"http://{USER}:Wr0ng@")
        line = _one_line_error(workdir, ["train", "--data", "pairs.npz", "--num-epochs", "1", "--tracking-uri", url],
                               monkeypatch, capsys, f"{USER}:***@", "refused access (HTTP 401)")
    assert "Wr0ng" not in line


def test_an_unreachable_server_with_credentials_is_one_line_masked(workdir, monkeypatch, capsys,
                                                                   no_mlflow_credentials):
    line = _one_line_error(workdir, ["train", "--data", "pairs.npz", "--num-epochs", "1", "--tracking-uri",
                                     "http://user:s3cr@t@127.0.0.1:9"], monkeypatch, capsys,
                           "cannot reach the MLflow tracking server http://user:***@127.0.0.1:9")
    assert "s3cr" not in line


@pytest.mark.slow
def test_a_real_mlflow_server_passes_the_check(mlflow_server_url, no_mlflow_credentials):
    tracker = Tracker(mlflow_server_url)
    assert tracker.client.get_experiment(tracker.experiment_id("probe")).name == "probe"


# --------------------------------------------------------------------------------------
# 4. Masking and size
# --------------------------------------------------------------------------------------


@pytest.mark.parametrize(("url", "masked"), [
    ("postgresql://probe:tPw@rd@host/db", "postgresql://probe:***@host/db"),
    ("cannot reach postgresql://probe:a@b@c@host:5432/db?x=a@b: refused",
     "cannot reach postgresql://probe:***@host:5432/db?x=a@b: refused"),
    ("http://u:p@h:5000 and mysql://v:q@r@m/db", "http://u:***@h:5000 and mysql://v:***@m/db"),
    ("postgresql://h/db?user=u&password=s3cret", "postgresql://h/db?user=u&password=***"),
    ("http://mlflow:5000/#/experiments", "http://mlflow:5000/#/experiments"),
])
def test_a_password_with_an_at_sign_is_masked_whole(url, masked):
    assert mask_url(url) == masked


def test_credentials_split_at_the_last_at_sign_and_are_decoded():
    assert split_credentials("http://u:tPw@rd@h:5000/x?y=1") == ("http://h:5000/x?y=1", "u", "tPw@rd")
    assert split_credentials("https://me%40org:p%2Fw@h") == ("https://h", "me@org", "p/w")
    assert split_credentials("http://h:5000/a@b") == ("http://h:5000/a@b", None, None)
    assert split_credentials("http://token@h") == ("http://h", "token", None)


def test_a_study_file_over_the_size_limit_is_refused_before_any_store(workdir, monkeypatch, capsys):
    text = SUITE.format(extra='name = "probe"') + "# padding\n" * (MAX_STUDY_FILE_BYTES // 10 + 1)
    path = _write(workdir, "probe.toml", text)
    assert (workdir / path).stat().st_size > MAX_STUDY_FILE_BYTES
    _one_line_error(workdir, ["run-suite", path], monkeypatch, capsys,
                    f"more than the limit of {MAX_STUDY_FILE_BYTES:,} (1 MiB)")
    (workdir / path).write_text(SUITE.format(extra='name = "probe"') + "# padding\n" * 1000)
    assert load_study(path).name == "probe"


# --------------------------------------------------------------------------------------
# 5. Output paths, a full disk, dead workers and runs left RUNNING
# --------------------------------------------------------------------------------------

TINY_SEARCH = ["--set", "data.source=pairs.npz", "--set", "model.hidden=[16]", "--set", "model.dropout=0.0",
               "--set", "batch_size=16"]


@pytest.mark.parametrize("out", ["afile", "afile/sub"])
@pytest.mark.parametrize("command", ["run-suite", "tune", "report"])
def test_an_out_folder_that_cannot_be_made_is_one_line_before_any_training(workdir, monkeypatch, capsys, command,
                                                                           out):
    (workdir / "afile").write_text("not a folder\n")
    args = {"run-suite": ["run-suite", _write(workdir, "probe.toml", SUITE.format(extra='name = "probe"'))],
            "tune": ["tune", "temperature", *TINY_SEARCH], "report": ["report", "nope"]}[command]
    _one_line_error(workdir, [*args, "--out", out], monkeypatch, capsys,
                    f"--out {out}: afile is a file, not a folder")
    assert (workdir / "afile").read_text() == "not a folder\n"
    assert sorted(p.name for p in workdir.iterdir()) == ["afile", "pairs.npz", "probe.toml"]


@pytest.mark.parametrize(("target", "expected"), [
    ("afile/x.pt", "--save-best afile/x.pt: afile is a file, not a folder"),
    ("adir", "--save-best adir: that is a folder"),
])
def test_a_save_best_path_that_cannot_be_written_is_one_line_before_training(workdir, monkeypatch, capsys, target,
                                                                              expected):
    (workdir / "afile").write_text("not a folder\n")
    (workdir / "adir").mkdir()
    _one_line_error(workdir, ["train", "--data", "pairs.npz", "--loss-fn", "mse", "--epochs", "1", "--save-best",
                              target], monkeypatch, capsys, expected)


@pytest.mark.skipif(not Path("/dev/full").exists(), reason="needs /dev/full")
def test_a_full_disk_at_save_best_is_one_line_and_the_run_is_kept(workdir, monkeypatch, capsys):
    from mlflow import MlflowClient

    code, _out, err = run_cli(["train", "--data", "pairs.npz", "--epochs", "2", "--save-best", "/dev/full"],
                             monkeypatch, capsys)
    assert code == 2
    (line,) = [x for x in err.splitlines() if x.strip()]
    assert "could not write the selected model to /dev/full: No space left on device" in line
    client = MlflowClient(f"sqlite:///{workdir / 'mlflow.db'}")
    (run,) = client.search_runs([e.experiment_id for e in client.search_experiments()])
    assert run.info.status == "FINISHED" and f"runs:/{run.info.run_id}/model" in line


def test_save_best_writes_a_whole_file_or_none(tmp_path, monkeypatch):
    from support import tiny_run

    from ablate.training.trainer import Trainer

    trainer = Trainer.from_spec(tiny_run(epochs=1))
    for _ in trainer.epochs():
        pass
    target = tmp_path / "best.pt"
    target.write_bytes(b"the old model")

    def full(self: Path, data: bytes) -> int:
        self.open("wb").write(data[: len(data) // 2])
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(Path, "write_bytes", full)
    with pytest.raises(AblateError, match="No space left on device"):
        trainer.save_best(target)
    assert target.read_bytes() == b"the old model" and sorted(p.name for p in tmp_path.iterdir()) == ["best.pt"]


def test_a_save_best_folder_that_cannot_be_written_is_one_line(tmp_path, make_readonly):
    from ablate.study.studyfiles import writable_folder

    (tmp_path / "ro").mkdir()
    folder = make_readonly(tmp_path / "ro")
    with pytest.raises(AblateError, match=r"--save-best x: cannot write in .*ro \(.*(denied|not permitted)"):
        writable_folder(folder / "models", "--save-best x")
    assert list(folder.iterdir()) == []
    assert writable_folder(tmp_path / "new" / "deeper", "--out x") == tmp_path / "new" / "deeper"
    assert not (tmp_path / "new").exists()  # the check leaves nothing behind


def test_an_export_into_a_missing_folder_is_one_line_before_the_study_is_read(workdir, monkeypatch, capsys):
    _one_line_error(workdir, ["studies", "export", "nope", "-o", "missing/dir/x.csv"], monkeypatch, capsys,
                    "--output missing/dir/x.csv: the folder missing/dir does not exist")
    (workdir / "afile").touch()
    _one_line_error(workdir, ["studies", "export", "nope", "-o", "afile/x.csv"], monkeypatch, capsys,
                    "afile is a file, not a folder")


def test_a_full_disk_while_writing_the_report_is_one_line_and_the_results_stay(workdir, mlflow_template, monkeypatch,
                                                                                capsys):
    import errno

    from ablate.report import publish
    from ablate.study import studies

    shutil.copy(mlflow_template, workdir / "mlflow.db")
    path = _write(workdir, "probe.toml", SUITE.format(extra='name = "probe"'))
    real = publish.suite_curves

    def full_disk(*args: Any, **kwargs: Any) -> Any:
        raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))

    monkeypatch.setattr(publish, "suite_curves", full_disk)
    code, out, err = run_cli(["run-suite", path, "--jobs", "1", "--array", "1", "--epochs", "1"], monkeypatch, capsys)
    name = studies.load("probe", studies.open_storage(f"sqlite:///{workdir / 'optuna.db'}")).name
    lines = [line for line in err.splitlines() if line.strip()]
    assert code == 2, err + out
    assert len(lines) == 1, err
    assert lines[0].startswith(f"error: could not write the report to {Path('reports') / name}: "
                               "No space left on device; the trained results stay in the study"), lines[0]
    assert f"`ablate report {name} --out reports`" in lines[0]
    assert "Traceback" not in err + out

    monkeypatch.setattr(publish, "suite_curves", real)
    code, out, err = run_cli(["report", name], monkeypatch, capsys)
    assert code == 0, err
    assert "training" not in out
    assert (workdir / "reports" / name / "report.md").is_file()


@pytest.mark.slow
def test_a_dead_worker_s_trial_is_failed_within_the_grace_period_while_the_others_train(
        workdir, mlflow_template, postgres_url, monkeypatch, capsys):
    import optuna
    from mlflow import MlflowClient
    from support import ablate_command

    from ablate.study import studies

    shutil.copy(mlflow_template, workdir / "mlflow.db")
    code, _, err = run_cli(["tune", "temperature", "--n-trials", "4", "--jobs", "0", "--storage", postgres_url,
                            "--set", "epochs=100000", "--set", "pruner.type=none", *TINY_SEARCH], monkeypatch, capsys)
    assert code == 0, err
    study = studies.load("temperature", studies.open_storage(postgres_url)).study
    env = {**os.environ, "PYTHONUNBUFFERED": "1"}
    victim, survivor = workers = [
        subprocess.Popen(ablate_command("worker", study.study_name, "--storage", postgres_url, "--heartbeat", "1",
                                        "--array", "1", "--jobs", "1"), cwd=workdir, env=env,
                         stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, start_new_session=True)
        for _ in range(2)]
    client = MlflowClient(f"sqlite:///{workdir / 'mlflow.db'}")
    try:
        deadline, owners = time.time() + 120, {}
        while len(owners) < 2 and time.time() < deadline:
            time.sleep(0.3)
            for t in study.get_trials(states=(optuna.trial.TrialState.RUNNING,)):
                run = t.user_attrs.get("mlflow_run_id")
                if run and t.intermediate_values:
                    owners[int(client.get_run(run).data.tags["pid"])] = t
        assert set(owners) == {victim.pid, survivor.pid}, owners
        doomed, busy = owners[victim.pid], owners[survivor.pid]
        os.killpg(victim.pid, signal.SIGKILL)
        victim.wait(timeout=30)
        killed = time.time()
        while study.get_trials()[doomed.number].state == optuna.trial.TrialState.RUNNING and time.time() < killed + 10:
            time.sleep(0.2)
        # stale after 3 missed heartbeats (3 s), found by the survivor's next check (at most 3 s later)
        assert study.get_trials()[doomed.number].state == optuna.trial.TrialState.FAIL
        assert time.time() - killed < 10
        trials = study.get_trials()
        assert trials[busy.number].state == optuna.trial.TrialState.RUNNING  # the survivor is still mid-trial

        def retries_of_doomed() -> list:
            return [t for t in study.get_trials()
                    if optuna.storages.RetryHeartbeatStaleTrialCallback.retried_trial_number(t) == doomed.number]

        # Optuna fails the trial, then its retry callback queues the copy: allow for the moment in between
        while not (retries := retries_of_doomed()) and time.time() < killed + 15:
            time.sleep(0.2)
        assert [(t.state, t.params) for t in retries] == [(optuna.trial.TrialState.WAITING, doomed.params)]
        assert client.get_run(doomed.user_attrs["mlflow_run_id"]).info.status == "FAILED"
    finally:
        for p in workers:
            if p.poll() is None:
                os.killpg(p.pid, signal.SIGKILL)
            p.wait(timeout=30)


def test_a_rerun_ends_the_mlflow_runs_a_second_ctrl_c_left_running(workdir, mlflow_template, monkeypatch, capsys):
    from optuna.trial import TrialState

    from ablate.stores import Stores
    from ablate.study import records, worker
    from ablate.study.session import StudySession

    shutil.copy(mlflow_template, workdir / "mlflow.db")
    path = _write(workdir, "probe.toml", SUITE.format(extra='name = "probe"'))
    args = ["run-suite", path, "--array", "1", "--epochs", "1"]
    code, _, err = run_cli([*args, "--jobs", "0"], monkeypatch, capsys)  # the study and its parent run (RUNNING)
    assert code == 0, err
    # A worker took a trial and started its MLflow run, then a second Ctrl-C stopped it before it ended the run.
    ctx = StudySession.open("probe", Stores()).context()
    (trial,) = worker.take(ctx)
    run_id = ctx.tracker.start_run(ctx.experiment_id, "abandoned", {}, ctx.parent_run_id)
    records.write_run(trial, run_id)
    ctx.study.tell(trial, state=TrialState.FAIL)
    client = ctx.tracker.client
    assert client.get_run(run_id).info.status == client.get_run(ctx.parent_run_id).info.status == "RUNNING"

    code, out, err = run_cli([*args, "--jobs", "1"], monkeypatch, capsys)
    assert code == 0, err + out
    assert client.get_run(run_id).info.status == "KILLED"
    assert client.get_run(ctx.parent_run_id).info.status == "FINISHED"


def _taken_study(workdir: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]) -> Any:
    """A 2-trial search created for remote workers (--jobs 0) on the embedded SQLite store, and its worker context."""
    from ablate.stores import Stores
    from ablate.study import worker

    code, _, err = run_cli(["tune", "temperature", "--n-trials", "2", "--epochs", "2", "--jobs", "0",
                            "--heartbeat", "1", "--data", "pairs.npz", "--set", "model.hidden=[16]"],
                           monkeypatch, capsys)
    assert code == 0, err
    stores = Stores(None, None, 1)
    return worker.Context.open("temperature", stores)


def test_a_worker_takes_and_samples_trials_queued_after_it_read_the_study(workdir, monkeypatch, capsys):
    """The queue is read past Optuna's trial cache, which must have read a trial before the sampler can set its
    parameters: a trial queued after the worker's first look (a continuation, more trials) is sampled all the same."""
    import optuna

    from ablate.study import records, worker

    ctx = _taken_study(workdir, monkeypatch, capsys)
    (first,) = worker.take(ctx)
    ctx.spec.suggest(first)
    other = optuna.load_study(study_name=ctx.name, storage=f"sqlite:///{workdir / 'optuna.db'}")  # another process
    other.enqueue_trial({}, user_attrs={records.QUEUED: True, records.RESUMES: first.number})
    (resumed,) = worker.take(ctx)  # the newest trial, a continuation, goes first
    assert resumed.number == 2
    assert "temperature" in ctx.spec.suggest(resumed).values
    (last,) = worker.take(ctx)
    assert last.number == 1 and "temperature" in ctx.spec.suggest(last).values
    assert worker.take(ctx) == []


@pytest.mark.slow
def test_a_trial_taken_by_a_worker_that_dies_before_its_first_heartbeat_is_retried(workdir, monkeypatch, capsys):
    from optuna.trial import TrialState

    from ablate.study import worker

    ctx = _taken_study(workdir, monkeypatch, capsys)
    (taken,) = worker.take(ctx)  # the worker dies here: RUNNING, and nothing more happens to it
    assert ctx.study.get_trials()[taken.number].state == TrialState.RUNNING
    proc = subprocess.run([sys.executable, "-m", "ablate", "worker", ctx.name, "--heartbeat", "1", "--jobs", "1"],
                          cwd=workdir, capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    states = [t.state for t in ctx.study.get_trials()]
    assert states[taken.number] == TrialState.FAIL  # stale after its beat at taking, then retried
    assert states.count(TrialState.COMPLETE) == 2 and TrialState.RUNNING not in states


def test_ctrl_c_while_taking_trials_puts_the_ones_taken_back_in_the_queue_as_they_were(workdir, monkeypatch, capsys):
    from optuna.trial import TrialState

    from ablate.study import worker

    ctx = _taken_study(workdir, monkeypatch, capsys)
    real = ctx.storage.set_trial_state_values
    calls = {"n": 0}

    def interrupted(*args: Any, **kwargs: Any) -> bool:
        calls["n"] += 1
        if calls["n"] == 2:
            raise KeyboardInterrupt
        return real(*args, **kwargs)

    monkeypatch.setattr(ctx.storage, "set_trial_state_values", interrupted)
    with pytest.raises(KeyboardInterrupt):
        worker.take(ctx, array=2)
    trials = ctx.study.get_trials()
    assert [(t.number, t.state) for t in trials] == [(0, TrialState.WAITING), (1, TrialState.WAITING)]
    # the first was taken, then given back: the same trial (its number seeds its draw), nothing left RUNNING


@pytest.mark.parametrize(("old", "new", "message"), [
    ("epochs = 2", "epochs = true", "epochs: true is a boolean where a number belongs"),
    ("batch_size = 16", "batch_size = 16\nlr = true", "lr: true is a boolean where a number belongs"),
    ("seeds = [0]", "seeds = [true]", "seeds: [true] holds a boolean where a number belongs"),
    ("hidden = [16]", "hidden = [16, false]", "hidden: [16, false] holds a boolean where a number belongs"),
])
def test_a_boolean_where_a_number_belongs_is_refused(workdir, monkeypatch, capsys, old, new, message):
    path = _write(workdir, "probe.toml", SUITE.format(extra='name = "probe"').replace(old, new, 1))
    _one_line_error(workdir, ["run-suite", path], monkeypatch, capsys, message)


def test_a_boolean_for_a_number_on_the_command_line_is_refused(workdir, monkeypatch, capsys):
    _one_line_error(workdir, ["train", "--data", "pairs.npz", "--set", "epochs=true"], monkeypatch, capsys,
                    "epochs: true is a boolean where a number belongs")


@pytest.mark.bare
@pytest.mark.parametrize(("args", "message"), [
    (["--storage", "sqlite://"], "storage sqlite://: an in-memory SQLite store lives and dies with one process"),
    (["--storage", "sqlite:///:memory:"], "storage sqlite:///:memory:: an in-memory SQLite store"),
    (["--tracking-uri", "databricks"], "tracking URI databricks: not a store ablate can log to and keep"),
    (["--tracking-uri", "sqlite:///:memory:"], "tracking URI sqlite:///:memory:: not a store ablate can log to"),
])
@pytest.mark.parametrize("command", ["run-suite", "tune"])
def test_a_store_that_cannot_be_shared_or_kept_is_one_line(workdir, monkeypatch, capsys, args, message, command):
    study = "baseline-vs-multistage" if command == "run-suite" else "temperature"
    _one_line_error(workdir, [command, study, "--epochs", "3", "--data", "pairs.npz", *args], monkeypatch, capsys,
                    message)
    assert sorted(p.name for p in workdir.iterdir()) == ["pairs.npz"]  # no store was made


def test_ablate_train_refuses_a_tracking_uri_it_cannot_log_to_before_training(workdir, monkeypatch, capsys):
    _one_line_error(workdir, ["train", "--data", "pairs.npz", "--tracking-uri", "databricks"], monkeypatch, capsys,
                    "tracking URI databricks: not a store ablate can log to and keep")


def test_a_study_made_before_test_splits_is_not_trained_further(workdir, monkeypatch, capsys):
    from ablate.study import records, studies

    code, _, err = run_cli(["tune", "temperature", "--n-trials", "2", "--epochs", "2", "--jobs", "0", "--data",
                            "pairs.npz", "--set", "model.hidden=[16]"], monkeypatch, capsys)
    assert code == 0, err
    study = studies.load("temperature", studies.open_storage(f"sqlite:///{workdir / 'optuna.db'}")).study
    doc = study.user_attrs[records.SPEC]
    del doc["base"]["data"]["test_fraction"]  # as an earlier ablate stored it
    study.set_user_attr(records.SPEC, doc)
    code, out, err = run_cli(["worker", study.study_name, "--jobs", "1"], monkeypatch, capsys)
    (line,) = [x for x in err.splitlines() if x.strip()]
    assert code == 2 and f"study {study.study_name} was made by an ablate without test splits" in line
    assert "training" not in out
    assert {t.state.name for t in study.get_trials()} == {"WAITING"}


@pytest.mark.bare
@pytest.mark.parametrize("args", [["studies", "show", "x"], ["studies", "export", "x"], ["report", "x"],
                                  ["worker", "x"]])
def test_a_command_that_only_reads_creates_no_store_where_there_is_none(workdir, monkeypatch, capsys, args):
    _one_line_error(workdir, args, monkeypatch, capsys, "no Optuna storage at sqlite:///", "no study has run here yet")
    assert sorted(p.name for p in workdir.iterdir()) == ["pairs.npz"]


@pytest.mark.bare
def test_studies_list_where_there_is_no_storage_says_so_and_creates_nothing(workdir, monkeypatch, capsys):
    code, out, _err = run_cli(["studies", "list"], monkeypatch, capsys)
    assert code == 0 and "no studies in sqlite:///" in out and "no Optuna storage there yet" in out
    assert sorted(p.name for p in workdir.iterdir()) == ["pairs.npz"]


@pytest.mark.parametrize("args", [["train", "--data", "pairs.npz", "--epochs", "2"],
                                  ["run-suite", "baseline-vs-multistage", "--epochs", "3", "--data", "pairs.npz"]])
def test_a_model_that_cannot_fit_is_refused_before_it_is_built(workdir, monkeypatch, capsys, args):
    _one_line_error(workdir, [*args, "--set", "model.hidden=[100000000000]"], monkeypatch, capsys,
                    "model.hidden [100000000000]: a 8 -> 12 model (2.1e+12 parameters) needs about",
                    "GiB is free; use smaller hidden widths")


def test_a_run_no_trial_recorded_is_ended_by_the_next_command(workdir, mlflow_template, monkeypatch, capsys):
    from optuna.trial import TrialState

    from ablate.stores import Stores
    from ablate.study import worker
    from ablate.study.session import StudySession

    shutil.copy(mlflow_template, workdir / "mlflow.db")
    path = _write(workdir, "probe.toml", SUITE.format(extra='name = "probe"'))
    args = ["run-suite", path, "--array", "1", "--epochs", "1"]
    code, _, err = run_cli([*args, "--jobs", "0"], monkeypatch, capsys)
    assert code == 0, err
    # A worker started the trial's MLflow run and was killed before it recorded the run on the trial.
    ctx = StudySession.open("probe", Stores()).context()
    (trial,) = worker.take(ctx)
    run_id = ctx.tracker.start_run(ctx.experiment_id, "orphan", {"ablate.study": ctx.name,
                                                                 "ablate.trial": trial.number}, ctx.parent_run_id)
    ctx.study.tell(trial, state=TrialState.FAIL)  # as the stale check fails it
    code, out, err = run_cli([*args, "--jobs", "1"], monkeypatch, capsys)
    assert code == 0, err + out
    client = ctx.tracker.client
    assert client.get_run(run_id).info.status == "KILLED"
    assert client.get_run(ctx.parent_run_id).info.status == "FINISHED"
    statuses = {r.info.status for r in client.search_runs([ctx.experiment_id])}
    assert "RUNNING" not in statuses


def test_processes_opening_a_new_sqlite_storage_at_once_all_open_it(tmp_path):
    """The first use of an optuna.db by several processes (a command and its workers, or a reader polling it):
    one creates the schema, the others wait for it instead of failing on a half-created store."""
    code = ("import sys; from ablate.study.studies import open_storage; "
            "open_storage(sys.argv[1]); print('opened')")
    for attempt in range(3):
        url = f"sqlite:///{tmp_path / f'optuna{attempt}.db'}"
        procs = [subprocess.Popen([sys.executable, "-c", code, url], stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                                  text=True) for _ in range(4)]
        results = [p.communicate(timeout=120) for p in procs]
        assert all(p.returncode == 0 and out.strip() == "opened" for p, (out, _) in zip(procs, results, strict=True)), \
            [err.strip().splitlines()[-1:] for _, err in results]


@pytest.mark.parametrize("command", [["train", "--epochs", "1"],
                                     ["run-suite", "baseline-vs-multistage", "--seeds", "0"]])
def test_a_mistake_in_a_data_file_answers_before_torch_is_imported(tmp_path, command):
    np.savez(tmp_path / "short.npz", pocket=np.ones((5, 3), np.float32), ligand=np.ones((4, 3), np.float32))
    shutil.copytree(Path(__file__).resolve().parents[1] / "studies", tmp_path / "studies")
    code = ("import sys; from ablate.cli import main; sys.argv = ['ablate', *sys.argv[1:]]\n"
            "try:\n    main()\nexcept SystemExit as e:\n    print(e.code, 'torch' in sys.modules, file=sys.stderr)")
    out = subprocess.run([sys.executable, "-c", code, *command, "--data", "short.npz"], cwd=tmp_path,
                         capture_output=True, text=True, timeout=120)
    lines = out.stderr.strip().splitlines()
    assert "short.npz: 'pocket' has 5 rows but 'ligand' has 4" in lines[0]
    assert lines[-1] == "2 False"


@pytest.mark.slow
def test_stores_only_readable_here_still_report_and_refuse_training_in_one_line(workdir, monkeypatch, capsys,
                                                                                make_readonly):
    """A finished suite whose optuna.db and mlflow.db sit in a folder this process cannot write (SQLite writes its
    journal beside them): `report` writes its files elsewhere and says it could not publish; training is one line."""
    kept = workdir / "kept"
    kept.mkdir()
    study = _write(workdir, "tiny.toml", SUITE.format(extra='name = "ro"'))
    stores = ["--storage", f"sqlite:///{kept / 'optuna.db'}", "--tracking-uri", f"sqlite:///{kept / 'mlflow.db'}"]
    code, out, err = run_cli(["run-suite", study, *stores, "--out", "first"], monkeypatch, capsys)
    assert code == 0, err
    name = next(p.name for p in (workdir / "first").iterdir())
    before = {p.name: p.read_bytes() for p in kept.iterdir() if p.is_file()}
    make_readonly(kept)
    code, out, err = run_cli(["report", name, *stores, "--out", "again"], monkeypatch, capsys)
    assert code == 0, err
    assert "the stores are read-only here: the report is not put on MLflow" in out and "Traceback" not in err
    assert (workdir / "again" / name / "report.md").read_text() == (workdir / "first" / name / "report.md").read_text()
    code, out, err = run_cli(["studies", "show", name, *stores[:2]], monkeypatch, capsys)
    assert code == 0 and "COMPLETE 2" in out, err
    _one_line_error(workdir, ["run-suite", study, "--seeds", "0,1", *stores], monkeypatch, capsys,
                    f"the Optuna storage sqlite:///{kept / 'optuna.db'} is read-only here", no_store=False)
    _one_line_error(workdir, ["run-suite", study, "--seeds", "0,1", "--storage", "sqlite:///fresh.db",
                              "--tracking-uri", f"sqlite:///{kept / 'mlflow.db'}"], monkeypatch, capsys,
                    f"the MLflow store sqlite:///{kept / 'mlflow.db'}: cannot write in its folder", no_store=False)
    assert {p.name: p.read_bytes() for p in kept.iterdir() if p.is_file()} == before  # nothing was written
