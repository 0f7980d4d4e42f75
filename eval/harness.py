"""lm-evaluation-harness tasks on an in-memory model (no save/reload, no conversion).

lm-eval is an optional dependency (``pip install 'compress[eval]'``), imported only here. With the
hub unreachable, tasks resolve from a local task directory (``--tasks-dir`` or the
``COMPRESS_TASKS_DIR`` environment variable; by default ``$COMPRESS_DATA_DIR/lm_eval_tasks`` when it
exists). Task YAMLs whose data paths begin with ``__DATA_DIR__`` are rendered once into a cache
folder with the data directory filled in. A requested name that only exists with an ``_offline``
suffix (``arc_easy`` → ``arc_easy_offline``) resolves to it, and the report says which ran.
"""

from __future__ import annotations

import difflib
import hashlib
import importlib.metadata
import os
import shutil
from pathlib import Path
from typing import Any, Callable

from torch import nn

from ..errors import CompressError
from ..fsutil import first_directory

TASKS_DIR_ENV = "COMPRESS_TASKS_DIR"
PLACEHOLDER = "__DATA_DIR__"


def lm_eval_version() -> str | None:
    try:
        return importlib.metadata.version("lm_eval")
    except importlib.metadata.PackageNotFoundError:
        return None


def require_lm_eval() -> None:
    if lm_eval_version() is None:
        raise CompressError("lm-eval tasks need lm-evaluation-harness: pip install 'compress[eval]'")


def resolve_tasks_dir(tasks_dir: str | Path | None, data_dir: str | Path | None = None) -> Path | None:
    """The local task directory: the argument, $COMPRESS_TASKS_DIR, or <data dir>/lm_eval_tasks; None = lm-eval's own."""
    explicit = tasks_dir if tasks_dir is not None else os.environ.get(TASKS_DIR_ENV) or None
    if explicit is not None:
        p = Path(explicit).expanduser()
        if not p.is_dir():
            raise CompressError(f"tasks directory '{p}' {'is a file, not a folder' if p.exists() else 'does not exist'}; pass --tasks-dir DIR or set {TASKS_DIR_ENV}")
        return p
    data = data_dir if data_dir is not None else os.environ.get("COMPRESS_DATA_DIR")
    if data and (Path(data) / "lm_eval_tasks").is_dir():
        return Path(data) / "lm_eval_tasks"
    return None


def render_tasks_dir(tasks_dir: Path, data_dir: Path | None = None, cache: Path | None = None) -> Path:
    """Copy ``tasks_dir`` with ``__DATA_DIR__`` replaced by the data directory (default: its parent)."""
    yamls = list(tasks_dir.rglob("*.yaml")) + list(tasks_dir.rglob("*_yaml"))
    if not any(PLACEHOLDER in p.read_text(errors="ignore") for p in yamls):
        return tasks_dir
    data = (data_dir or tasks_dir.parent).resolve()
    key = hashlib.sha256(f"{tasks_dir.resolve()}|{data}".encode())
    for p in sorted(tasks_dir.rglob("*")):
        if p.is_file():
            key.update(p.name.encode() + str(p.stat().st_mtime_ns).encode())
    root = cache or Path(os.environ.get("XDG_CACHE_HOME", Path.home() / ".cache")) / "compress" / "lm_eval_tasks"
    out = root / key.hexdigest()[:16]
    def build(tmp: Path) -> None:
        shutil.copytree(tasks_dir, tmp, dirs_exist_ok=True)
        for p in tmp.rglob("*"):
            if p.is_file() and (p.suffix == ".yaml" or p.name.endswith("_yaml")):
                p.write_text(p.read_text().replace(PLACEHOLDER, str(data)))

    return first_directory(out, build)


def resolve_task_names(requested: list[str], available: set[str], prefer_offline: bool = False) -> dict[str, str]:
    """requested name → task name to run (the local ``_offline`` variant first when a task
    directory is in use); unknown names list the close matches."""
    out = {}
    for t in requested:
        if prefer_offline and f"{t}_offline" in available:
            out[t] = f"{t}_offline"
        elif t in available:
            out[t] = t
        elif f"{t}_offline" in available:
            out[t] = f"{t}_offline"
        else:
            close = difflib.get_close_matches(t, available, n=4) or difflib.get_close_matches(f"{t}_offline", available, n=4)
            hint = f"; close matches: {', '.join(close)}" if close else ""
            raise CompressError(f"unknown lm-eval task '{t}'{hint} (pass --tasks-dir for local task YAMLs)")
    return out


