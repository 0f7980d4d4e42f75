"""``compress`` command line: one module per command (``run``, ``eval``, ``sweep``, ``export`` and the
introspection commands in ``info``). Each command parses its options into the library's option sets
(their flags generated from the same field metadata, :mod:`compress.cli.options`) and makes one
library call; errors in the user's input print one line and exit with status 2."""

from __future__ import annotations

import sys

from ..errors import CompressError
from . import eval as _eval  # noqa: F401  (registers its command)
from . import export as _export  # noqa: F401
from . import info as _info  # noqa: F401
from . import run as _run  # noqa: F401
from . import sweep as _sweep  # noqa: F401
from .app import app, console

__all__ = ["app", "main"]


def main() -> None:
    try:
        app()
    except CompressError as e:
        console.print(f"[red]error:[/red] {e}", highlight=False, soft_wrap=True)
        sys.exit(2)
    except KeyboardInterrupt:
        console.print("interrupted before the output directory was complete: nothing was written; rerun the same command")
        sys.exit(130)


if __name__ == "__main__":
    main()
