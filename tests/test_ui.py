"""`ablate ui` and `ablate dashboard`: local servers on ablate's stores, read back in headless Chromium.

The fast tests check the servers' command-line behaviour (a busy port, --port 0, a host open to the
network, Ctrl-C and SIGTERM, a missing extra). The browser is Debian's `chromium`, driven through
`chromedriver` over the W3C WebDriver protocol with urllib only (no Selenium, no Playwright). The
MLflow UI and optuna-dashboard are React apps, so every check polls the rendered DOM until the app has
drawn what is asked for.
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
import sys
import time
import urllib.error
import urllib.request
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest
from support import TINY, ablate_command, run_cli

from ablate.cli import servers
from ablate.errors import AblateError
from ablate.tracking.client import CURVES

CHROMIUM = shutil.which("chromium")
CHROMEDRIVER = shutil.which("chromedriver")

needs_chromium = pytest.mark.skipif(
    CHROMIUM is None or CHROMEDRIVER is None,
    reason="Chromium not installed: apt-get install chromium chromium-driver",
)

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


# Starts a command with SIGINT ignored, as a shell starts a background job (`ablate ui &` in a script).
SIGINT_IGNORED = ["-c", "import os, signal, sys; signal.signal(signal.SIGINT, signal.SIG_IGN); "
                  "os.execv(sys.executable, [sys.executable, *sys.argv[1:]])"]


@contextlib.contextmanager
def _started(cmd: list[str], cwd: Path, log: Path, sigint_ignored: bool = False
             ) -> Iterator[subprocess.Popen[bytes]]:
    """Run ``cmd`` in its own process group; whatever of the group is left is killed at the end."""
    if sigint_ignored:
        cmd = [cmd[0], *SIGINT_IGNORED, *cmd[1:]]
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


def _server_pid(proc: subprocess.Popen[bytes], timeout: float = 30) -> int:
    """The pid of the server a command started (its child other than the watchdog), read from /proc."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        children = Path(f"/proc/{proc.pid}/task/{proc.pid}/children").read_text().split()
        servers = [int(c) for c in children if b"sys.stdin.buffer.read()" not in _cmdline(int(c))]
        if servers:
            return servers[0]
        time.sleep(0.1)
    pytest.fail(f"{proc.args!r} started no server within {timeout:.0f} s")


def _cmdline(pid: int) -> bytes:
    try:
        return Path(f"/proc/{pid}/cmdline").read_bytes()
    except OSError:
        return b""


def _group_members(pgid: int) -> list[int]:
    """Live (not zombie) processes in process group ``pgid``, read from /proc."""
    members = []
    for stat in Path("/proc").glob("[0-9]*/stat"):
        try:
            fields = stat.read_text().rsplit(")", 1)[1].split()
        except OSError:
            continue
        if fields[0] != "Z" and int(fields[2]) == pgid:
            members.append(int(stat.parent.name))
    return members


def _until(condition: Any, timeout: float = 30) -> bool:
    """Poll ``condition()`` until it is true or ``timeout`` seconds have passed; returns its last value."""
    deadline = time.monotonic() + timeout
    while not condition() and time.monotonic() < deadline:
        time.sleep(0.2)
    return bool(condition())


