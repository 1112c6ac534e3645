"""`ablate ui`: the MLflow UI on the suite's own store, read back in headless Chromium.

The browser is Debian's `chromium`, driven through `chromedriver` over the W3C WebDriver
protocol with urllib only (no Selenium, no Playwright). The MLflow UI is a React app, so
every check polls the rendered DOM until the app has drawn what is asked for.
"""

from __future__ import annotations

import base64
import contextlib
import json
import math
import os
import re
import shutil
import signal
import socket
import subprocess
import time
import urllib.error
import urllib.request
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from support import ablate_command

CHROMIUM = shutil.which("chromium")
CHROMEDRIVER = shutil.which("chromedriver")

pytestmark = [
    pytest.mark.slow,
    pytest.mark.skipif(
        CHROMIUM is None or CHROMEDRIVER is None,
        reason="Chromium not installed: apt-get install chromium chromium-driver",
    ),
]

SUITE = "baseline-vs-multistage"
EPOCHS = 3
SUITE_ARGS = [
    "run-suite", SUITE, "--epochs", str(EPOCHS), "--seeds", "0",
    "--set", "data.synthetic.n_ligands=80", "--set", "data.synthetic.n_families=10",
]
# Flags for Chromium as root in a container; without the background-networking ones,
# connections get refused en masse on some machines.
CHROMIUM_ARGS = [
    "--headless", "--no-sandbox", "--disable-gpu", "--disable-dev-shm-usage", "--disable-quic",
    "--no-first-run", "--disable-background-networking", "--disable-component-update",
    "--disable-sync", "--window-size=1400,1000",
]
# MLflow 3's UI opens experiments in its GenAI view unless asked for the model-training one.
ML_VIEW = "workflowType=machine_learning"


# --------------------------------------------------------------------------------------
# Processes
# --------------------------------------------------------------------------------------


def _env() -> dict[str, str]:
    """This environment without store overrides, so both commands use ./mlflow.db and ./optuna.db."""
    env = {k: v for k, v in os.environ.items() if k not in ("MLFLOW_TRACKING_URI", "ABLATE_STORAGE")}
    env["MLFLOW_DISABLE_TELEMETRY"] = "true"
    return env


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


@contextlib.contextmanager
def _started(cmd: list[str], cwd: Path, log: Path) -> Iterator[subprocess.Popen[bytes]]:
    """Run ``cmd`` in its own process group; whatever of the group is left is killed at the end."""
    with log.open("wb") as out:
        proc = subprocess.Popen(cmd, cwd=cwd, env=_env(), stdout=out, stderr=subprocess.STDOUT,
                                start_new_session=True)
    try:
        yield proc
    finally:
        if proc.poll() is None:
            _signal_group(proc, signal.SIGINT)
            with contextlib.suppress(subprocess.TimeoutExpired):
                proc.wait(timeout=30)
        _signal_group(proc, signal.SIGKILL)  # children that outlived their parent (MLflow's job runners)
        proc.wait()


def _signal_group(proc: subprocess.Popen[bytes], sig: signal.Signals) -> None:
    with contextlib.suppress(ProcessLookupError, PermissionError):
        os.killpg(proc.pid, sig)


def _tail(log: Path, n: int = 3000) -> str:
    return log.read_text(errors="replace")[-n:]


def _wait_for_output(proc: subprocess.Popen[bytes], log: Path, pattern: str, timeout: float) -> re.Match[str]:
    """Wait until the process has printed a line matching ``pattern``."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        found = re.search(pattern, log.read_text(errors="replace"))
        if found:
            return found
        if proc.poll() is not None:
            pytest.fail(f"{proc.args!r} exited with {proc.returncode} before printing {pattern!r}:\n{_tail(log)}")
        time.sleep(0.2)
    pytest.fail(f"{proc.args!r} printed no {pattern!r} within {timeout:.0f} s:\n{_tail(log)}")


def _wait_healthy(url: str, proc: subprocess.Popen[bytes], log: Path, timeout: float) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            pytest.fail(f"`ablate ui` exited with {proc.returncode}:\n{_tail(log)}")
        try:
            with urllib.request.urlopen(f"{url}/health", timeout=2) as r:
                if r.status == 200:
                    return
        except OSError:
            pass
        time.sleep(0.3)
    pytest.fail(f"the MLflow UI at {url} did not answer /health within {timeout:.0f} s:\n{_tail(log)}")


def _listening_hosts(port: int) -> set[str]:
    """Addresses with a TCP socket listening on ``port``, read from Linux's /proc/net/tcp{,6}."""
    hosts: set[str] = set()
    for name, family in (("tcp", socket.AF_INET), ("tcp6", socket.AF_INET6)):
        table = Path("/proc/net") / name
        if not table.exists():
            continue
        for line in table.read_text().splitlines()[1:]:
            local, state = line.split()[1], line.split()[3]
            addr, hex_port = local.split(":")
            if state != "0A" or int(hex_port, 16) != port:  # 0A: LISTEN
                continue
            raw = bytes.fromhex(addr)  # the kernel prints 32-bit words in host (little-endian) order
            raw = b"".join(raw[i:i + 4][::-1] for i in range(0, len(raw), 4))
            hosts.add(socket.inet_ntop(family, raw))
    return hosts


