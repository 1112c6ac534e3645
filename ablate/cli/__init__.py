"""The `ablate` command: parse, open a study session (or a trainer), render what it returns with rich.

One module per group of commands; importing them registers their commands on ``app``.
"""

from __future__ import annotations

import importlib
import signal
import sys

from rich.text import Text
from typer import Abort

from ablate import stores
from ablate.cli.app import app, err_console
from ablate.errors import AblateError

try:  # typer vendors click from 0.2x on
    from typer._click.exceptions import ClickException, NoArgsIsHelpError, UsageError
except ImportError:  # pragma: no cover - older typer with click
    from click.exceptions import ClickException, NoArgsIsHelpError, UsageError  # type: ignore[assignment]

# importing them registers their commands, in this order in --help
for _commands in ("train", "study", "roadmap", "submit", "listing", "serve"):
    importlib.import_module(f"ablate.cli.{_commands}")

__all__ = ["app", "main"]


def main() -> None:
    """Run the CLI: a user's mistake (also a bad flag or value) is one line on stderr and exit code 2."""
    # Ctrl-C stops a command also where it was started with SIGINT ignored (a background job of a
    # script inherits that); SIGTERM is handled alike by the commands that train.
    signal.signal(signal.SIGINT, signal.default_int_handler)
    try:
        code = app(standalone_mode=False)
    except NoArgsIsHelpError as e:  # `ablate` or `ablate studies` alone: the help
        sys.stdout.write(e.format_message() + "\n")
        raise SystemExit(0) from None
    except UsageError as e:
        command = e.ctx.command_path if e.ctx is not None else "ablate"
        _error(f"{e.format_message()} (see `{command} --help`)")
        raise SystemExit(2) from None
    except ClickException as e:
        _error(e.format_message())
        raise SystemExit(e.exit_code) from None
    except AblateError as e:
        _error(str(e))
        raise SystemExit(2) from None
    except (KeyboardInterrupt, Abort):
        err_console.print("interrupted")
        raise SystemExit(130) from None
    raise SystemExit(code if isinstance(code, int) else 0)


def _error(message: str) -> None:
    err_console.print(Text.assemble(("error:", "red"), f" {stores.mask_url(message)}"), highlight=False,
                      soft_wrap=True)