def _metrics_of(task: str, requested: str, res: dict[str, Any], out: dict[str, Any], common: dict[str, Any]) -> list[dict[str, Any]]:
    rows = []
    for key, value in res.items():
        if not isinstance(value, (int, float)) or "," not in key or "_stderr" in key:
            continue
        metric, filt = key.split(",", 1)
        stderr = res.get(f"{metric}_stderr,{filt}")
        rows.append({
            "name": f"{requested}/{metric}",
            "value": float(value),
            "stderr": float(stderr) if isinstance(stderr, (int, float)) else None,
            "protocol": {
                **common,
                "task": task,
                "task_version": out.get("versions", {}).get(task),
                "n_shot": out.get("n-shot", {}).get(task),
                "samples": (out.get("n-samples", {}).get(task) or {}).get("effective"),
                "metric": metric,
                "filter": filt,
                "level": "word" if metric == "word_perplexity" else None,
            },
        })
    return rows


def task_manager(tasks_dir: str | Path | None = None, data_dir: str | Path | None = None) -> tuple[Any, str | None]:
    """lm-eval's TaskManager over the local task directory (rendered) when there is one; (manager, include path)."""
    require_lm_eval()
    from lm_eval.tasks import TaskManager

    tdir = resolve_tasks_dir(tasks_dir, data_dir)
    include = None
    if tdir is not None:
        ddir = Path(data_dir) if data_dir is not None else (Path(os.environ["COMPRESS_DATA_DIR"]) if os.environ.get("COMPRESS_DATA_DIR") else None)
        include = str(render_tasks_dir(tdir, ddir))
    return (TaskManager(include_path=include) if include else TaskManager()), include


def check_tasks(tasks: list[str], tasks_dir: str | Path | None = None, data_dir: str | Path | None = None) -> dict[str, str]:
    """Resolve task names before any compute (lm-eval installed, task directory present, names known)."""
    tm, include = task_manager(tasks_dir, data_dir)
    return resolve_task_names(tasks, set(tm.all_tasks), prefer_offline=include is not None)


def run_tasks(
    model: nn.Module,
    tokenizer: Any,
    tasks: list[str],
    *,
    tasks_dir: str | Path | None = None,
    data_dir: str | Path | None = None,
    limit: int | float | None = None,
    num_fewshot: int | None = None,
    batch_size: int = 8,
    lm_factory: Callable[[nn.Module, Any, int], Any] | None = None,
) -> list[dict[str, Any]]:
    """Evaluate ``tasks`` with lm-eval's ``simple_evaluate`` on an ``HFLM`` wrapping ``model``.

    ``lm_factory(model, tokenizer, batch_size)`` replaces the HFLM wrapper (tests pass a fake LM).
    Every metric comes back with its protocol: lm-eval version, task and task version, n-shot,
    limit, effective samples, batch size, dtype.
    """
    require_lm_eval()
    if not tasks:
        raise CompressError("no tasks given; example: --tasks arc_easy,piqa")
    import lm_eval

    tm, include = task_manager(tasks_dir, data_dir)
    names = resolve_task_names(tasks, set(tm.all_tasks), prefer_offline=include is not None)
    if lm_factory is not None:
        lm = lm_factory(model, tokenizer, batch_size)
    else:
        from lm_eval.models.huggingface import HFLM

        lm = HFLM(pretrained=model, tokenizer=tokenizer, batch_size=batch_size)
    out = lm_eval.simple_evaluate(
        model=lm, tasks=list(names.values()), limit=limit, num_fewshot=num_fewshot, task_manager=tm,
        log_samples=False, batch_size=batch_size,
    )
    if out is None:
        raise CompressError("lm-eval returned no results")
    dtype = str(next(model.parameters()).dtype).replace("torch.", "") if model is not None else None
    common = {"harness": "lm-eval", "lm_eval_version": lm_eval_version(), "limit": limit, "batch_size": batch_size,
              "dtype": dtype, "tasks_dir": include}
    metrics: list[dict[str, Any]] = []
    for requested, task in names.items():
        if task in out["results"]:
            metrics += _metrics_of(task, requested, out["results"][task], out, common)
        else:  # a group: report its subtasks
            for sub, res in out["results"].items():
                if sub != task:
                    metrics += _metrics_of(sub, f"{requested}/{sub}", res, out, common)
    return metrics
