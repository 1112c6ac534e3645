"""The one exception type for a user's mistake: the CLI prints it as one line and exits 2."""

from __future__ import annotations


class AblateError(ValueError):
    """A mistake in the user's input (spec, flag, data file, URL), stated as what, where and how to fix."""