def _get(url: str) -> bytes:
    """GET ``url`` (no proxy: the servers are local)."""
    opener = urllib.request.build_opener(urllib.request.ProxyHandler({}))
    with opener.open(url, timeout=30) as response:
        return bytes(response.read())


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
        pytest.fail(f"the page never showed {what} in {timeout:.0f} s (at {self.js('return location.href')}; "
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


EXPERIMENTS = ("baseline", "cosine", "infonce", "combined", "multistage")
# The runs table grouped by a tag: one "Group: VALUE" row per value (arguments[0]: how many to wait for).
GROUPS = """
const labels = [];
for (const line of document.body.innerText.split('\\n')) {
  const m = line.trim().match(/^Group: (.+)$/);
  if (m) labels.push(m[1]);
}
return labels.length >= arguments[0] ? labels : null;
"""
# A chart of the runs page in chart mode (arguments[0]: its metric; arguments[1]: its section). The page
# draws only the charts in view, so the section is scrolled there first.
SECTION_CHART = """
const [metric, section] = arguments;
for (const h of document.querySelectorAll('[data-testid=experiment-view-compare-runs-section-header]')) {
  if (h.innerText.split('\\n')[0].trim() === section) h.scrollIntoView();
}
for (const card of document.querySelectorAll('[data-testid=experiment-view-compare-runs-card]')) {
  const plot = card.querySelector('.js-plotly-plot');
  if (card.innerText.split('\\n')[0].trim() !== metric || !plot || !plot.data || !plot.data.length) continue;
  return {text: card.innerText, traces: plot.data.map(t => ({mode: t.mode || null, fill: t.fill || null,
                                                            x: Array.from(t.x || []), y: Array.from(t.y || [])}))};
}
return null;
"""
# The titles of the chart cards in page order, once there are at least arguments[0] of them.
CARD_TITLES = """
const titles = Array.from(document.querySelectorAll('[data-testid=experiment-view-compare-runs-card]'),
                          card => card.innerText.split('\\n')[0].trim());
return titles.length >= arguments[0] ? titles : null;
"""
# optuna-dashboard's study page: every plot's traces, once the history and intermediate-value plots are drawn.
DASHBOARD_PLOTS = """
const traces = [];
for (const plot of document.querySelectorAll('.js-plotly-plot')) {
  for (const t of plot.data || []) traces.push({name: (t.name || '').trim(), x: Array.from(t.x || []),
                                                y: Array.from(t.y || [])});
}
const named = prefix => traces.some(t => t.name.startsWith(prefix) && t.x.length);
return named('val/mrr of ') && named('trial #') ? traces : null;
"""


# --------------------------------------------------------------------------------------
# Without a browser: ports, hosts, logs, signals, the optional extra
# --------------------------------------------------------------------------------------


def test_claim_port_refuses_a_busy_port_and_picks_a_free_one() -> None:
    """A port another program listens on is a user's mistake naming the port; port 0 is a free port."""
    with socket.socket() as busy:
        busy.bind(("127.0.0.1", 0))
        busy.listen()
        port = busy.getsockname()[1]
        for host in ("127.0.0.1", "0.0.0.0"):  # the wildcard address overlaps the loopback one
            with pytest.raises(AblateError, match=rf"^port {port} on {re.escape(host)} is already in use.*--port"):
                servers.claim_port(host, port)
    free = servers.claim_port("127.0.0.1", 0)
    assert free > 0
    with socket.socket() as s:
        s.bind(("127.0.0.1", free))  # it is free indeed
    with pytest.raises(AblateError, match=r"^--host 'no-such-host\.invalid' is not an address"):
        servers.claim_port("no-such-host.invalid", 0)


def test_only_loopback_hosts_are_local() -> None:
    """127.0.0.1 and localhost are local; 0.0.0.0 is the network, with a warning; browsers get a loopback URL."""
    assert servers.is_loopback("127.0.0.1") and servers.is_loopback("localhost")
    assert servers.exposure_warning("127.0.0.1", 5000, "the MLflow UI") is None
    assert not servers.is_loopback("0.0.0.0")
    warning = servers.exposure_warning("0.0.0.0", 5000, "the MLflow UI")
    assert warning is not None and "\n" not in warning
    assert warning.startswith("warning: the MLflow UI listens on 0.0.0.0:5000") and "without authentication" in warning
    assert servers.base_url("0.0.0.0", 5000) == "http://127.0.0.1:5000"
    assert servers.base_url("::1", 8080) == "http://[::1]:8080"


def test_a_server_that_exits_is_one_line_with_the_end_of_its_log(tmp_path: Path) -> None:
    """A server that dies before it answers: its exit code and the last lines it logged in this run."""
    log = tmp_path / "server.log"
    log.write_text("a line from an earlier run\n")
    script = ("import sys; print('starting'); print('OSError: [Errno 98] address already in use', "
              "file=sys.stderr); sys.exit(3)")
    with pytest.raises(AblateError) as error, servers.running("the test server", [sys.executable, "-c", script],
                                                               os.environ, log) as server:
        servers.wait_ready(server, "http://127.0.0.1:9/health", lambda body: True, timeout=60)
    message = str(error.value)
    assert "\n" not in message
    assert message.startswith("the test server exited with code 3 before it answered at http://127.0.0.1:9/health")
    assert message.endswith(f"its log {log} ends: starting | OSError: [Errno 98] address already in use")


def test_a_silent_server_times_out_and_its_whole_process_group_is_stopped(tmp_path: Path) -> None:
    """A server that never answers is an error after the deadline; it and its children are stopped."""
    script = ("import subprocess, time; subprocess.Popen(['sleep', '300']); print('waiting', flush=True); "
              "time.sleep(300)")
    with pytest.raises(AblateError) as error, servers.running("the test server", [sys.executable, "-c", script],
                                                               os.environ, tmp_path / "server.log") as server:
        group = server.process.pid
        assert _until(lambda: len(_group_members(group)) == 2)  # python and its sleep
        servers.wait_ready(server, "http://127.0.0.1:9/health", lambda body: True, timeout=1)
    assert re.fullmatch(r"the test server did not answer at http://127\.0\.0\.1:9/health within 1 s; its log .* "
                        r"ends: waiting", str(error.value))
    assert _until(lambda: not _group_members(group))


def test_ui_refuses_a_busy_port_in_one_line_and_prints_no_link(
    workdir: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    """`ablate ui` on a port another program holds: one line naming the port and --port; nothing started."""
    with socket.socket() as busy:
        busy.bind(("127.0.0.1", 0))
        busy.listen()
        port = busy.getsockname()[1]
        code, out, err = run_cli(["ui", "--port", str(port)], monkeypatch, capsys)
    assert code == 2
    assert err.count("\n") == 1 and err.startswith(f"error: port {port} on 127.0.0.1 is already in use")
    assert "--port" in err
    assert "http" not in out + err
    assert not (workdir / "mlflow-ui.log").exists()


def test_dashboard_without_optuna_dashboard_says_how_to_install_it(
    workdir: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    """Without the optional extra: one line with the pip command, exit code 2."""
    monkeypatch.setitem(sys.modules, "optuna_dashboard", None)  # `import optuna_dashboard` fails
    code, out, err = run_cli(["dashboard", "temperature"], monkeypatch, capsys)
    assert code == 2 and out == ""
    assert err == "error: optuna-dashboard is not installed; install it with: pip install 'ablate[dashboard]'\n"


@pytest.mark.slow
def test_ui_on_port_0_prints_the_port_it_answers_on_and_ctrl_c_stops_it(tmp_path: Path) -> None:
    """--port 0: the printed URL has the real port and answers at once; the server's log stays in its
    file; Ctrl-C stops the whole server, also when the command was started with SIGINT ignored."""
    log = tmp_path / "ui.out"
    with _started(ablate_command("ui", "--port", "0"), tmp_path, log, sigint_ignored=True) as ui:
        found = _wait_for_output(ui, log, r"MLflow UI: (http://127\.0\.0\.1:(\d+)) \(Ctrl-C stops it\)", timeout=180)
        base, port = found.group(1), int(found.group(2))
        assert port != 0
        assert _get(f"{base}/health") == b"OK"  # printed only once it answers
        if Path("/proc/net/tcp").exists():
            assert _listening_hosts(port) == {"127.0.0.1"}
        server = _server_pid(ui)
        server_log = tmp_path / "mlflow-ui.log"
        assert f"(server log: {server_log})" in log.read_text()
        assert _until(lambda: "GET /health" in server_log.read_text())  # the server's own lines go there...
        assert "GET /health" not in log.read_text() and "INFO" not in log.read_text()  # ...not to the terminal

        _signal_group(ui, signal.SIGINT)  # Ctrl-C: a terminal sends SIGINT to its foreground process group
        assert ui.wait(timeout=60) == 0, _tail(log)
    assert _until(lambda: not _group_members(server))
    assert _until(lambda: port not in _listening_ports())
    assert log.read_text().rstrip().endswith("MLflow UI stopped")


@pytest.mark.slow
def test_the_ui_server_does_not_outlive_a_command_killed_with_sigkill(tmp_path: Path) -> None:
    """kill -9 of `ablate ui` runs no handler of its own: its watchdog stops the server's whole group."""
    log = tmp_path / "ui.out"
    with _started(ablate_command("ui", "--port", "0"), tmp_path, log) as ui:
        found = _wait_for_output(ui, log, r"MLflow UI: (http://127\.0\.0\.1:(\d+)) \(Ctrl-C stops it\)", timeout=180)
        port, server = int(found.group(2)), _server_pid(ui)
        assert _group_members(server)
        os.kill(ui.pid, signal.SIGKILL)  # the command only, not its group
        ui.wait(timeout=30)
        assert _until(lambda: not _group_members(server), timeout=40), _tail(log)
        assert _until(lambda: port not in _listening_ports())


@pytest.mark.slow
def test_ui_open_to_the_network_warns_and_sigterm_stops_it(tmp_path: Path) -> None:
    """--host 0.0.0.0 prints one warning line; SIGTERM to the command (not its group) stops its server."""
    log = tmp_path / "ui.out"
    with _started(ablate_command("ui", "--host", "0.0.0.0", "--port", "0"), tmp_path, log) as ui:
        warning = _wait_for_output(ui, log, r"warning: .*", timeout=120).group(0)
        assert re.fullmatch(r"warning: the MLflow UI listens on 0\.0\.0\.0:\d+, reachable from the network "
                            r"without authentication: .*", warning)
        assert log.read_text().count("warning") == 1
        server = _server_pid(ui)
        ui.send_signal(signal.SIGTERM)  # as a process manager stops it
        assert ui.wait(timeout=60) in (0, 130), _tail(log)  # 0 once it served, 130 while it was starting
    assert _until(lambda: not _group_members(server))


def _listening_ports() -> set[int]:
    """Ports with a listening TCP socket on this machine (from /proc/net/tcp{,6})."""
    ports = set()
    for name in ("tcp", "tcp6"):
        table = Path("/proc/net") / name
        if table.exists():
            for line in table.read_text().splitlines()[1:]:
                if line.split()[3] == "0A":
                    ports.add(int(line.split()[1].rsplit(":", 1)[1], 16))
    return ports


# --------------------------------------------------------------------------------------
# In the browser: the MLflow UI on a trained suite
# --------------------------------------------------------------------------------------


@dataclass
class SuiteUI:
    """A trained suite's store, with `ablate ui --port 0` serving it."""

    work: Path
    base: str
    ui_log: Path
    client: Any
    experiment: Any
    parent: Any
    children: dict[str, Any]


@pytest.fixture(scope="module")
def suite_ui(tmp_path_factory: pytest.TempPathFactory) -> Iterator[SuiteUI]:
    """The suite trained in a fresh folder, with the UI started while it trains (once for the browser tests)."""
    tmp = tmp_path_factory.mktemp("suite")
    work = tmp / "work"
    work.mkdir()
    suite_log, ui_log = tmp / "run-suite.log", tmp / "ui.log"
    with _started(ablate_command(*SUITE_ARGS), work, suite_log) as suite:
        # The UI starts once the suite has created its MLflow store, while it trains.
        _wait_for_output(suite, suite_log, r"MLflow (parent run|experiment) ", timeout=180)
        with _started(ablate_command("ui", "--port", "0"), work, ui_log) as ui:
            assert suite.wait(timeout=300) == 0, _tail(suite_log)

            import mlflow

            client = mlflow.MlflowClient("sqlite:///" + str(work / "mlflow.db"))
            (experiment,) = [e for e in client.search_experiments() if e.name != "Default"]
            runs = client.search_runs([experiment.experiment_id])
            (parent,) = [r for r in runs if "mlflow.parentRunId" not in r.data.tags]
            children = {r.info.run_id: r for r in runs if r.data.tags.get("mlflow.parentRunId") == parent.info.run_id}
            assert len(children) == 5  # five experiments x one seed
            base = _wait_for_output(ui, ui_log, r"http://[\w.\[\]:-]+:\d+", timeout=180).group(0)
            yield SuiteUI(work, base, ui_log, client, experiment, parent, children)


@needs_chromium
@pytest.mark.slow
def test_ui_shows_the_suites_child_runs_and_their_epoch_curves(suite_ui: SuiteUI, browser: Browser) -> None:
    """`ablate ui` serves the suite's store on 127.0.0.1: child runs in the table, per-epoch charts."""
    s = suite_ui
    found = re.fullmatch(r"http://127\.0\.0\.1:(\d+)", s.base)
    assert found and int(found.group(1)) != 0, _tail(s.ui_log)
    exp_id = s.experiment.experiment_id
    assert f"  {s.experiment.name}: {s.base}/#/experiments/{exp_id}/runs?{ML_VIEW}\n" in s.ui_log.read_text()
    assert _get(f"{s.base}/health") == b"OK"
    if Path("/proc/net/tcp").exists():
        assert _listening_hosts(int(found.group(1))) == {"127.0.0.1"}
    baseline = next(r for r in s.children.values() if r.data.tags.get("ablate.experiment") == "baseline")
    history = sorted(s.client.get_metric_history(baseline.info.run_id, "val/top1"), key=lambda m: m.step)
    assert [m.step for m in history] == list(range(EPOCHS))

    # The experiment's runs table: the parent, and its child runs once expanded.
    exp_url = f"{s.base}/#/experiments/{exp_id}"
    browser.open(f"{exp_url}/runs?{ML_VIEW}")
    browser.wait(f"return !!{EXPANDER}", s.parent.info.run_id, what="the suite's parent run, expandable")
    if not browser.js(RUN_LINKS, list(s.children)):  # nested runs start collapsed
        browser.js(f"{EXPANDER}.click()", s.parent.info.run_id)
    shown = browser.wait(RUN_LINKS, list(s.children), what="the suite's child runs")
    assert shown == {run_id: r.info.run_name for run_id, r in s.children.items()}

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


@needs_chromium
@pytest.mark.slow
def test_ui_groups_the_suites_runs_by_experiment_with_per_epoch_charts(suite_ui: SuiteUI, browser: Browser) -> None:
    """The runs page grouped by the `ablate.experiment` tag: five groups, and a val/top1 chart per epoch
    with one line per group (its mean over seeds; here the one seed's values in the store)."""
    s = suite_ui
    # MLflow 3 keeps "group by" in the page's view state, not in its URL; a shared view (what its Share
    # button makes) is that state in an experiment tag, opened by its key. The suite keeps one, and
    # `ablate ui` prints the link that opens it.
    (link,) = re.findall(r"grouped by experiment: (\S+)", s.ui_log.read_text())
    assert link.startswith(f"{s.base}/#/experiments/{s.experiment.experiment_id}/runs?")
    browser.open(link)
    groups = browser.wait(GROUPS, len(EXPERIMENTS), what="five groups, one per experiment")
    assert sorted(groups) == sorted(EXPERIMENTS)
    # the view opens on the per-epoch curves of the headline metrics, before any other chart
    titles = browser.wait(CARD_TITLES, len(CURVES), what="the chart cards")
    assert titles[:len(CURVES)] == list(CURVES), titles

    browser.wait("return !!document.querySelector(arguments[0])", CHART_SEARCH, what="the chart search box")
    browser.type(CHART_SEARCH, "val/top1")
    chart = browser.wait(SECTION_CHART, "val/top1", "val", what="the val/top1 chart of the groups")
    legend = re.findall(r"^(.+) \(val/top1\)$", chart["text"], flags=re.MULTILINE)
    assert set(legend) - {"Unassigned"} == set(EXPERIMENTS)  # Unassigned: the parent run, which has no tag
    histories = {
        r.data.tags["ablate.experiment"]: [m.value for m in sorted(
            s.client.get_metric_history(r.info.run_id, "val/top1"), key=lambda m: m.step)]
        for r in s.children.values()
    }
    lines = [t for t in chart["traces"] if t["mode"] and "lines" in t["mode"] and not t["fill"]]
    assert lines and all(t["x"] == list(range(EPOCHS)) for t in lines)
    assert {tuple(round(v, 9) for v in t["y"]) for t in lines} == {
        tuple(round(v, 9) for v in h) for h in histories.values()}


# --------------------------------------------------------------------------------------
# In the browser: optuna-dashboard on a small search
# --------------------------------------------------------------------------------------

TUNE_ARGS = [
    "tune", "temperature", "--n-trials", "3", "--epochs", "2", "--jobs", "1", "--set", "data.source=pairs.npz",
    "--set", "batch_size=16", "--set", "model.hidden=[16]", "--set", "model.dropout=0.0",
    "--set", "sampler.n_startup_trials=2", "--set", "pruner.n_startup_trials=3",  # no trial pruned
]


@pytest.fixture(scope="module")
def tuned(tmp_path_factory: pytest.TempPathFactory, mlflow_template: Path) -> Path:
    """A folder with a three-trial search on the tiny data in its ./optuna.db."""
    from ablate.training.data import synthetic_pairs

    work = tmp_path_factory.mktemp("tune")
    synthetic_pairs(TINY).save(work / "pairs.npz")
    shutil.copy(mlflow_template, work / "mlflow.db")
    done = subprocess.run(ablate_command(*TUNE_ARGS), cwd=work, env=_env(), capture_output=True, text=True,
                          timeout=600)
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    return work


@needs_chromium
@pytest.mark.slow
@pytest.mark.skipif(not servers.dashboard_installed(), reason="optuna-dashboard not installed: "
                    "pip install 'ablate[dashboard]'")
def test_dashboard_shows_the_studys_trials(tuned: Path, browser: Browser, tmp_path: Path) -> None:
    """`ablate dashboard SPEC` serves the spec's newest study; its printed page shows that study's trials."""
    import optuna

    storage = f"sqlite:///{tuned / 'optuna.db'}"
    (summary,) = optuna.get_all_study_summaries(storage=storage)
    study = optuna.load_study(study_name=summary.study_name, storage=storage)
    trials = sorted(study.trials, key=lambda t: t.number)
    assert [t.state for t in trials] == [optuna.trial.TrialState.COMPLETE] * 3

    log = tmp_path / "dashboard.out"
    with _started(ablate_command("dashboard", "temperature", "--port", "0"), tuned, log) as dashboard:
        found = _wait_for_output(dashboard, log, r"study (\S+): (http://127\.0\.0\.1:(\d+)/dashboard/studies/\d+)",
                                 timeout=120)
        assert found.group(1) == study.study_name and int(found.group(3)) != 0
        assert (tuned / "optuna-dashboard.log").exists() and "GET" not in log.read_text()

        browser.open(found.group(2))
        browser.wait("return document.body.innerText.includes(arguments[0])", f"{study.study_name} (id=",
                     what="the study's name")
        traces = {t["name"]: t for t in browser.wait(DASHBOARD_PLOTS, what="the study's history and its trials")}
        history = traces[f"val/mrr of {study.study_name}"]  # the objective named, not "Objective 0"
        assert list(zip(history["x"], history["y"], strict=True)) == [(t.number, t.value) for t in trials]
        for t in trials:  # each trial's intermediate values (the best value so far, per report)
            steps = sorted(t.intermediate_values)
            assert traces[f"trial #{t.number}"]["x"] == steps
            assert traces[f"trial #{t.number}"]["y"] == [t.intermediate_values[s] for s in steps]
        browser.wait("return document.body.innerText.includes(arguments[0])",
                     f"Best Trial (number={study.best_trial.number})", what="the best trial")

        port = int(found.group(3))
        _signal_group(dashboard, signal.SIGINT)
        assert dashboard.wait(timeout=60) == 0, _tail(log)
    assert _until(lambda: port not in _listening_ports())


def test_ui_on_a_database_that_does_not_answer_is_one_line_before_any_server_starts(
        workdir: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]) -> None:
    code, out, err = run_cli(["ui", "--tracking-uri", "postgresql://postgres@127.0.0.1:1/x"], monkeypatch, capsys)
    (line,) = [x for x in err.splitlines() if x.strip()]
    assert code == 2 and "cannot reach the MLflow store postgresql://postgres@127.0.0.1:1/x" in line
    assert "Starting" not in out and not (workdir / "mlflow-ui.log").exists()


@pytest.mark.bare
def test_dashboard_checks_its_own_arguments_before_the_storage(
        workdir: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]) -> None:
    if not servers.dashboard_installed():
        pytest.skip("optuna-dashboard not installed")
    code, _, err = run_cli(["dashboard", "temperature", "--port", "70000"], monkeypatch, capsys)
    assert code == 2 and err == "error: --port 70000: a port is a number from 1 to 65535 (0 picks a free one)\n"
