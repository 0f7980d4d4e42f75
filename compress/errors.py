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


def brief(e: BaseException, limit: int = 240) -> str:
    """Another library's exception as one line: its text joined across lines, up to the end of the
    first sentence that says something (a message cut at a line break can stop mid-sentence)."""
    text = " ".join(str(e).split())
    if not text:
        return type(e).__name__
    end = text.find(". ", 40)
    text = text[: end + 1] if 0 < end < limit else text
    return text if len(text) <= limit else text[: limit - 1] + "…"
