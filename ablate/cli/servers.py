"""Local web servers a command runs (the MLflow UI, optuna-dashboard): port, process group, log, ready, stop.

A server runs in its own process group (a terminal's Ctrl-C reaches only this process, which then
stops the whole group), writes its own log lines to a file (or to the terminal with ``verbose``), and
its URL is shown only once it answers there. Nothing here imports MLflow, Optuna or torch.
"""

from __future__ import annotations

import contextlib
import errno
import importlib
import importlib.util
import ipaddress
import os
import signal
import socket
import subprocess
import sys
import tempfile
import threading
import time
import urllib.request
from collections.abc import Callable, Iterator, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from ablate.errors import AblateError
from ablate.stores import mask_url

READY_SECONDS = 120.0
"""How long a server may take to answer (MLflow migrates a new store's schema first)."""

STOP_SECONDS = 15.0
"""How long a stopped server may take to exit before its process group is killed."""

DASHBOARD_INSTALL = "pip install 'ablate[dashboard]'"

# The dashboard's own CLI takes the storage URL as an argument, which would show a password in
# process listings; this starts the same threaded WSGI server with the URL read from the environment.
_DASHBOARD_MAIN = """\
import os, socket, sys
from socketserver import ThreadingMixIn
from wsgiref.simple_server import WSGIServer, make_server
import optuna_dashboard
host, port = sys.argv[1], int(sys.argv[2])
class Server(ThreadingMixIn, WSGIServer):
    daemon_threads = True
    address_family = socket.AF_INET6 if ":" in host else socket.AF_INET
app = optuna_dashboard.wsgi(os.environ["ABLATE_STORAGE"])
print(f"optuna-dashboard {optuna_dashboard.__version__} listening on {host}:{port}", file=sys.stderr, flush=True)
make_server(host, port, app, server_class=Server).serve_forever()
"""


# --------------------------------------------------------------------------------------
# Addresses
# --------------------------------------------------------------------------------------


def _addresses(host: str, port: int) -> list[tuple[Any, ...]]:
    """getaddrinfo for a listening socket on host:port, as a user's mistake when the host is unknown."""
    try:
        return socket.getaddrinfo(host, port, type=socket.SOCK_STREAM, flags=socket.AI_PASSIVE)
    except (socket.gaierror, UnicodeError) as e:
        reason = getattr(e, "strerror", None) or str(e)
        raise AblateError(f"--host {host!r} is not an address of this machine ({reason}); "
                          "use 127.0.0.1 (this machine only) or 0.0.0.0 (the network)") from None


def claim_port(host: str, port: int) -> int:
    """Check that host:port is free to listen on and return the port (a free one for port 0)."""
    if not 0 <= port <= 65535:
        raise AblateError(f"--port {port}: a port is a number from 1 to 65535 (0 picks a free one)")
    for family, kind, proto, _, address in _addresses(host, port):
        with socket.socket(family, kind, proto) as s:
            # As servers do: a port held only by closed connections (TIME_WAIT) is free to listen on.
            s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
            try:
                s.bind(address)
            except OSError as e:
                raise AblateError(_bind_error(host, port, e)) from None
            port = int(s.getsockname()[1])  # for port 0: the same port on every address of the host
    return port


def _bind_error(host: str, port: int, e: OSError) -> str:
    """A one-line message for a failed bind."""
    if e.errno == errno.EADDRINUSE:
        return (f"port {port} on {host} is already in use by another program; choose another with "
                "--port N (--port 0 picks a free one)")
    if e.errno == errno.EACCES:
        return f"port {port} needs administrator rights; choose one above 1023 with --port N"
    if e.errno == errno.EADDRNOTAVAIL:
        return f"--host {host!r} is not an address of this machine; use 127.0.0.1 or 0.0.0.0"
    return f"cannot listen on {host}:{port}: {e.strerror or e}; choose another --host or --port"


def is_loopback(host: str) -> bool:
    """Whether every address ``host`` stands for is this machine's loopback (only local programs reach it)."""
    found = {info[4][0] for info in _addresses(host, 0)}
    return bool(found) and all(ipaddress.ip_address(a.split("%")[0]).is_loopback for a in found)


def exposure_warning(host: str, port: int, what: str) -> str | None:
    """A one-line warning when ``host`` makes the server reachable from the network, else None."""
    if is_loopback(host):
        return None
    return (f"warning: {what} listens on {host}:{port}, reachable from the network without authentication: "
            "anyone who can reach this machine can read and change the store (--host 127.0.0.1 keeps it local)")


def base_url(host: str, port: int) -> str:
    """The URL a browser on this machine opens (0.0.0.0 and :: are reached through the loopback)."""
    if host in ("", "0.0.0.0"):
        host = "127.0.0.1"
    elif host == "::":
        host = "::1"
    return f"http://[{host}]:{port}" if ":" in host else f"http://{host}:{port}"


