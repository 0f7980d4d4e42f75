"""The typer application, its consoles and logging set-up, shared by the command modules."""

from __future__ import annotations

import logging

import typer
from rich.console import Console

app = typer.Typer(add_completion=False, no_args_is_help=True, help="Post-training compression of Hugging Face causal LMs.")
console = Console(stderr=True)
out_console = Console()


def setup_logging(verbose: bool, quiet: bool = False) -> None:
    from rich.logging import RichHandler

    level = logging.DEBUG if verbose else (logging.ERROR if quiet else logging.WARNING)
    logging.basicConfig(level=level, format="%(message)s", handlers=[RichHandler(console=console, show_path=False)], force=True)
    logging.getLogger("compress").setLevel(logging.INFO if not quiet and not verbose else level)
    try:
        from transformers.utils import logging as hf_logging

        hf_logging.set_verbosity_error()
        hf_logging.disable_progress_bar()
    except ImportError:
        pass


def progress_bar(quiet: bool) -> tuple[object, object]:
    """A rich progress display and a callback ``on_item(i, total, ...)`` advancing its one task."""
    from typing import Any

    from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn, TimeRemainingColumn

    progress = Progress(
        TextColumn("[bold]{task.description}"), BarColumn(), MofNCompleteColumn(), TimeElapsedColumn(),
        TextColumn("eta"), TimeRemainingColumn(), console=console, disable=quiet, transient=False,
    )
    task: dict[str, Any] = {}

    def advance(description: str, done: int, total: int) -> None:
        if "id" not in task:
            task["id"] = progress.add_task(description, total=total)
        progress.update(task["id"], completed=done)

    return progress, advance