# --------------------------------------------------------------------------------------
# A WebDriver client in a few lines
# --------------------------------------------------------------------------------------


class Browser:
    """Headless Chromium, driven by chromedriver over the W3C WebDriver protocol."""

    def __init__(self, workdir: Path):
        port = _free_port()
        self.base = f"http://127.0.0.1:{port}"
        self.workdir = workdir
        self.driver = subprocess.Popen([str(CHROMEDRIVER), f"--port={port}"], stdout=subprocess.DEVNULL,
                                       stderr=subprocess.DEVNULL)
        self.session = ""
        deadline = time.monotonic() + 30
        while True:
            try:
                if self._call("GET", "/status")["ready"]:
                    break
            except OSError:
                if time.monotonic() > deadline:
                    raise
            time.sleep(0.1)
        options = {"binary": CHROMIUM, "args": [*CHROMIUM_ARGS, f"--user-data-dir={workdir / 'profile'}"]}
        caps = {"capabilities": {"alwaysMatch": {"browserName": "chrome", "goog:chromeOptions": options}}}
        self.session = self._call("POST", "/session", caps)["sessionId"]

    def _call(self, method: str, path: str, body: dict[str, Any] | None = None) -> Any:
        data = None if body is None else json.dumps(body).encode()
        request = urllib.request.Request(self.base + path, data=data, method=method,
                                         headers={"Content-Type": "application/json"})
        try:
            with urllib.request.urlopen(request, timeout=120) as r:
                return json.loads(r.read())["value"]
        except urllib.error.HTTPError as e:
            raise RuntimeError(f"WebDriver {method} {path}: {e.read().decode(errors='replace')[:2000]}") from None

    def open(self, url: str) -> None:
        """Navigate to ``url`` and wait for the document (not the React app) to load."""
        self._call("POST", f"/session/{self.session}/url", {"url": url})

    def js(self, script: str, *args: Any) -> Any:
        """Run a function body in the page and return its JSON-able result."""
        return self._call("POST", f"/session/{self.session}/execute/sync", {"script": script, "args": list(args)})

    def type(self, css: str, text: str) -> None:
        """Type ``text`` into the element ``css`` selects, as key presses."""
        found = self._call("POST", f"/session/{self.session}/element", {"using": "css selector", "value": css})
        (element,) = found.values()
        self._call("POST", f"/session/{self.session}/element/{element}/value", {"text": text})

    def wait(self, script: str, *args: Any, what: str, timeout: float = 90) -> Any:
        """Poll ``script`` until it returns something truthy; on timeout save a screenshot and fail."""
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            value = self.js(script, *args)
            if value:
                return value
            time.sleep(0.25)
        shot = self.workdir / (re.sub(r"\W+", "_", what) + ".png")
        shot.write_bytes(base64.b64decode(self._call("GET", f"/session/{self.session}/screenshot")))
        text = self.js("return document.body ? document.body.innerText : ''")
        pytest.fail(f"the MLflow UI never showed {what} in {timeout:.0f} s (at {self.js('return location.href')}; "
                    f"screenshot {shot}); page text:\n{text[:3000]}")

    def close(self) -> None:
        try:
            if self.session:
                self._call("DELETE", f"/session/{self.session}")
        finally:
            self.driver.terminate()
            try:
                self.driver.wait(timeout=10)
            except subprocess.TimeoutExpired:
                self.driver.kill()
                self.driver.wait()


@pytest.fixture
def browser(tmp_path: Path) -> Iterator[Browser]:
    """A fresh headless Chromium with an empty profile."""
    workdir = tmp_path / "browser"
    workdir.mkdir()
    b = Browser(workdir)
    try:
        yield b
    finally:
        b.close()


# Page scripts. arguments[...] are the values passed to Browser.js / Browser.wait.
# The expand button of a run's row: in the same cell as the link to the run (arguments[0]: its id).
EXPANDER = ("document.querySelector(`a[href$='/runs/${arguments[0]}']`)"
            "?.closest('[role=gridcell]')?.querySelector('button')")
