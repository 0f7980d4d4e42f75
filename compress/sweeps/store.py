"""The sweep directory: one result file per finished point (``rows/``), the import of a directory
from before them (``sweep.csv`` only), and the table, ``sweep.csv``, ``sweep.md`` and ``sweep.png``
rewritten from every finished point under the directory's lock."""

from __future__ import annotations

import csv
import hashlib
import io
import json
import logging
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any, Callable, ContextManager

from ..fsutil import atomic_directory, atomic_text, atomic_write, locked
from .grid import GridPoint

if TYPE_CHECKING:
    from ..api import EvalSpec

logger = logging.getLogger(__name__)

FIELDS = ["label", "method", "options", "status", "compression", "target_ratio", "bits_per_weight", "params", "seconds", "metrics", "error"]
ROWS = "rows"
LOCK = ".sweep.lock"


@dataclass
class SweepResult:
    rows: list[dict[str, Any]]
    dense: dict[str, Any]
    timings: dict[str, float] = field(default_factory=dict)


def _locked(path: Path, on_wait: Callable[[], None] | None = None) -> ContextManager[None]:
    """An exclusive advisory lock on ``path`` (:func:`compress.fsutil.locked`); ``on_wait`` is called
    once if another process holds it. A file system without locks is fine for one job at a time."""

    def refused(e: OSError) -> None:
        logger.warning("cannot lock %s (%s); do not run several jobs on this directory at once", path, e)

    return locked(path, on_wait=on_wait, on_refused=refused)


def _row_path(out: Path, label: str) -> Path:
    # the hash keeps labels that slug alike apart
    return out / ROWS / f"{_slug(label)[:120]}-{hashlib.blake2b(label.encode(), digest_size=4).hexdigest()}.json"


def _save_row(out: Path, row: dict[str, Any]) -> None:
    (out / ROWS).mkdir(parents=True, exist_ok=True)
    atomic_text(_row_path(out, row["label"]), json.dumps(row, default=str) + "\n")


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
    with atomic_directory(out / ROWS) as tmp:
        for label, r in legacy.items():
            try:
                metrics = json.loads(r.get("metrics") or "[]")
            except ValueError:
                metrics = []
            row = {k: r.get(k) or "" for k in FIELDS} | {"metrics": metrics}
            (tmp / _row_path(out, label).name).write_text(json.dumps(row) + "\n")


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
    atomic_text(path, buf.getvalue())


def _publish(out: Path, grid: list[GridPoint], dense: dict[str, Any], timings: dict[str, float], source: str,
             eval_spec: EvalSpec, shard: tuple[int, int] | None) -> SweepResult:
    """Rewrite sweep.csv/md/png from every finished point (of every shard), under the lock."""
    with _locked(out / LOCK):
        result = SweepResult(rows=_table(out, grid), dense=dense, timings=dict(timings))
        _write_csv(out / "sweep.csv", result.rows)
        write_outputs(result, out, source, eval_spec, shard=shard)
    return result


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
    atomic_text(out / "sweep.md", "\n".join(lines) + "\n")
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
    atomic_write(path, lambda tmp: fig.savefig(tmp, dpi=120, format="png"))
    plt.close(fig)
