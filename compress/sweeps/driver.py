"""The sweep itself: the dense baseline (measured once per directory), the calibration statistics
(profiled once on the dense model and cached), and every grid point compressed from them,
evaluated, recorded in the sweep directory and published in its table."""

from __future__ import annotations

import contextlib
import copy
import json
import logging
import shutil
import time
from pathlib import Path
from typing import Any, Callable

import torch
from torch import nn

from ..adapters import get_adapter
from ..api import compress, evaluate
from ..calib.data import CalibConfig, calibration_ids, load_documents
from ..errors import CompressError
from ..evalspec import EvalSpec
from ..fsutil import atomic_directory, atomic_text
from ..models import count_parameters, load_model, resolve_device, weights_fingerprint
from ..passes.base import Pass
from ..pipeline.profile import profile_statistics
from ..planning.checks import check_calib_length, check_eval, check_output_dir
from ..readers import read_json
from ..recipe import make_pass
from ..statscache import StatsCache, default_cache_root, stats_key
from .grid import GridPoint, shard_points
from .store import LOCK, SweepResult, _import_csv, _load_rows, _locked, _publish, _read_row, _row_path, _save_row, _slug

logger = logging.getLogger(__name__)


def _dense_baseline(out: Path, measure: Callable[[], dict[str, Any]], stage: Callable[[str], None]) -> dict[str, Any]:
    """``dense.json``, measured by one process: the others wait for it and read it."""
    path = out / "dense.json"

    def read() -> dict[str, Any] | None:
        try:
            return json.loads(path.read_text())
        except FileNotFoundError:
            return None
        except ValueError:
            logger.warning("%s is unreadable; measuring the dense model again", path)
            return None

    dense = read()
    if dense is None:
        with _locked(out / ".dense.lock", on_wait=lambda: stage("waiting for another job measuring the dense model")):
            dense = read()
            if dense is None:
                text = json.dumps(measure(), indent=2, default=str) + "\n"
                atomic_text(path, text)
                dense = json.loads(text)  # the same values whichever job measured them
    return dense



def sweep(
    model: str | Path | tuple[nn.Module, Any],
    grid: list[GridPoint],
    out: str | Path,
    *,
    eval_spec: EvalSpec,
    calib: CalibConfig | None = None,
    data_dir: str | Path | None = None,
    device: str | None = "cpu",
    dtype: str | None = "auto",
    save_checkpoints: bool = False,
    cache_root: Path | None = None,
    shard: tuple[int, int] | None = None,
    on_point: Callable[[dict[str, Any], int, int], None] | None = None,
    on_stage: Callable[[str], None] | None = None,
) -> SweepResult:
    """Run every grid point on ``model`` (a source path/ID or a loaded (model, tokenizer)) and write
    the sweep's table and plot into ``out``. Points already finished in ``out`` are skipped.

    ``shard=(i, n)`` (1-based) runs only the points at grid index k with k % n == i - 1; n such calls
    (in n processes, at the same time or one after another) on the same ``out`` fill it as one
    unsharded call would. The returned rows are every point finished in ``out`` so far (by any
    shard), in grid order; ``on_point`` is called for this call's points."""
    stage = on_stage or (lambda s: logger.info(s))
    stage = on_stage or (lambda s: logger.info(s))
    if not grid:
        raise CompressError("empty sweep grid")
    if not eval_spec:
        raise CompressError("a sweep needs a metric: --eval ppl=wikitext2 (or tasks=...)")
    grid = list({p.label: p for p in reversed(grid)}.values())[::-1]  # a repeated point runs once
    mine = shard_points(grid, shard)
    shard = None if shard is None else (shard[0], shard[1])
    out = Path(out)
    cfg = calib or CalibConfig()
    # every refusal that needs no weights comes before the model is loaded and before `out` is made
    dev = resolve_device(device)
    check_output_dir(out, overwrite=True, keep=(model,) if isinstance(model, (str, Path)) else ())  # an existing sweep resumes
    passes = _check(model, mine, eval_spec, cfg, data_dir)
    settings = {"model": str(model) if isinstance(model, (str, Path)) else _source_name(model[0]), "dtype": dtype,
                "calibration": {k: v for k, v in cfg.to_dict().items() if k != "batch_size"},
                "eval": {k: v for k, v in eval_spec.to_dict().items() if k != "batch_size"}}
    if (out / SETTINGS).is_file():
        _same_settings(out, settings)  # before the model is loaded
    timings: dict[str, float] = {}
    t_start = time.perf_counter()
    base, tok, source = _load(model, dtype, stage)
    check_eval(eval_spec, data_dir, getattr(base, "config", None))
    check_calib_length(cfg.seqlen, getattr(base, "config", None))
    adapter = get_adapter(base)
    new_dir = not out.exists()
    todo = _unfinished(out, mine)
    try:
        _same_settings(out, settings)
        if shard is not None:
            stage(f"shard {shard[0]}/{shard[1]}: {len(mine)} of the grid's {len(grid)} points, {len(todo)} not finished yet")
        todo_passes = [passes[p.label] for p in todo]
        dense, ids, cache = _prepare(out, base, tok, adapter, todo_passes, cfg, eval_spec, data_dir, dev, cache_root, stage, timings)
    except BaseException:
        if new_dir and not _load_rows(out):  # refused before any point ran: leave no directory behind
            shutil.rmtree(out, ignore_errors=True)
        raise


    for k, point in enumerate(todo):
        meanwhile = _read_row(_row_path(out, point.label))
        if meanwhile is not None and meanwhile.get("status") == "ok":
            continue  # finished meanwhile by another job on this directory (another sharding of it)
        row = _run_point(point, base, tok, adapter, ids, cache, cfg, dev, eval_spec, data_dir, out / "points" if save_checkpoints else None, source)
        _save_row(out, row)
        # the table and plot are rewritten after every point, so an interrupted sweep still has them
        _publish(out, grid, dense, timings, source, eval_spec, shard)
        if on_point is not None:
            on_point(row, k + 1, len(todo))
    timings["total"] = time.perf_counter() - t_start
    return _publish(out, grid, dense, timings, source, eval_spec, shard)