# --------------------------------------------------------------------------------------
# The servers ablate starts
# --------------------------------------------------------------------------------------


def mlflow_command(host: str, port: int) -> list[str]:
    """The argv of an MLflow tracking server and UI (the store's URL goes by environment)."""
    return [sys.executable, "-m", "mlflow", "server", "--host", host, "--port", str(port), "--workers", "1"]


def mlflow_env(uri: str) -> dict[str, str]:
    """The environment of ``mlflow_command``: the store by environment, its job runner off."""
    # The store's URL goes by environment (a password stays out of process listings). The job
    # runner serves only MLflow's GenAI features; it costs seven processes.
    return {"MLFLOW_SERVER_ENABLE_JOB_EXECUTION": "false", **os.environ, "MLFLOW_BACKEND_STORE_URI": uri}


def dashboard_installed() -> bool:
    """Whether optuna-dashboard can be imported here (found, not imported: importing it takes seconds)."""
    try:
        return importlib.util.find_spec("optuna_dashboard") is not None
    except (ImportError, ValueError):  # ValueError: a module set to None, as a test does to hide it
        return False


def dashboard_command(host: str, port: int) -> list[str]:
    """The argv of optuna-dashboard (a threaded WSGI server, as its own CLI starts it)."""
    return [sys.executable, "-c", _DASHBOARD_MAIN, host, str(port)]


def dashboard_env(storage: str) -> dict[str, str]:
    """The environment of ``dashboard_command``: the Optuna storage URL by environment."""
    return {**os.environ, "ABLATE_STORAGE": storage}


# --------------------------------------------------------------------------------------
# A running server
# --------------------------------------------------------------------------------------


@dataclass
class Server:
    """A server process (the leader of its own process group) and where its output goes."""

    what: str
    process: subprocess.Popen[bytes]
    log: Path | None
    log_offset: int = 0
    watchdog: subprocess.Popen[bytes] | None = None
    """Stops the server's group once this process is gone, however it went (``kill -9`` included)."""

    def log_tail(self, lines: int = 3, width: int = 400) -> str:
        """The last lines of this run's log on one line (passwords masked), for an error message."""
        if self.log is None:
            return "its output is above"
        try:
            with self.log.open("rb") as f:
                f.seek(self.log_offset)
                text = f.read().decode(errors="replace")
        except OSError as e:
            return f"its log {self.log} cannot be read: {e.strerror}"
        last = [line.strip() for line in text.splitlines() if line.strip()][-lines:]
        shown = " | ".join(last) or "(empty)"
        if len(shown) > width:
            shown = "..." + shown[-width:]
        return mask_url(f"its log {self.log} ends: {shown}")


def log_path(name: str) -> Path:
    """Where a server's log goes: ``name`` in the working folder, else in the temp folder."""
    here = Path.cwd() / name
    if os.access(Path.cwd(), os.W_OK) and (not here.exists() or os.access(here, os.W_OK)):
        return here
    return Path(tempfile.gettempdir()) / name


@contextlib.contextmanager
def running(what: str, cmd: Sequence[str], env: Mapping[str, str], log: Path | None) -> Iterator[Server]:
    """Start ``cmd`` in its own process group (output appended to ``log``, or to this terminal when None);
    Ctrl-C and SIGTERM raise KeyboardInterrupt meanwhile, and the whole group is stopped on the way out."""
    with _Interrupts() as interrupts:
        interrupts.held = True  # one that comes while the process starts is raised once it can be stopped
        try:
            server = _start(what, cmd, env, log)
        except BaseException:
            interrupts.held = False
            raise
        try:
            interrupts.release()
            yield server
        finally:
            interrupts.held = True  # a second Ctrl-C must not cut the stopping short
            stop(server)


def _start(what: str, cmd: Sequence[str], env: Mapping[str, str], log: Path | None) -> Server:
    """Popen ``cmd`` as the leader of a new process group, its output to ``log`` (None: this terminal), watched so
    that it never outlives this process."""
    if log is None:
        process = subprocess.Popen(list(cmd), env=dict(env), stdin=subprocess.DEVNULL, start_new_session=True)
        return Server(what, process, None, watchdog=_watch(process.pid))
    with log.open("ab") as out:
        offset = out.tell()
        process = subprocess.Popen(list(cmd), env=dict(env), stdin=subprocess.DEVNULL, stdout=out,
                                   stderr=subprocess.STDOUT, start_new_session=True)
    return Server(what, process, log, offset, _watch(process.pid))


