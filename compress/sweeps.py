"""Sweeps: a grid of pass configurations on one model, sharing the calibration work.

Statistics that do not depend on the grid point (Gram matrices, activation statistics) are computed
once from the dense model (one forward per layer) and cached on disk (:mod:`compress.statscache`);
every grid point then compresses a fresh copy of the dense model from the cached statistics with no
calibration forward. Note the difference from a single ``compress run``: there the statistics of
layer i are measured on the outputs of the already compressed layers before it (error propagation);
in a sweep they are the dense model's, as in SVD-LLM's reusable profiling. A pass that reads layer
inputs itself (AdaDim) still runs its calibration forwards.

Outputs in the sweep directory: ``sweep.csv`` (one row per point, appended as points finish, so an
interrupted sweep resumes where it stopped), ``sweep.md``, ``sweep.png`` (metric vs achieved
compression, one line per method, the dense model as a reference line), ``dense.json`` (the baseline)
and, with ``save_checkpoints``, one compressed checkpoint per point under ``points/``.
"""

from __future__ import annotations

import copy
import csv
import json
import logging
import re
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable

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


def _read_done(csv_path: Path) -> dict[str, dict[str, Any]]:
    if not csv_path.is_file():
        return {}
    with csv_path.open() as f:
        return {r["label"]: r for r in csv.DictReader(f) if r.get("status") == "ok"}


def _append(csv_path: Path, row: dict[str, Any]) -> None:
    new = not csv_path.is_file()
    with csv_path.open("a", newline="") as f:
        w = csv.DictWriter(f, fieldnames=FIELDS)
        if new:
            w.writeheader()
        w.writerow({k: (json.dumps(row[k]) if k == "metrics" else row.get(k, "")) for k in FIELDS})
        f.flush()


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
    on_point: Callable[[dict[str, Any], int, int], None] | None = None,
    on_stage: Callable[[str], None] | None = None,
) -> SweepResult:
    """Run every grid point on ``model`` (a source path/ID or a loaded (model, tokenizer)) and write
    the sweep's table and plot into ``out``. Points already in ``out/sweep.csv`` are skipped."""
    stage = on_stage or (lambda s: logger.info(s))
    if not grid:
        raise CompressError("empty sweep grid")
    if not eval_spec:
        raise CompressError("a sweep needs a metric: --eval ppl=wikitext2 (or tasks=...)")
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    csv_path = out / "sweep.csv"
    done = _read_done(csv_path)
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

    # the dense reference, measured once per sweep directory
    dense_path = out / "dense.json"
    if dense_path.is_file():
        dense = json.loads(dense_path.read_text())
    else:
        stage("evaluating the dense model")
        t0 = time.perf_counter()
        base.to(dev)
        dense = {"params": count_parameters(base), "metrics": evaluate(base, tok, eval_spec, data_dir=data_dir)}
        base.to("cpu")
        timings["dense_eval"] = time.perf_counter() - t0
        dense_path.write_text(json.dumps(dense, indent=2, default=str) + "\n")

    todo = [p for p in grid if p.label not in done]
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
            stage("profiling calibration statistics (once for the whole sweep)")
            t0 = time.perf_counter()
            profile_statistics(base, adapter, ids, kinds, device=dev, batch_size=cfg.batch_size, on_layer=cache.save_layer)
            timings["profile"] = time.perf_counter() - t0
        else:
            stage(f"reusing cached statistics {cache.dir}")

    rows: list[dict[str, Any]] = [dict(r, metrics=json.loads(r["metrics"] or "[]")) for r in done.values()]
    for k, point in enumerate(todo):
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
        _append(csv_path, row)
        rows.append(row)
        del m
        # the table and plot are rewritten after every point, so an interrupted sweep still has them
        write_outputs(_ordered(rows, dense, timings, grid), out, source, eval_spec)
        if on_point is not None:
            on_point(row, k + 1, len(todo))
    timings["total"] = time.perf_counter() - t_start
    result = _ordered(rows, dense, timings, grid)
    write_outputs(result, out, source, eval_spec)
    return result


def _ordered(rows: list[dict[str, Any]], dense: dict[str, Any], timings: dict[str, float], grid: list[GridPoint]) -> SweepResult:
    order = {p.label: i for i, p in enumerate(grid)}
    return SweepResult(rows=sorted(rows, key=lambda r: order.get(r["label"], len(order))), dense=dense, timings=dict(timings))


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


def write_outputs(result: SweepResult, out: Path, source: str, eval_spec: EvalSpec) -> None:
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
        lines += ["", "Timings (s): " + ", ".join(f"{k} {v:.1f}" for k, v in result.timings.items())]
    (out / "sweep.md").write_text("\n".join(lines) + "\n")
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
    fig.savefig(path, dpi=120)
    plt.close(fig)
