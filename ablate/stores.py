"""Where results live: the Optuna storage and the MLflow store, by URL, with passwords masked.

Nothing here opens a connection (see ``studies.open_storage`` and ``tracking.Tracker``); this module
only says which URL a command uses and how a URL is shown.
"""

from __future__ import annotations

import os
import re
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from urllib.parse import quote, unquote

from ablate.errors import AblateError

DEFAULT_TRACKING_URI = "sqlite:///mlflow.db"
"""MLflow's store: a SQLite file in the working directory (MLFLOW_TRACKING_URI overrides it)."""

DEFAULT_STORAGE = "sqlite:///optuna.db"
"""Optuna's store: a separate SQLite file (MLflow and Optuna both own an alembic_version table)."""

STORAGE_ENV = "ABLATE_STORAGE"
TRACKING_ENV = "MLFLOW_TRACKING_URI"
DEFAULT_HEARTBEAT_SECONDS = 20
DEFAULT_MAX_RETRY = 2


def resolve_tracking_uri(uri: str | None = None) -> str:
    """The MLflow tracking URI: the flag, else MLFLOW_TRACKING_URI, else ./mlflow.db."""
    return encode_userinfo(_absolute_sqlite(uri or os.environ.get(TRACKING_ENV) or DEFAULT_TRACKING_URI))


def resolve_storage(url: str | None = None) -> str:
    """The Optuna storage URL: the flag, else ABLATE_STORAGE, else ./optuna.db. An in-memory SQLite store is
    refused: it lives and dies with one process, where a study must outlive it and serve every worker."""
    given = url or os.environ.get(STORAGE_ENV) or DEFAULT_STORAGE
    if in_memory(given):
        raise AblateError(f"storage {given}: an in-memory SQLite store lives and dies with one process, so no "
                          "worker could share it and nothing would be kept; give a file, e.g. sqlite:///optuna.db, "
                          "or a database server, postgresql://user@host/db")
    return encode_userinfo(_absolute_sqlite(given))


def in_memory(url: str) -> bool:
    """Whether a SQLite URL names an in-memory database (``sqlite://``, ``sqlite:///:memory:``)."""
    scheme, sep, rest = url.partition("://")
    if not sep or scheme.split("+")[0].lower() != "sqlite":
        return False
    path = rest.split("?", 1)[0].removeprefix("/")
    return path in ("", ":memory:") or path.startswith("file::memory:")


def encode_userinfo(url: str) -> str:
    """A URL whose password holds an unencoded '@' (user:tPw@rd@host), with user and password percent-encoded.

    Database drivers split user info at the first '@' (and then name part of the password as the host in
    their errors); the user meant the last one, as ``mask_url`` and ``split_credentials`` read it.
    """
    scheme, sep, rest = url.partition("://")
    cut = min((i for i in (rest.find(c) for c in "/?#") if i >= 0), default=len(rest))
    if not sep or rest[:cut].count("@") < 2:
        return url
    bare, user, password = split_credentials(url)
    userinfo = quote(user or "", safe="") + (":" + quote(password, safe="") if password is not None else "")
    return f"{scheme}://{userinfo}@{bare.partition('://')[2]}"


def _absolute_sqlite(url: str) -> str:
    """sqlite:///relative.db -> sqlite:////abs/path/relative.db (a store is one file, wherever we are)."""
    prefix = "sqlite:///"
    if url.startswith(prefix) and not url.startswith(prefix + "/") and url != prefix + ":memory:":
        return prefix + str(Path(url[len(prefix):]).resolve())
    return url


# The password runs up to the LAST '@' before the host: an unencoded '@' in it (tPw@rd) is masked too.
_PASSWORD = re.compile(r"(?P<head>[A-Za-z][A-Za-z0-9+.\-]*://[^:/?#@\s]*:)[^\s?#]+(?=@)")
_PASSWORD_PARAM = re.compile(r"(?P<head>[?&]password=)[^&\s]+", re.IGNORECASE)


def mask_url(text: str) -> str:
    """Replace the password of every URL in a text with *** (user:password@ and ?password=)."""
    return _PASSWORD_PARAM.sub(r"\g<head>***", _PASSWORD.sub(r"\g<head>***", text))


