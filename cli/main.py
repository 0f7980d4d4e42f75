"""``compress`` command line: one module per command (``run``, ``eval``, ``sweep``, ``export``, ``ls``,
``env``, ``validate``, ``lm-eval``). Each command parses its options into the library's option sets
(their flags generated from the same field metadata, :mod:`compress.cli.options`) and makes one
library call; errors in the user's input print one line and exit with status 2."""

from __future__ import annotations

import sys

from ..errors import CompressError
from . import env, eval, export, lm_eval, ls, run, sweep, validate
from .app import app, console

# the commands, in the order `compress --help` lists them
app.command("run")(run.run)
app.command("eval")(eval.eval_cmd)
app.command("sweep")(sweep.sweep)
app.command("export")(export.export)
app.command("ls")(ls.ls)
app.command("env")(env.env)
app.command("validate")(validate.validate)
app.command("lm-eval", add_help_option=False, context_settings={"allow_extra_args": True, "ignore_unknown_options": True})(lm_eval.lm_eval_cmd)

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
