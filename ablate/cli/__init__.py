"""The `ablate` command: parse, open a study session (or a trainer), render what it returns with rich.

One module per group of commands; importing them registers their commands on ``app``.
"""

from __future__ import annotations

import importlib
import signal

from rich.text import Text

from ablate import stores
from ablate.cli.app import app, err_console
from ablate.errors import AblateError

for _commands in ("train", "study", "listing", "serve"):  # registers their commands, in this order in --help
    importlib.import_module(f"ablate.cli.{_commands}")

__all__ = ["app", "main"]


def main() -> None:
    """Run the CLI: a user's mistake is one line on stderr and exit code 2."""
    # Ctrl-C stops a command also where it was started with SIGINT ignored (a background job of a
    # script inherits that); SIGTERM is handled alike by the commands that train.
    signal.signal(signal.SIGINT, signal.default_int_handler)
    try:
        app()
    except AblateError as e:
        message = Text.assemble(("error:", "red"), f" {stores.mask_url(str(e))}")
        err_console.print(message, highlight=False, soft_wrap=True)
        raise SystemExit(2) from None
    except KeyboardInterrupt:
        err_console.print("interrupted")
        raise SystemExit(130) from None
