"""lm-eval's own command line with compress checkpoints readable: ``compress lm-eval ARGS...`` (or
``python -m compress.eval.lm_eval_cli ARGS...``) registers the checkpoint format with transformers
and then runs lm-eval's CLI on ARGS unchanged, so ``--model hf --model_args pretrained=OUT`` opens a
compressed checkpoint and every lm-eval flag works.

One addition: when the local task directory applies (``$COMPRESS_TASKS_DIR``, else
``$COMPRESS_DATA_DIR/lm_eval_tasks``, as for ``compress eval``) and ARGS carry no
``--include_path``, it is added, and a task name that exists there only with an ``_offline``
suffix is run as that task, as ``compress eval`` does; both are announced on stderr.
"""

from __future__ import annotations

import sys
from pathlib import Path

from ..errors import CompressError
from .harness import require_lm_eval, resolve_task_names, resolve_tasks_dir, task_manager

_COMMANDS = ("run", "ls", "list", "validate")


def _has_option(args: list[str], *names: str) -> bool:
    return any(a in names or any(a.startswith(n + "=") for n in names) for a in args)


def _rewrite_tasks(args: list[str], available: set[str]) -> list[str]:
    """Map each name after ``--tasks``/``-t`` (space- or comma-separated) to its local ``_offline`` task."""
    out, i = [], 0
    while i < len(args):
        a = args[i]
        out.append(a)
        i += 1
        if a not in ("--tasks", "-t"):
            continue
        while i < len(args) and not args[i].startswith("-"):
            names = [n for n in args[i].split(",") if n]
            try:
                mapped = resolve_task_names(names, available, prefer_offline=True)
            except CompressError:
                mapped = {n: n for n in names}  # lm-eval reports unknown names itself
            for n, m in mapped.items():
                if n != m:
                    print(f"compress lm-eval: task '{n}' runs as '{m}' from the local task directory", file=sys.stderr)
            out.append(",".join(mapped[n] for n in names))
            i += 1
    return out


def lm_eval_args(args: list[str], data_dir: str | Path | None = None) -> list[str]:
    """ARGS with the local task directory added (when it applies and ARGS name none)."""
    if _has_option(args, "--include_path") or (args and args[0] in ("-h", "--help")):
        return list(args)
    if resolve_tasks_dir(None, data_dir) is None:
        return list(args)
    tm, include = task_manager(None, data_dir)
    if include is None:
        return list(args)
    print(f"compress lm-eval: --include_path {include} (the local task directory)", file=sys.stderr)
    return _rewrite_tasks(list(args), set(tm.all_tasks)) + ["--include_path", include]


def main(args: list[str] | None = None) -> None:
    """Run lm-eval's CLI on ``args`` (default: sys.argv[1:]) with the format registered."""
    require_lm_eval()
    from ..hf_format import register

    register()
    from lm_eval.__main__ import cli_evaluate

    argv = lm_eval_args(list(sys.argv[1:] if args is None else args))
    sys.argv = ["lm-eval", *argv]
    cli_evaluate()


if __name__ == "__main__":
    try:
        main()
    except CompressError as e:
        print(f"error: {e}", file=sys.stderr)
        sys.exit(2)