def _check(model: Any, points: list[GridPoint], eval_spec: EvalSpec, cfg: CalibConfig, data_dir: str | Path | None) -> dict[str, Pass[Any]]:
    """The sweep's refusals that need no weights: evaluation options and data, the points' passes, the
    calibration text they read, and (where the config can be read alone) the model's window length.
    Returns each point's pass, built once (label → pass)."""
    check_eval(eval_spec, data_dir)
    passes = {p.label: make_pass(p.method, p.options).build() for p in points}
    if any(p.caps.requires_calibration for p in passes.values()):
        load_documents(cfg.source, cfg.split, data_dir)
    if isinstance(model, (str, Path)) and not any(Path(model).glob("*.gguf")):
        config = None
        with contextlib.suppress(Exception):  # the load reports what is wrong with the model itself
            from transformers import AutoConfig

            config = AutoConfig.from_pretrained(str(model))
        if config is not None:
            check_eval(eval_spec, data_dir, config)
            check_calib_length(cfg.seqlen, config)
    return passes


def _prepare(
    out: Path, base: nn.Module, tok: Any, adapter: Any, todo: list[Pass[Any]], cfg: CalibConfig, eval_spec: EvalSpec,
    data_dir: str | Path | None, dev: Any, cache_root: Path | None, stage: Callable[[str], None], timings: dict[str, float],
) -> tuple[dict[str, Any], torch.Tensor | None, StatsCache | None]:
    """The dense reference (measured once per sweep directory, by one job; the others wait and read it),
    the calibration ids and the statistics cache."""

    def measure_dense() -> dict[str, Any]:
        stage("evaluating the dense model")
        t0 = time.perf_counter()
        base.to(dev)
        dense = {"params": count_parameters(base), "metrics": evaluate(base, tok, eval_spec, data_dir=data_dir)}
        base.to("cpu")
        timings["dense_eval"] = time.perf_counter() - t0
        return dense

    dense = _dense_baseline(out, measure_dense, stage)
    ids, cache = _statistics(base, tok, adapter, todo, cfg, data_dir, dev, cache_root, stage, timings)
    return dense, ids, cache


SETTINGS = "settings.json"


def _same_settings(out: Path, settings: dict[str, Any]) -> None:
    """The settings every point of the sweep in ``out`` shares (model, dtype, calibration, evaluation):
    recorded by the first job, and a later job with other settings is refused (its rows would sit in
    one table beside rows measured another way)."""
    path = out / SETTINGS
    now = json.loads(json.dumps(settings, default=str))
    with _locked(out / LOCK):
        if not path.is_file():
            if _load_rows(out):
                return  # a sweep from before settings were recorded: nothing to compare with
            atomic_text(path, json.dumps(now, indent=2, sort_keys=True) + "\n")
            return
        old = read_json(path, "sweep settings")
    was, is_ = _flat(old if isinstance(old, dict) else {}), _flat(now)
    changed = sorted(k for k in set(was) | set(is_) if was.get(k) != is_.get(k))
    if changed:
        detail = ", ".join(f"{k} {was.get(k)!r} then, {is_.get(k)!r} now" for k in changed)[:400]
        raise CompressError(f"the sweep in '{out}' was run with other settings ({detail}); rerun with the same settings to resume it, "
                            "or choose another --out")


def _flat(d: dict[str, Any]) -> dict[str, Any]:
    """{"calibration": {"samples": 32}} → {"calibration.samples": 32} (one level)."""
    return {f"{k}.{k2}" if isinstance(v, dict) else k: v2 for k, v in d.items() for k2, v2 in (v.items() if isinstance(v, dict) else [("", v)])}