def split_credentials(url: str) -> tuple[str, str | None, str | None]:
    """(the URL without user:password@, the user, the password), both percent-decoded; None when absent.

    The user info ends at the last '@' of the authority, so an unencoded '@' in a password stays in it
    (a '/', '?' or '#' in a password must be percent-encoded, as in any URL).
    """
    scheme, sep, rest = url.partition("://")
    if not sep:
        return url, None, None
    cut = min((i for i in (rest.find(c) for c in "/?#") if i >= 0), default=len(rest))
    userinfo, at, host = rest[:cut].rpartition("@")
    if not at:
        return url, None, None
    user, has_password, password = userinfo.partition(":")
    return (f"{scheme}://{host}{rest[cut:]}", unquote(user) or None,
            unquote(password) if has_password else None)


@dataclass(frozen=True)
class Stores:
    """The stores one command uses: the Optuna storage URL, the MLflow URI and the heartbeat."""

    storage: str | None = None
    tracking_uri: str | None = None
    heartbeat_seconds: int | None = DEFAULT_HEARTBEAT_SECONDS

    @property
    def storage_url(self) -> str:
        """The resolved Optuna storage URL."""
        return resolve_storage(self.storage)

    @property
    def shown_storage(self) -> str:
        """The Optuna storage URL with any password masked."""
        return mask_url(self.storage_url)


def require_storage(url: str) -> None:
    """A command that only reads a storage finds one there, or says so in one line (and creates nothing)."""
    if not storage_exists(url):
        raise AblateError(f"no Optuna storage at {mask_url(url)}: no study has run here yet; run `ablate run-suite` "
                          "or `ablate tune` first, or point --storage (or ABLATE_STORAGE) at the study's storage")


def sqlite_file(url: str) -> Path | None:
    """The file behind a ``sqlite:///PATH`` URL (None for any other store, and for an in-memory database)."""
    prefix = "sqlite:///"
    if not url.startswith(prefix) or in_memory(url):
        return None
    return Path(url[len(prefix):].split("?", 1)[0])


def read_only(url: str) -> bool:
    """Whether a store is a SQLite file this process may read but not write (the file, or its folder, where SQLite
    keeps its journal): what only reads it (a report) still works, without writing."""
    db = sqlite_file(url)
    if db is None or not db.exists():
        return False
    return os.access(db, os.R_OK) and not (os.access(db, os.W_OK) and os.access(db.parent, os.W_OK))


def release_interrupted(error: BaseException) -> None:
    """Let go of the database connections an interrupted call still holds (through its traceback's frames) before
    the stores are written again: Ctrl-C or SIGTERM inside a SQLite transaction leaves its write lock with a
    connection that only those frames keep, and every later write from this process would wait on it."""
    import gc
    import traceback

    traceback.clear_frames(error.__traceback__)
    gc.collect()


@contextmanager
def signals_held() -> Iterator[None]:
    """Ctrl-C and SIGTERM wait until the block is done, then interrupt as usual (in the main thread only): a store
    write in the block happens whole, with what records it."""
    import signal
    import threading

    if threading.current_thread() is not threading.main_thread():
        yield
        return
    caught: list[int] = []
    previous = {s: signal.signal(s, lambda signum, frame: caught.append(signum)) for s in (signal.SIGINT,
                                                                                           signal.SIGTERM)}
    try:
        yield
    finally:
        for s, handler in previous.items():
            signal.signal(s, handler)
    if any(previous[signal.Signals(s)] is not signal.SIG_IGN for s in caught):
        raise KeyboardInterrupt


def require_writable(url: str) -> None:
    """A command that trains writes to its Optuna storage: a SQLite storage it may only read is one line."""
    if read_only(url):
        raise AblateError(f"the Optuna storage {mask_url(url)} is read-only here ({sqlite_file(url)} or its folder "
                          "cannot be written: SQLite writes a journal beside it); make both writable, or choose "
                          "another --storage (reports of it still work: `ablate report`, `ablate studies show`)")


def storage_exists(url: str) -> bool:
    """Whether a storage already exists: a SQLite file on disk (a database server's storage always counts)."""
    db = sqlite_file(url)
    return db.exists() if db is not None else True
