"""Sweeps: a grid of pass configurations on one model, sharing the calibration work.

Statistics that do not depend on the grid point (Gram matrices, activation statistics) are computed
once from the dense model (one forward per layer) and cached on disk (:mod:`compress.statscache`);
every grid point then compresses a fresh copy of the dense model from the cached statistics with no
calibration forward. Note the difference from a single ``compress run``: there the statistics of
layer i are measured on the outputs of the already compressed layers before it (error propagation);
in a sweep they are the dense model's, as in SVD-LLM's reusable profiling. A pass that reads layer
inputs itself (AdaDim) still runs its calibration forwards.

Outputs in the sweep directory: ``rows/<label>-<hash>.json`` (one result per finished point, written
atomically as the point finishes, so an interrupted sweep resumes where it stopped; delete one to run
its point again), ``sweep.csv`` and ``sweep.md`` (every finished point, in grid order), ``sweep.png``
(metric vs achieved compression, one line per method, the dense model as a reference line),
``dense.json`` (the baseline) and, with ``save_checkpoints``, one compressed checkpoint per point
under ``points/``.

Sharding: ``shard=(i, n)`` (1-based, ``--shard i/n``) runs the points whose index in the grid is
congruent to i - 1 modulo n, so n jobs started on the same directory run disjoint points. They
share it safely: a point's result is its own file (temporary file + rename); ``sweep.csv``,
``sweep.md`` and ``sweep.png`` are rewritten from all finished results under an exclusive lock
(``.sweep.lock``, fcntl.flock) after every point, so the last job to finish leaves the complete
table, identical to an unsharded run's; the dense baseline (``.dense.lock``) and the statistics
cache (``.profile.lock`` in its folder) are computed by one job while the others wait, then reuse
them. A sweep directory from before per-point files (``sweep.csv`` only) is imported on first use.
"""

from __future__ import annotations

import copy
import csv
import hashlib
import io
import json
import logging
import os
import re
import time
import uuid
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Iterator

import torch
from torch import nn

from .adapters import get_adapter
from .api import EvalSpec, compress, evaluate
from .calib.data import CalibConfig, calibration_ids
from .errors import CompressError
from .models import count_parameters, load_model, resolve_device, weights_fingerprint
from .pipeline.sequential import profile_statistics
from .recipe import make_pass
from .registry import get_pass
from .statscache import StatsCache, default_cache_root, stats_key

logger = logging.getLogger(__name__)

FIELDS = ["label", "method", "options", "status", "compression", "target_ratio", "bits_per_weight", "params", "seconds", "metrics", "error"]


@dataclass
class GridPoint:
    method: str
    options: dict[str, Any]

    @property
    def label(self) -> str:
        opts = ",".join(f"{k}={v}" for k, v in self.options.items())
        return f"{self.method}:{opts}" if opts else self.method


def make_grid(axes: list[tuple[str, dict[str, Any], str, list[Any]]]) -> list[GridPoint]:
    """[(pass, base options, varying key, values)] → grid points (each validated)."""
    points: list[GridPoint] = []
    for method, base, key, values in axes:
        if not values:
            raise CompressError(f"empty list of values for '{key}' of pass '{method}'; example: --ratios 0.1,0.2")
        for v in values:
            opts = {**base, key: v}
            make_pass(method, opts)  # validate now, not in the middle of the sweep
            points.append(GridPoint(method, opts))
    return points


@dataclass
class SweepResult:
    rows: list[dict[str, Any]]
    dense: dict[str, Any]
    timings: dict[str, float] = field(default_factory=dict)


def parse_shard(text: str) -> tuple[int, int]:
    """``"i/n"`` (1 <= i <= n) → (i, n); anything else is a one-line :class:`CompressError`."""
    m = re.fullmatch(r"\s*(\d+)\s*/\s*(\d+)\s*", text or "")
    if m is None or not 1 <= int(m.group(1)) <= int(m.group(2)):
        raise CompressError(f"--shard expects i/n with 1 <= i <= n (e.g. --shard 1/2), got '{text}'")
    return int(m.group(1)), int(m.group(2))