def _unfinished(out: Path, mine: list[GridPoint]) -> list[GridPoint]:
    """The points of ``mine`` not finished in ``out`` (made if new; a directory from before per-point
    result files is imported first)."""
    out.mkdir(parents=True, exist_ok=True)
    with _locked(out / LOCK):
        _import_csv(out)
    finished = {label for label, r in _load_rows(out).items() if r.get("status") == "ok"}
    return [p for p in mine if p.label not in finished]


def _source_name(base: nn.Module) -> str:
    return str(getattr(getattr(base, "config", None), "_name_or_path", "model"))


def _load(model: str | Path | tuple[nn.Module, Any], dtype: str | None, stage: Callable[[str], None]) -> tuple[nn.Module, Any, str]:
    """(model, tokenizer, source name) of a loaded (model, tokenizer) or a source path/ID (loaded on the CPU)."""
    if isinstance(model, tuple):
        base, tok = model
        source = _source_name(base)
    else:
        stage(f"loading {model}")
        base, tok, _ = load_model(model, dtype=dtype, device="cpu")
        source = str(model)
    return base, tok, source


def _statistics(
    base: nn.Module, tok: Any, adapter: Any, passes: list[Pass[Any]], cfg: CalibConfig, data_dir: str | Path | None, dev: Any,
    cache_root: Path | None, stage: Callable[[str], None], timings: dict[str, float],
) -> tuple[torch.Tensor | None, StatsCache | None]:
    """The calibration ids the points in ``todo`` need and the cache of the statistics they read,
    profiled on the dense model unless cached (one job profiles; the others wait, then reuse them);
    ``passes``: the unfinished points' passes, which say what each needs of the profile."""
    kinds = frozenset().union(*[p.caps.statistics for p in passes if p.caps.requires_calibration]) if passes else frozenset()
    ids: torch.Tensor | None = None
    cache: StatsCache | None = None
    if any(p.caps.requires_calibration for p in passes):
        ids = calibration_ids(tok, cfg, data_dir)
    if kinds:
        assert ids is not None
        key = stats_key(weights_fingerprint(base), ids, kinds, adapter.name)
        cache = StatsCache(cache_root or default_cache_root(), key)
        n_layers = len(adapter.layers(base))
        if not cache.complete(n_layers):
            # one job profiles (two writing the same layer file could mix); the others wait, then reuse
            with _locked(cache.dir / ".profile.lock", on_wait=lambda: stage("waiting for another job profiling the same statistics")):
                if not cache.complete(n_layers):
                    stage("profiling calibration statistics (once for the whole sweep)")
                    t0 = time.perf_counter()
                    profile_statistics(base, adapter, ids, kinds, device=dev, batch_size=cfg.batch_size, on_layer=cache.save_layer)
                    timings["profile"] = time.perf_counter() - t0
                else:
                    stage(f"reusing cached statistics {cache.dir}")
        else:
            stage(f"reusing cached statistics {cache.dir}")
    return ids, cache


def _run_point(
    point: GridPoint, base: nn.Module, tok: Any, adapter: Any, ids: torch.Tensor | None, cache: StatsCache | None, cfg: CalibConfig,
    dev: Any, eval_spec: EvalSpec, data_dir: str | Path | None, points_dir: Path | None, source: str,
) -> dict[str, Any]:
    """Compress a copy of ``base`` with ``point`` and evaluate it: the point's result row (a failure is
    recorded in it). With ``points_dir`` the compressed model is saved there, in a folder named
    after the point."""
    t0 = time.perf_counter()
    m = copy.deepcopy(base)
    row: dict[str, Any] = {"label": point.label, "method": point.method, "options": json.dumps(point.options)}
    try:
        report = compress(
            m, [point.label], ids, adapter=adapter, device=dev, batch_size=cfg.batch_size,
            stats_provider=cache.provider if cache is not None else None,
        )
        m.to(dev)
        metrics = evaluate(m, tok, eval_spec, data_dir=data_dir)
        s = report.summary()
        row.update(
            status="ok", compression=round(s["target_compression"], 6), target_ratio=round(s["target_ratio"], 6), bits_per_weight=round(s["target_bits_per_weight"], 4),
            params=count_parameters(m), metrics=metrics, error="",
        )
        if points_dir is not None:
            from ..checkpoint import save_checkpoint

            m.to("cpu")
            with atomic_directory(points_dir / _slug(point.label), overwrite=True) as tmp:
                save_checkpoint(m, tok, tmp, {"recipe": report.recipe, "calibration": report.calibration})
                report.metrics = metrics
                report.model["source"] = source
                report.write(tmp)
    except CompressError as e:
        row.update(status="failed", metrics=[], error=str(e))
    except Exception as e:  # a failing point is recorded and the sweep goes on
        logger.exception("grid point %s failed", point.label)
        row.update(status="failed", metrics=[], error=f"{type(e).__name__}: {e}")
    row["seconds"] = round(time.perf_counter() - t0, 2)
    return row
