"""The report of a run: what was compressed, how much, how well, how long."""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from .fsutil import atomic_text
from .records import ModuleRecord

RATIO_DEFINITION = (
    "achieved ratio = 1 - (parameters of the target linears after) / (parameters of the target linears before); "
    "target linears are the decoder-layer nn.Linear modules a pass selected; embeddings, norms and the LM head "
    "are not targets. The whole-model ratio counts every distinct parameter (tied weights once)."
)


@dataclass
class Report:
    model: dict[str, Any]
    recipe: dict[str, Any]
    calibration: dict[str, Any] | None
    records: list[ModuleRecord]
    params_before: int
    params_after: int
    bytes_before: int = 0
    bytes_after: int = 0
    timings: dict[str, float] = field(default_factory=dict)
    metrics: list[dict[str, Any]] = field(default_factory=list)
    device: str = "cpu"
    #: lines the passes contributed about what they did (e.g. SliceGPT's hidden size and accounting)
    notes: list[str] = field(default_factory=list)
    #: structure the passes added to the model, by pass name
    structure: dict[str, Any] = field(default_factory=dict)
    #: what ``--budget`` chose (:meth:`compress.search.SearchResult.to_dict` with its ``lines``)
    search: dict[str, Any] | None = None

    @property
    def target_params_before(self) -> int:
        return sum(r.params_before for r in self._final_records())

    @property
    def target_params_after(self) -> int:
        return sum(r.params_after for r in self._final_records())

    def _final_records(self) -> list[ModuleRecord]:
        # with several passes on one module, count it once: first "before", last "after"
        first: dict[str, ModuleRecord] = {}
        last: dict[str, ModuleRecord] = {}
        for r in self.records:
            first.setdefault(r.name, r)
            last[r.name] = r
        return [
            ModuleRecord(
                **{**asdict(last[n]), "params_before": first[n].params_before, "bits_before": first[n].bits_before}
            )
            for n in first
        ]

    def summary(self) -> dict[str, Any]:
        tb, ta = self.target_params_before, self.target_params_after
        final = self._final_records()
        bits_before = sum(r.bits_before for r in final)
        bits_after = sum(r.bits_after for r in final)
        return {
            "target_bits_per_weight": bits_after / tb if tb else 0.0,
            "target_compression": 1 - bits_after / bits_before if bits_before else 0.0,
            "target_bits_before": bits_before,
            "target_bits_after": bits_after,
            "target_params_before": tb,
            "target_params_after": ta,
            "target_ratio": (1 - ta / tb) if tb else 0.0,
            "model_params_before": self.params_before,
            "model_params_after": self.params_after,
            "model_ratio": 1 - self.params_after / self.params_before if self.params_before else 0.0,
            "model_bytes_before": self.bytes_before,
            "model_bytes_after": self.bytes_after,
            "modules_compressed": sum(1 for r in self._final_records() if r.params_after != r.params_before),
            "modules_targeted": len(self._final_records()),
            "ratio_definition": RATIO_DEFINITION,
        }

    def layer_rows(self) -> list[dict[str, Any]]:
        return layer_rows([asdict(r) for r in self.records])

    def to_dict(self) -> dict[str, Any]:
        return {
            "model": self.model,
            "recipe": self.recipe,
            "calibration": self.calibration,
            "device": self.device,
            "compression": self.summary(),
            "timings": {k: round(v, 3) for k, v in self.timings.items()},
            "metrics": self.metrics,
            "notes": self.notes,
            "structure": self.structure,
            **({"search": self.search} if self.search else {}),
            "layers": [asdict(r) for r in self.records],
        }

    def to_markdown(self) -> str:
        return render_markdown(self.to_dict())

    def write(self, directory: str | Path) -> None:
        write_report(self.to_dict(), directory)


