"""``compress`` command line: one module per command (``run``, ``eval``, ``sweep``, ``export``, ``ls``,
``env``, ``validate``, ``lm-eval``). Each command parses its options into the library's option sets
(their flags generated from the same field metadata, :mod:`compress.cli.options`) and makes one
library call; errors in the user's input print one line and exit with status 2."""

from __future__ import annotations

import os
import sys

from ..errors import CompressError
from . import env, eval, export, lm_eval, ls, run, sweep, validate
from .app import app, console
from .flags import command_of, respell

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


#: the command names, for naming flags as the command that was run spells them
COMMANDS = {str(c.name) for c in app.registered_commands}


#: the process that started this one (under torchrun, its launcher), noted before anything can end it
_PARENT = os.getppid()


def fail(command: str | None, message: str, status: int = 2) -> None:
    """Print ``message`` as the one error line of ``command`` and exit with ``status``. Under torchrun
    only rank 0 prints it, and then ends the launcher before it wraps the line in its own report."""
    from rich.markup import escape

    from ..pipeline.distributed import end_launcher, launcher_ended, launcher_rank

    rank = launcher_rank()
    # another rank waits for rank 0 to end the launcher (torchrun would otherwise report this rank's exit
    # first); an error of its own alone (rank 0 goes on) it prints itself
    if rank is None or rank == 0 or not launcher_ended(_PARENT, wait_s=20.0):
        console.print(f"[red]error:[/red] {escape(respell(command, message))}", highlight=False, soft_wrap=True)
        console.file.flush()
    if rank == 0:
        end_launcher(_PARENT)
    sys.exit(status)


def _click_exceptions() -> tuple[type[Exception], type[BaseException]]:
    """(UsageError, Abort) of the click that typer runs on (typer >= 0.25 carries its own copy)."""
    import typer

    try:
        from typer._click.exceptions import UsageError
    except ImportError:
        from click.exceptions import UsageError  # type: ignore[assignment]
    return UsageError, typer.Abort


def main() -> None:
    usage_error, abort = _click_exceptions()
    command = command_of(sys.argv[1:], COMMANDS)
    try:
        status = app(standalone_mode=False)  # usage errors come back here, to print as one line
    except CompressError as e:
        fail(command, str(e))
    except usage_error as e:
        if not e.format_message().strip():  # type: ignore[attr-defined]  # no arguments at all: the help was printed
            sys.exit(getattr(e, "exit_code", 2))
        where = f"compress {command}" if command else "compress"
        fail(command, f"{e.format_message()} (see '{where} --help')")  # type: ignore[attr-defined]
    except (KeyboardInterrupt, abort):
        console.print("interrupted before the output directory was complete: nothing was written; rerun the same command")
        sys.exit(130)
    if isinstance(status, int) and status:
        sys.exit(status)


if __name__ == "__main__":
    main()
