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


def _rewrite_tasks(args: list[str], available: set[str]) -> tuple[list[str], list[str]]:
    """Map each name after ``--tasks``/``-t`` (space- or comma-separated) to its local ``_offline`` task;
    also the notes to print. A name that is neither a task nor a path is refused here, in one line."""
    out, notes, i = [], [], 0
    while i < len(args):
        a = args[i]
        out.append(a)
        i += 1
        if a not in ("--tasks", "-t"):
            continue
        while i < len(args) and not args[i].startswith("-"):
            names = [n for n in args[i].split(",") if n]
            unknown = [n for n in names if n not in available and f"{n}_offline" not in available and not Path(n).exists()]
            if unknown:
                raise CompressError(
                    f"lm-eval: unknown task(s) {', '.join(unknown)}; list the tasks with 'compress lm-eval ls tasks'"
                )
            mapped = resolve_task_names(names, available, prefer_offline=True)
            notes += [f"compress lm-eval: task '{n}' runs as '{m}' from the local task directory" for n, m in mapped.items() if n != m]
            out.append(",".join(mapped[n] for n in names))
            i += 1
    return out, notes


def lm_eval_args(args: list[str], data_dir: str | Path | None = None) -> list[str]:
    """ARGS with the local task directory added (when it applies and ARGS name none)."""
    if _has_option(args, "--include_path") or (args and args[0] in ("-h", "--help")):
        return list(args)
    if resolve_tasks_dir(None, data_dir) is None:
        return list(args)
    tm, include = task_manager(None, data_dir)
    if include is None:
        return list(args)
    out, notes = _rewrite_tasks(list(args), set(tm.all_tasks))
    for note in [f"compress lm-eval: --include_path {include} (the local task directory)", *notes]:
        print(note, file=sys.stderr)
    return out + ["--include_path", include]


def main(args: list[str] | None = None) -> None:
    """Run lm-eval's CLI on ``args`` (default: sys.argv[1:]) with the format registered."""
    require_lm_eval()
    from ..hf_format import register

    register()
    from lm_eval.__main__ import cli_evaluate

    given = list(sys.argv[1:] if args is None else args)
    _check_pretrained(given)
    argv = lm_eval_args(given)
    sys.argv = ["lm-eval", *argv]
    try:
        cli_evaluate()
    except (ValueError, OSError) as e:  # lm-eval's own refusals (an unknown task, a model it cannot open) in one line
        first = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        if "Tasks not found" in first:
            raise CompressError(f"lm-eval: {first[:300]}; list the tasks with 'compress lm-eval ls tasks'") from None
        raise CompressError(f"lm-eval stopped: {type(e).__name__}: {first[:300]}") from None


def _option_values(args: list[str], name: str) -> list[str]:
    """The values given to ``name`` in ARGS (``name VALUE`` or ``name=VALUE``)."""
    out = []
    for i, a in enumerate(args):
        if a == name and i + 1 < len(args):
            out.append(args[i + 1])
        elif a.startswith(name + "="):
            out.append(a[len(name) + 1:])
    return out


def _check_pretrained(args: list[str]) -> None:
    """A ``pretrained=`` path in ``--model_args`` that names a local folder must exist (otherwise lm-eval
    takes it for a hub ID and fails on its spelling)."""
    for value in _option_values(args, "--model_args"):
        for item in value.split(","):
            key, _, path = item.partition("=")
            if key.strip() != "pretrained" or not path:
                continue
            looks_local = path.startswith(("/", ".", "~")) or Path(path).expanduser().exists() or path.count("/") > 1
            p = Path(path).expanduser()
            if looks_local and not p.is_dir():
                what = "is a file, not a checkpoint folder" if p.exists() else "does not exist"
                raise CompressError(f"--model_args pretrained={path}: '{p}' {what}; give the folder that compress run wrote (its --out)")


if __name__ == "__main__":
    try:
        main()
    except CompressError as e:
        print(f"error: {e}", file=sys.stderr)
        sys.exit(2)
