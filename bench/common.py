"""Shared pieces of the benchmark scripts: the benchmark protocol, model loading, result files."""

from __future__ import annotations

import argparse
import copy
import json
import platform
import time
from pathlib import Path
from typing import Any

import torch

#: the project's benchmark protocol (DEVELOPERS.md): calibration and perplexity settings
PROTOCOL = {
    "calibration": {"source": "c4", "split": "train", "samples": 32, "seqlen": 512, "seed": 0,
                    "file": "c4/c4-train.00000-of-01024.first1000.jsonl"},
    "perplexity": {"dataset": "wikitext2", "split": "test", "join": "\\n\\n", "level": "token", "seqlen": 2048,
                   "windows": 16},
}


def parser(doc: str | None, name: str, rows: bool = True) -> argparse.ArgumentParser:
    """The arguments every benchmark takes: --model, --data-dir, --windows, --seqlen, --out (and --only)."""
    ap = argparse.ArgumentParser(description=doc, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", required=True)
    ap.add_argument("--data-dir", required=True)
    ap.add_argument("--windows", type=int, default=PROTOCOL["perplexity"]["windows"], help="perplexity windows")
    ap.add_argument("--seqlen", type=int, default=PROTOCOL["perplexity"]["seqlen"], help="perplexity window length (smoke runs on short-context models)")
    ap.add_argument("--out", default=str(Path(__file__).parent / "results" / name))
    if rows:
        ap.add_argument("--only", default="", help="comma-separated row indices to run (default: all)")
        ap.add_argument("--append", action="store_true",
                        help="add the rows to an existing result file of the same protocol (its dense row and time baseline are reused)")
    return ap


def protocol_for(args: argparse.Namespace) -> dict[str, Any]:
    """The benchmark protocol with this run's model and perplexity window settings."""
    protocol = copy.deepcopy(PROTOCOL)
    protocol["perplexity"]["windows"] = args.windows
    protocol["perplexity"]["seqlen"] = args.seqlen
    protocol["model"] = Path(args.model).name
    return protocol


def select(rows: list[Any], only: str) -> list[Any]:
    return rows if not only else [rows[int(i)] for i in only.split(",")]


def device_name() -> str:
    if torch.cuda.is_available():
        return torch.cuda.get_device_name(0)
    return f"CPU ({platform.processor() or platform.machine()}, {torch.get_num_threads()} threads)"


class Results:
    """Rows written to ``<name>.json`` after each row (partial results survive) and ``<name>.md``."""

    def __init__(self, path: Path, protocol: dict[str, Any], columns: list[str], append: bool = False) -> None:
        self.path = path
        self.data: dict[str, Any] = {"protocol": protocol, "device": device_name(), "torch": torch.__version__,
                                     "started": time.strftime("%Y-%m-%d %H:%M:%S"), "rows": []}
        self.columns = columns
        old = path.with_suffix(".json")
        if append and old.is_file():
            prev = json.loads(old.read_text())
            if prev["protocol"] != protocol or prev["device"] != self.data["device"]:
                raise SystemExit(f"--append: {old} was measured with another protocol or device; run without --append")
            self.data = prev
            self.data.setdefault("appended", []).append(time.strftime("%Y-%m-%d %H:%M:%S"))

    def add(self, row: dict[str, Any]) -> None:
        self.data["rows"].append(row)
        self.save()

    def save(self) -> None:
        self.path.parent.mkdir(parents=True, exist_ok=True)
        self.path.with_suffix(".json").write_text(json.dumps(self.data, indent=2) + "\n")

    def write_markdown(self, title: str, notes: list[str]) -> None:
        lines = [f"# {title}", "", f"Device: {self.data['device']}, torch {self.data['torch']}.", ""]
        lines += ["Protocol: " + json.dumps(self.data["protocol"]), ""]
        lines += ["| " + " | ".join(self.columns) + " |", "|" + "---|" * len(self.columns)]
        for r in self.data["rows"]:
            cells = []
            for c in self.columns:
                v = r.get(c, r.get("config", {}).get(c, ""))
                cells.append(f"{v:,.4f}".rstrip("0").rstrip(".") if isinstance(v, float) else (f"{v:,}" if isinstance(v, int) else str(v)))
            lines.append("| " + " | ".join(cells) + " |")
        errors = [f"- {r['method']} {json.dumps(r.get('config', {}))}: {r['error']}" for r in self.data["rows"] if "error" in r]
        lines += ["", "Rows that did not run:", ""] + errors if errors else []
        lines += [""] + notes
        self.path.with_suffix(".md").write_text("\n".join(lines) + "\n")


class Bench:
    """Loads the model once, samples the protocol's calibration set, measures the dense row and a
    dense calibration forward (the time baseline), then compresses fresh copies row by row."""

    def __init__(self, model_path: str, data_dir: str, out: Path, protocol: dict[str, Any], columns: list[str], append: bool = False) -> None:
        from compress.calib.data import CalibConfig, calibration_ids
        from compress.models import count_parameters, load_model

        self.copy = copy.deepcopy
        self.count_parameters = count_parameters
        self.data_dir = data_dir
        self.protocol = protocol
        self.results = Results(out, protocol, columns, append)
        self.model, self.tok, _ = load_model(model_path, dtype="float32", device="cpu")
        c = protocol["calibration"]
        self.ids = calibration_ids(self.tok, CalibConfig(source="c4", samples=c["samples"], seqlen=c["seqlen"], seed=c["seed"]), data_dir)
        t0 = time.perf_counter()
        with torch.no_grad():
            bs = CalibConfig().batch_size
            for b in range(0, self.ids.shape[0], bs):
                self.model(input_ids=self.ids[b : b + bs], use_cache=False)
        self.t_forward = time.perf_counter() - t0
        if any(r["method"] == "dense" for r in self.results.data["rows"]):
            print(f"appending; dense row reused, calibration forward re-measured: {self.t_forward:.1f} s", flush=True)
            return
        t0 = time.perf_counter()
        dense = self.ppl(self.model)
        self.results.add({
            "method": "dense", "config": {}, "ppl": dense, "params": count_parameters(self.model), "bits_per_weight": 32.0,
            "seconds": 0.0, "seconds_vs_forward": 0.0, "calib_forward_seconds": round(self.t_forward, 1),
            "ppl_seconds": round(time.perf_counter() - t0, 1),
        })
        print(self.results.data["rows"][-1], flush=True)

    def ppl(self, m: torch.nn.Module) -> float:
        from compress.eval.perplexity import perplexity

        p = self.protocol["perplexity"]
        return perplexity(m, self.tok, p["dataset"], seqlen=p["seqlen"], max_windows=p["windows"], data_dir=self.data_dir)["value"]

    def row(self, method: str, recipe: list[str], config: dict[str, Any], extra: Any = None, measure: Any = None,
            measure_ppl: bool = True) -> dict[str, Any]:
        """Compress a fresh copy with ``recipe``, measure it, add the row (``extra(report)`` and
        ``measure(model)`` add fields; ``measure_ppl=False``: time and size only)."""
        from compress import compress

        m = self.copy(self.model)
        t0 = time.perf_counter()
        try:
            report = compress(m, recipe, self.ids)
        except Exception as e:  # a failing row is recorded, the run goes on
            row = {"method": method, "config": config, "error": f"{type(e).__name__}: {e}"}
            self.results.add(row)
            print(row, flush=True)
            return row
        secs = time.perf_counter() - t0
        s = report.summary()
        row = {
            "method": method, "config": config, "ppl": self.ppl(m) if measure_ppl else None, "params": self.count_parameters(m),
            "target_ratio": round(s["target_ratio"], 4), "bits_per_weight": round(s["target_bits_per_weight"], 3),
            "seconds": round(secs, 1), "seconds_vs_forward": round(secs / self.t_forward, 2), "calib_forward_seconds": round(self.t_forward, 1),
        }
        if not measure_ppl:
            del row["ppl"]
        if extra is not None:
            row.update(extra(report))
        if measure is not None:
            row.update(measure(m))
        self.results.add(row)
        print(row, flush=True)
        return row