def layer_rows(records: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """One row per decoder layer: modules, passes, weights before → after (each module counted once:
    first "before", last "after"), stored bits per original weight, mean error, seconds."""
    rows: dict[int, dict[str, Any]] = {}
    first: dict[str, dict[str, Any]] = {}
    last: dict[str, dict[str, Any]] = {}
    for r in records:
        first.setdefault(r["name"], r)
        last[r["name"]] = r
        row = rows.setdefault(r["layer"], {"layer": r["layer"], "passes": [], "seconds": 0.0, "errors": []})
        if r["pass_name"] not in row["passes"]:
            row["passes"].append(r["pass_name"])
        row["seconds"] += r["seconds"]
    for name, r in last.items():
        row = rows[r["layer"]]
        row["modules"] = row.get("modules", 0) + 1
        row["params_before"] = row.get("params_before", 0) + first[name]["params_before"]
        row["params_after"] = row.get("params_after", 0) + r["params_after"]
        row["bits_after"] = row.get("bits_after", 0) + r["bits_after"]
        err = r.get("info", {}).get("error")
        if isinstance(err, (int, float)):
            row["errors"].append(float(err))
    out = []
    for i in sorted(rows):
        row = rows[i]
        errs = row.pop("errors")
        row["mean_error"] = sum(errs) / len(errs) if errs else None
        row["bits_per_weight"] = row.pop("bits_after") / max(row["params_before"], 1)
        out.append(row)
    return out


def _signed(after: int, before: int) -> str:
    change = after / before - 1 if before else 0.0
    return f"{'+' if change > 0 else ''}{change:.2%}"


def summary_lines(s: dict[str, Any]) -> list[str]:
    """The compression summary in parameters, bytes and bits per weight (a quantized model can hold
    more parameters, its branches included, in far fewer bytes)."""
    return [
        f"target linears: {s['target_params_before']:,} -> {s['target_params_after']:,} parameters ({_signed(s['target_params_after'], s['target_params_before'])}), "
        f"{s['target_bits_before'] // 8:,} -> {s['target_bits_after'] // 8:,} bytes ({_signed(s['target_bits_after'], s['target_bits_before'])}), "
        f"{s['target_bits_per_weight']:.3f} bits per original weight",
        f"whole model: {s['model_params_before']:,} -> {s['model_params_after']:,} parameters ({_signed(s['model_params_after'], s['model_params_before'])}), "
        f"{s.get('model_bytes_before', 0):,} -> {s.get('model_bytes_after', 0):,} bytes "
        f"({_signed(s.get('model_bytes_after', 0), s.get('model_bytes_before', 0))})",
    ]


def write_report(data: dict[str, Any], directory: str | Path) -> None:
    """Write report.json and report.md (each replaced atomically)."""
    d = Path(directory)
    for name, text in (("report.json", json.dumps(data, indent=2, default=str) + "\n"), ("report.md", render_markdown(data))):
        atomic_text(d / name, text, unique=False)
    if data.get("search") and data.get("recipe"):  # the searched choice as a recipe to edit and rerun with --recipe
        atomic_text(d / "plan.yaml", _yaml(data["recipe"]), unique=False)


def merge_metrics(data: dict[str, Any], metrics: list[dict[str, Any]]) -> dict[str, Any]:
    """Replace metrics of the same name (and protocol dataset/task) and append the new ones."""
    new_names = {m["name"] for m in metrics}
    kept = [m for m in data.get("metrics", []) if m.get("name") not in new_names]
    return {**data, "metrics": kept + metrics}


def _fmt(v: Any) -> str:
    if v is None:
        return ""
    if isinstance(v, float):
        return f"{v:.4f}"
    return str(v)


def render_markdown(d: dict[str, Any]) -> str:
    """The report as Markdown, from its dict form (so that ``compress eval`` can re-render it)."""
    model = d.get("model", {})
    lines = [f"# Report: {model.get('source', '')}", ""]
    if d.get("search"):
        lines += ["## Search", "", "```", *d["search"].get("lines", []), "```", ""]
    if d.get("recipe"):
        lines += ["## Recipe", "", "```yaml", _yaml(d["recipe"]).rstrip(), "```", ""]
    if d.get("calibration"):
        lines += ["Calibration: " + ", ".join(f"{k}={v}" for k, v in d["calibration"].items()), ""]
    s = d.get("compression")
    if s:
        lines += [
            "## Compression",
            "",
            "| | before | after | ratio removed |",
            "|---|---:|---:|---:|",
            f"| target linears (parameters) | {s['target_params_before']:,} | {s['target_params_after']:,} | {s['target_ratio']:.4f} |",
            f"| whole model (parameters) | {s['model_params_before']:,} | {s['model_params_after']:,} | {s['model_ratio']:.4f} |",
            f"| whole model (bytes) | {s.get('model_bytes_before', 0):,} | {s.get('model_bytes_after', 0):,} | "
            f"{1 - s.get('model_bytes_after', 0) / max(s.get('model_bytes_before', 0), 1):.4f} |",
            f"| target linears (bytes) | {s['target_bits_before'] // 8:,} | {s['target_bits_after'] // 8:,} | "
            f"{1 - s['target_bits_after'] / max(s['target_bits_before'], 1):.4f} |",
            "",
            f"Target linears store {s['target_bits_per_weight']:.3f} bits per original weight "
            f"({s['target_bits_after']:,} bits; scales, zero-points and factors included, biases excluded).",
            "",
            s["ratio_definition"],
            "",
        ]
        for note in d.get("notes", []):
            lines += [note, ""]
    if d.get("metrics"):
        lines += ["## Metrics", "", "| metric | value | baseline | change | protocol |", "|---|---:|---:|---:|---|"]
        for m in d["metrics"]:
            proto = ", ".join(f"{k}={v}" for k, v in m.get("protocol", {}).items() if v is not None)
            change = m.get("change")
            lines.append(
                f"| {m.get('name', '')} | {_fmt(m.get('value'))} | {_fmt(m.get('baseline'))} | "
                f"{'' if change is None else f'{change:+.2%}'} | {proto} |"
            )
        lines += [
            "",
            "Perplexity named `ppl_<dataset>` is token-level over fixed windows (the papers' protocol); "
            "lm-eval's `wikitext/word_perplexity` is word-level over whole documents: they are not comparable.",
            "",
        ]
    if d.get("timings"):
        lines += ["## Timings (s)", "", ", ".join(f"{k} {v:.1f}" for k, v in d["timings"].items()), ""]
    if d.get("layers"):
        lines += [
            "## Per decoder layer",
            "",
            "| layer | modules | passes | params before | params after | bits/weight | mean error | seconds |",
            "|---:|---:|---|---:|---:|---:|---:|---:|",
        ]
        for row in layer_rows(d["layers"]):
            err = row["mean_error"]
            lines.append(
                f"| {row['layer']} | {row['modules']} | {', '.join(row['passes'])} | {row['params_before']:,} | {row['params_after']:,} | "
                f"{row['bits_per_weight']:.3f} | {'' if err is None else f'{err:.4g}'} | {row['seconds']:.2f} |"
            )
        lines += [
            "",
            "## Per-module table",
            "",
            "| module | pass | type | shape | rank / bits | dim | params before | params after | bits/weight | error | metric | seconds |",
            "|---|---|---|---|---:|---|---:|---:|---:|---:|---|---:|",
        ]
        for r in d["layers"]:
            info = r.get("info", {})
            err = info.get("error")
            lines.append(
                f"| {r['name']} | {r['pass_name']} | {r['module_type']} | {r['shape'][0]}x{r['shape'][1]} | "
                f"{info.get('rank', info.get('bits', ''))} | {info.get('dim', '')} | "
                f"{r['params_before']:,} | {r['params_after']:,} | {r['bits_after'] / max(r['params_before'], 1):.3f} | "
                f"{'' if err is None else f'{err:.4g}'} | {info.get('error_metric', info.get('kept_dense', ''))} | {r['seconds']:.2f} |"
            )
    return "\n".join(lines) + "\n"


def _yaml(obj: Any) -> str:
    import yaml

    return yaml.safe_dump(obj, sort_keys=False)