def shard_points(grid: list[GridPoint], shard: tuple[int, int] | None) -> list[GridPoint]:
    """The points of ``grid`` that shard (i, n) runs: those at index k with k % n == i - 1."""
    if shard is None:
        return list(grid)
    ok = isinstance(shard, (tuple, list)) and len(shard) == 2 and all(isinstance(v, int) and not isinstance(v, bool) for v in shard)
    if not ok or not 1 <= shard[0] <= shard[1]:
        raise CompressError(f"shard expects (i, n) with 1 <= i <= n (1-based), got {shard!r}")
    i, n = shard
    return [p for k, p in enumerate(grid) if k % n == i - 1]


# ---- the sweep directory: per-point result files, a lock, atomic writes ----------------------------

ROWS = "rows"
LOCK = ".sweep.lock"


@contextmanager
def _locked(path: Path, on_wait: Callable[[], None] | None = None) -> Iterator[None]:
    """An exclusive advisory lock on ``path`` (fcntl.flock; the OS releases it if the process dies).
    ``on_wait`` is called once if another process holds it. Without fcntl (Windows) it is a no-op."""
    try:
        import fcntl
    except ImportError:  # pragma: no cover
        yield
        return
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "a") as f:
        try:
            fcntl.flock(f, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            if on_wait is not None:
                on_wait()
            fcntl.flock(f, fcntl.LOCK_EX)
        except OSError as e:  # a file system without locks: fine for one job at a time
            logger.warning("cannot lock %s (%s); do not run several jobs on this directory at once", path, e)
            yield
            return
        try:
            yield
        finally:
            fcntl.flock(f, fcntl.LOCK_UN)


def _atomic_write(path: Path, write: Callable[[Path], None]) -> None:
    """``write(tmp)`` then rename over ``path``: readers see the old file or the new one, never a part."""
    tmp = path.with_name(f".{path.name}.{os.getpid()}-{uuid.uuid4().hex[:8]}.tmp")
    try:
        write(tmp)
        os.replace(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise


def _write_text(path: Path, text: str) -> None:
    _atomic_write(path, lambda tmp: tmp.write_text(text))


def _row_path(out: Path, label: str) -> Path:
    # the hash keeps labels that slug alike apart
    return out / ROWS / f"{_slug(label)[:120]}-{hashlib.blake2b(label.encode(), digest_size=4).hexdigest()}.json"


def _save_row(out: Path, row: dict[str, Any]) -> None:
    (out / ROWS).mkdir(parents=True, exist_ok=True)
    _write_text(_row_path(out, row["label"]), json.dumps(row, default=str) + "\n")


def _read_row(path: Path) -> dict[str, Any] | None:
    try:
        row = json.loads(path.read_text())
    except FileNotFoundError:
        return None
    except (OSError, ValueError) as e:
        logger.warning("ignoring unreadable sweep result %s (%s); the point is run again", path, e)
        return None
    return row if isinstance(row, dict) and "label" in row else None


def _load_rows(out: Path) -> dict[str, dict[str, Any]]:
    rows: dict[str, dict[str, Any]] = {}
    if (out / ROWS).is_dir():
        for p in sorted((out / ROWS).glob("*.json")):
            row = _read_row(p)
            if row is not None:
                rows[row["label"]] = row
    return rows


def _import_csv(out: Path) -> None:
    """A directory from before per-point result files (``sweep.csv`` only, no ``rows/``): give each
    label of its csv a result file (a finished row preferred), all at once. Call under the lock."""
    csv_path = out / "sweep.csv"
    if (out / ROWS).exists() or not csv_path.is_file():
        return
    with csv_path.open(newline="") as f:
        legacy: dict[str, dict[str, Any]] = {}
        for r in csv.DictReader(f):
            if r.get("label") and (r.get("status") == "ok" or legacy.get(r["label"], {}).get("status") != "ok"):
                legacy[r["label"]] = r
    if not legacy:
        return
    tmp = out / f".{ROWS}.import-{os.getpid()}-{uuid.uuid4().hex[:8]}"
    tmp.mkdir()
    for label, r in legacy.items():
        try:
            metrics = json.loads(r.get("metrics") or "[]")
        except ValueError:
            metrics = []
        row = {k: r.get(k) or "" for k in FIELDS} | {"metrics": metrics}
        (tmp / _row_path(out, label).name).write_text(json.dumps(row) + "\n")
    os.replace(tmp, out / ROWS)


def _table(out: Path, grid: list[GridPoint]) -> list[dict[str, Any]]:
    """Every finished point in the directory: the grid's in grid order, then any others by label."""
    order = {p.label: k for k, p in reversed(list(enumerate(grid)))}
    rows = _load_rows(out)
    return sorted(rows.values(), key=lambda r: (order.get(r["label"], len(order)), r["label"]))


def _write_csv(path: Path, rows: list[dict[str, Any]]) -> None:
    buf = io.StringIO()
    w = csv.DictWriter(buf, fieldnames=FIELDS, lineterminator="\n")
    w.writeheader()
    for row in rows:
        w.writerow({k: (json.dumps(row.get(k) or []) if k == "metrics" else row.get(k, "")) for k in FIELDS})
    _write_text(path, buf.getvalue())


def _publish(out: Path, grid: list[GridPoint], dense: dict[str, Any], timings: dict[str, float], source: str,
             eval_spec: EvalSpec, shard: tuple[int, int] | None) -> SweepResult:
    """Rewrite sweep.csv/md/png from every finished point (of every shard), under the lock."""
    with _locked(out / LOCK):
        result = SweepResult(rows=_table(out, grid), dense=dense, timings=dict(timings))
        _write_csv(out / "sweep.csv", result.rows)
        write_outputs(result, out, source, eval_spec, shard=shard)
    return result


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
                _write_text(path, text)
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
    if not grid:
        raise CompressError("empty sweep grid")
    if not eval_spec:
        raise CompressError("a sweep needs a metric: --eval ppl=wikitext2 (or tasks=...)")
    grid = list({p.label: p for p in reversed(grid)}.values())[::-1]  # a repeated point runs once
    mine = shard_points(grid, shard)
    shard = None if shard is None else (shard[0], shard[1])
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    with _locked(out / LOCK):
        _import_csv(out)
    finished = {label for label, r in _load_rows(out).items() if r.get("status") == "ok"}
    todo = [p for p in mine if p.label not in finished]
    if shard is not None:
        stage(f"shard {shard[0]}/{shard[1]}: {len(mine)} of the grid's {len(grid)} points, {len(todo)} not finished yet")
    timings: dict[str, float] = {}
    t_start = time.perf_counter()
    if isinstance(model, tuple):
        base, tok = model
        source = getattr(getattr(base, "config", None), "_name_or_path", "model")
    else:
        stage(f"loading {model}")
        base, tok, _ = load_model(model, dtype=dtype, device="cpu")
        source = str(model)
    dev = resolve_device(device)
    adapter = get_adapter(base)

    # the dense reference, measured once per sweep directory (by one job; the others wait and read it)
    def measure_dense() -> dict[str, Any]:
        stage("evaluating the dense model")
        t0 = time.perf_counter()
        base.to(dev)
        dense = {"params": count_parameters(base), "metrics": evaluate(base, tok, eval_spec, data_dir=data_dir)}
        base.to("cpu")
        timings["dense_eval"] = time.perf_counter() - t0
        return dense

    dense = _dense_baseline(out, measure_dense, stage)

    passes = [get_pass(p.method)(make_pass(p.method, p.options).config) for p in todo]
    kinds = frozenset().union(*[p.caps.statistics for p in passes if p.caps.requires_calibration]) if passes else frozenset()
    cfg = calib or CalibConfig()
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

    for k, point in enumerate(todo):
        meanwhile = _read_row(_row_path(out, point.label))
        if meanwhile is not None and meanwhile.get("status") == "ok":
            continue  # finished meanwhile by another job on this directory (another sharding of it)
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
            if save_checkpoints:
                from .checkpoint import atomic_directory, save_checkpoint

                m.to("cpu")
                with atomic_directory(out / "points" / _slug(point.label), overwrite=True) as tmp:
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
        _save_row(out, row)
        del m
        # the table and plot are rewritten after every point, so an interrupted sweep still has them
        _publish(out, grid, dense, timings, source, eval_spec, shard)
        if on_point is not None:
            on_point(row, k + 1, len(todo))
    timings["total"] = time.perf_counter() - t_start
    return _publish(out, grid, dense, timings, source, eval_spec, shard)


def _slug(label: str) -> str:
    return re.sub(r"[^A-Za-z0-9_.=-]+", "_", label)


def _metric_names(result: SweepResult) -> list[str]:
    names: list[str] = []
    for m in result.dense["metrics"]:
        if m["name"] not in names and not m["name"].endswith(("bits_per_byte", "byte_perplexity")):
            names.append(m["name"])
    return names


def _value(row: dict[str, Any], name: str) -> float | None:
    for m in row.get("metrics") or []:
        if m["name"] == name:
            return float(m["value"])
    return None


def write_outputs(result: SweepResult, out: Path, source: str, eval_spec: EvalSpec, shard: tuple[int, int] | None = None) -> None:
    names = _metric_names(result)
    lines = [f"# Sweep: {source}", ""]
    if result.dense["metrics"]:
        p = result.dense["metrics"][0]["protocol"]
        lines += ["Protocol of the first metric: " + ", ".join(f"{k}={v}" for k, v in p.items() if v is not None), ""]
    lines += [
        "Statistics: computed once on the dense model and reused by every point (see compress/sweeps.py).",
        "",
        "Achieved compression = 1 − stored bits of the target linears / their dense bits (for low-rank passes "
        "in the model's dtype this equals the fraction of parameters removed).",
        "",
        "| point | status | achieved compression | parameters removed | bits/weight | " + " | ".join(names) + " | seconds |",
        "|---|---|---:|---:|---:|" + "---:|" * len(names) + "---:|",
        "| dense | ok | 0 | 0 | 32 | " + " | ".join(f"{_value(result.dense, n):.4f}" for n in names) + " | |",
    ]
    for r in result.rows:
        vals = [_value(r, n) for n in names]
        cells = " | ".join("" if v is None else f"{v:.4f}" for v in vals)
        status = r["status"] if r["status"] == "ok" else f"failed: {r.get('error', '')[:80]}"
        lines.append(
            f"| {r['label']} | {status} | {r.get('compression', '')} | {r.get('target_ratio', '')} | "
            f"{r.get('bits_per_weight', '')} | {cells} | {r.get('seconds', '')} |"
        )
    if result.timings:
        whose = f" of shard {shard[0]}/{shard[1]} (the job that wrote this file)" if shard is not None else ""
        lines += ["", f"Timings (s){whose}: " + ", ".join(f"{k} {v:.1f}" for k, v in result.timings.items())]
    _write_text(out / "sweep.md", "\n".join(lines) + "\n")
    if names:
        _plot(result, out / "sweep.png", names[0])


def _plot(result: SweepResult, path: Path, metric: str) -> None:
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        logger.warning("matplotlib is not installed: no sweep.png (pip install 'compress[plot]')")
        return
    fig, ax = plt.subplots(figsize=(6.4, 4.4))
    by_method: dict[str, list[tuple[float, float]]] = {}
    for r in result.rows:
        v = _value(r, metric)
        if r["status"] == "ok" and v is not None:
            by_method.setdefault(r["method"], []).append((float(r["compression"]), v))
    for method, pts in by_method.items():
        pts.sort()
        ax.plot([p[0] for p in pts], [p[1] for p in pts], marker="o", label=method)
    dense = _value(result.dense, metric)
    if dense is not None:
        ax.axhline(dense, color="black", linestyle="--", linewidth=1, label="dense")
    values = [p[1] for pts in by_method.values() for p in pts] + ([dense] if dense else [])
    if "ppl" in metric or "perplexity" in metric:
        if values and max(values) / max(min(values), 1e-9) > 20:
            ax.set_yscale("log")
    ax.set_xlabel("achieved compression (1 - stored bits / dense bits of the target linears)")
    ax.set_ylabel(metric)
    ax.set_title("sweep")
    ax.grid(alpha=0.3)
    ax.legend()
    fig.tight_layout()
    _atomic_write(path, lambda tmp: fig.savefig(tmp, dpi=120, format="png"))
    plt.close(fig)
