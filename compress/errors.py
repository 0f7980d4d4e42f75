"""User-facing errors.

Every problem caused by the user's input (a path, an option, a recipe) is raised as a
:class:`CompressError` whose message is one line naming the problem and the fix. The CLI
prints that line and exits with status 2; library users catch the exception.
"""

from __future__ import annotations


class CompressError(Exception):
    """An error in the user's input, with a one-line message that says how to fix it."""


class ConfigError(CompressError):
    """An invalid pass option, recipe or calibration setting."""


class CannotStream(CompressError):
    """The checkpoint cannot be read layer by layer (it can still be loaded whole)."""