_WATCHDOG = """\
import os, signal, sys, time
sys.stdin.buffer.read()  # returns when the command that started the server is gone: its end of the pipe closed
group = int(sys.argv[1])
try:
    os.killpg(group, signal.SIGTERM)
except ProcessLookupError:
    sys.exit(0)
deadline = time.monotonic() + float(sys.argv[2])
while time.monotonic() < deadline:
    time.sleep(0.1)
    try:
        os.killpg(group, 0)
    except ProcessLookupError:
        sys.exit(0)
try:
    os.killpg(group, signal.SIGKILL)
except ProcessLookupError:
    pass
"""


def _watch(pgid: int) -> subprocess.Popen[bytes]:
    """A small process that holds the read end of a pipe whose write end only this process has: when this process
    ends in any way (a crash, ``kill -9``) the pipe closes, and it stops the server's group (SIGTERM, then SIGKILL).
    A parent-death signal would reach the server's leader only, not the workers it starts."""
    return subprocess.Popen([sys.executable, "-c", _WATCHDOG, str(pgid), str(STOP_SECONDS)], stdin=subprocess.PIPE,
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, start_new_session=True)


def wait_ready(server: Server, url: str, accept: Callable[[bytes], bool], timeout: float = READY_SECONDS) -> None:
    """Poll ``url`` until it answers 200 with a body ``accept`` takes; a server that exits or stays silent
    is a one-line error with the end of its log."""
    opener = urllib.request.build_opener(urllib.request.ProxyHandler({}))  # a local server: never via a proxy
    deadline = time.monotonic() + timeout
    while True:
        code = server.process.poll()
        if code is not None:
            raise AblateError(f"{server.what} exited with code {code} before it answered at {url}; "
                              f"{server.log_tail()}")
        try:
            with opener.open(url, timeout=2) as response:
                # Answered, and still ours: a server that lost the port to another program exits.
                if response.status == 200 and accept(response.read()) and server.process.poll() is None:
                    return
        except (OSError, ValueError):
            pass
        if time.monotonic() > deadline:
            raise AblateError(f"{server.what} did not answer at {url} within {timeout:.0f} s; "
                              f"{server.log_tail()}")
        time.sleep(0.25)


def serve(server: Server) -> None:
    """Wait until Ctrl-C or SIGTERM (then return) or until the server exits by itself (an error)."""
    try:
        code = server.process.wait()
    except KeyboardInterrupt:
        return
    raise AblateError(f"{server.what} stopped by itself with exit code {code}; {server.log_tail()}")


def stop(server: Server, grace: float = STOP_SECONDS) -> None:
    """Stop the server's whole process group: SIGTERM, then SIGKILL after ``grace`` seconds."""
    with _signals_held():
        proc = server.process
        if proc.poll() is None:
            _signal_group(proc.pid, signal.SIGTERM)
            try:
                proc.wait(timeout=grace)
            except subprocess.TimeoutExpired:
                _signal_group(proc.pid, signal.SIGKILL)
                proc.wait()
        _signal_group(proc.pid, signal.SIGKILL)  # what the leader left behind (workers, job runners)
        if server.watchdog is not None and server.watchdog.stdin is not None:
            server.watchdog.stdin.close()  # nothing left to watch: it finds the group gone and exits
            with contextlib.suppress(subprocess.TimeoutExpired):
                server.watchdog.wait(timeout=grace)


def _signal_group(pgid: int, sig: signal.Signals) -> None:
    with contextlib.suppress(ProcessLookupError, PermissionError):
        os.killpg(pgid, sig)


class _Interrupts:
    """While installed, Ctrl-C (SIGINT) and SIGTERM raise KeyboardInterrupt, or wait while ``held``.

    Only the main thread receives signals; elsewhere this does nothing.
    """

    def __init__(self) -> None:
        self.held = False
        self.pending = False
        self._previous: dict[int, Any] = {}

    def __enter__(self) -> _Interrupts:
        if threading.current_thread() is threading.main_thread():
            self._previous = {sig: signal.signal(sig, self._handle) for sig in (signal.SIGINT, signal.SIGTERM)}
        return self

    def __exit__(self, *exc: object) -> None:
        for sig, handler in self._previous.items():
            signal.signal(sig, handler)

    def _handle(self, signum: int, frame: Any) -> None:
        if self.held:
            self.pending = True
        else:
            raise KeyboardInterrupt

    def release(self) -> None:
        """Stop holding; raise the interrupt that came meanwhile, if one did."""
        self.held = False
        if self.pending:
            self.pending = False
            raise KeyboardInterrupt


@contextlib.contextmanager
def _signals_held() -> Iterator[None]:
    """Ignore Ctrl-C and SIGTERM while a server is being stopped (a second Ctrl-C must not orphan it)."""
    if threading.current_thread() is not threading.main_thread():
        yield
        return
    previous = {sig: signal.signal(sig, signal.SIG_IGN) for sig in (signal.SIGINT, signal.SIGTERM)}
    try:
        yield
    finally:
        for sig, handler in previous.items():
            signal.signal(sig, handler)