RUN_LINKS = """
const found = {};
for (const id of arguments[0]) {
  const a = document.querySelector(`a[href$="/runs/${id}"]`);
  if (!a) return null;
  found[id] = a.innerText.trim();
}
return found;
"""
CHART_SEARCH = "input[placeholder='Search metric charts']"
CHART = """
for (const card of document.querySelectorAll('[data-testid=experiment-view-compare-runs-card]')) {
  const plot = card.querySelector('.js-plotly-plot');
  if (!card.innerText.includes(`(${arguments[0]})`) || !plot || !plot.data || !plot.data.length) continue;
  return plot.data.map(t => ({name: t.name, x: Array.from(t.x), y: Array.from(t.y)}));
}
return null;
"""


# --------------------------------------------------------------------------------------
# The test
# --------------------------------------------------------------------------------------


def test_ui_shows_the_suites_child_runs_and_their_epoch_curves(tmp_path: Path, browser: Browser) -> None:
    """`ablate ui` serves the suite's store on 127.0.0.1: child runs in the table, per-epoch charts."""
    work = tmp_path / "work"
    work.mkdir()
    port = _free_port()
    suite_log, ui_log = tmp_path / "run-suite.log", tmp_path / "ui.log"

    with _started(ablate_command(*SUITE_ARGS), work, suite_log) as suite:
        # The UI starts once the suite has created its MLflow store, while it trains.
        _wait_for_output(suite, suite_log, r"MLflow parent run", timeout=180)
        with _started(ablate_command("ui", "--port", str(port)), work, ui_log) as ui:
            assert suite.wait(timeout=300) == 0, _tail(suite_log)

            import mlflow

            client = mlflow.MlflowClient("sqlite:///" + str(work / "mlflow.db"))
            (experiment,) = [e for e in client.search_experiments() if e.name != "Default"]
            runs = client.search_runs([experiment.experiment_id])
            (parent,) = [r for r in runs if "mlflow.parentRunId" not in r.data.tags]
            children = {r.info.run_id: r for r in runs if r.data.tags.get("mlflow.parentRunId") == parent.info.run_id}
            assert len(children) == 5  # five experiments x one seed
            baseline = next(r for r in children.values() if r.data.tags.get("ablate.experiment") == "baseline")
            history = sorted(client.get_metric_history(baseline.info.run_id, "val/top1"), key=lambda m: m.step)
            assert [m.step for m in history] == list(range(EPOCHS))

            printed = _wait_for_output(ui, ui_log, r"http://[\w.\[\]:-]+:\d+", timeout=60).group(0)
            assert printed == f"http://127.0.0.1:{port}", _tail(ui_log)
            _wait_healthy(printed, ui, ui_log, timeout=120)
            if Path("/proc/net/tcp").exists():
                assert _listening_hosts(port) == {"127.0.0.1"}

            # The experiment's runs table: the parent, and its child runs once expanded.
            exp_url = f"{printed}/#/experiments/{experiment.experiment_id}"
            browser.open(f"{exp_url}/runs?{ML_VIEW}")
            browser.wait(f"return !!{EXPANDER}", parent.info.run_id, what="the suite's parent run, expandable")
            if not browser.js(RUN_LINKS, list(children)):  # nested runs start collapsed
                browser.js(f"{EXPANDER}.click()", parent.info.run_id)
            shown = browser.wait(RUN_LINKS, list(children), what="the suite's child runs")
            assert shown == {run_id: r.info.run_name for run_id, r in children.items()}

            # One child run's metric charts: val/top1 per epoch, with the values in the store.
            # The UI draws only the charts in view; its chart search brings val/top1 there.
            browser.open(f"{exp_url}/runs/{baseline.info.run_id}/model-metrics?{ML_VIEW}")
            browser.wait("return !!document.querySelector(arguments[0])", CHART_SEARCH, what="the chart search box")
            browser.type(CHART_SEARCH, "val/top1")
            traces = browser.wait(CHART, "val/top1", what="a val/top1 chart")
            assert {t["name"] for t in traces} == {baseline.info.run_name}
            for trace in traces:
                assert trace["x"] == [m.step for m in history]
                assert all(math.isclose(a, m.value, rel_tol=1e-6) for a, m in zip(trace["y"], history, strict=True))

            # Ctrl-C (SIGINT to the process group, as a terminal sends it) stops the UI.
            _signal_group(ui, signal.SIGINT)
            assert ui.wait(timeout=60) == 0, _tail(ui_log)
            deadline = time.monotonic() + 30
            while _listening_hosts(port) and time.monotonic() < deadline:
                time.sleep(0.2)
            assert not _listening_hosts(port)
