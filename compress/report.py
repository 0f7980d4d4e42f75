"""The report of a run: what was compressed, how much, how well, how long."""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from .pipeline.sequential import ModuleRecord

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
    timings: dict[str, float] = field(default_factory=dict)
    metrics: list[dict[str, Any]] = field(default_factory=list)
    device: str = "cpu"

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
            "target_bits_before": bits_before,
            "target_bits_after": bits_after,
            "target_params_before": tb,
            "target_params_after": ta,
            "target_ratio": (1 - ta / tb) if tb else 0.0,
            "model_params_before": self.params_before,
            "model_params_after": self.params_after,
            "model_ratio": 1 - self.params_after / self.params_before if self.params_before else 0.0,
            "modules_compressed": sum(1 for r in self._final_records() if r.params_after != r.params_before),
            "modules_targeted": len(self._final_records()),
            "ratio_definition": RATIO_DEFINITION,
        }

    def to_dict(self) -> dict[str, Any]:
        return {
            "model": self.model,
            "recipe": self.recipe,
            "calibration": self.calibration,
            "device": self.device,
            "compression": self.summary(),
            "timings": {k: round(v, 3) for k, v in self.timings.items()},
            "metrics": self.metrics,
            "layers": [asdict(r) for r in self.records],
        }

    def to_markdown(self) -> str:
        s = self.summary()
        lines = [f"# Compression report: {self.model.get('source', '')}", ""]
        lines += ["## Recipe", "", "```yaml", _yaml(self.recipe).rstrip(), "```", ""]
        if self.calibration:
            lines += ["Calibration: " + ", ".join(f"{k}={v}" for k, v in self.calibration.items()), ""]
        lines += [
            "## Compression",
            "",
            "| | before | after | ratio removed |",
            "|---|---:|---:|---:|",
            f"| target linears | {s['target_params_before']:,} | {s['target_params_after']:,} | {s['target_ratio']:.4f} |",
            f"| whole model | {s['model_params_before']:,} | {s['model_params_after']:,} | {s['model_ratio']:.4f} |",
            "",
            f"Target linears store {s['target_bits_per_weight']:.3f} bits per original weight "
            f"({s['target_bits_after']:,} bits; scales, zero-points and factors included, biases excluded).",
            "",
            s["ratio_definition"],
            "",
        ]
        if self.metrics:
            lines += ["## Metrics", "", "| metric | value | protocol |", "|---|---:|---|"]
            for m in self.metrics:
                proto = ", ".join(f"{k}={v}" for k, v in m.get("protocol", {}).items())
                lines.append(f"| {m.get('name', '')} | {m['value']:.4f} | {proto} |")
            lines.append("")
        if self.timings:
            lines += ["## Timings (s)", "", ", ".join(f"{k} {v:.1f}" for k, v in self.timings.items()), ""]
        lines += [
            "## Per-layer table",
            "",
            "| module | pass | type | shape | rank / bits | dim | params before | params after | bits/weight | error | metric | seconds |",
            "|---|---|---|---|---:|---|---:|---:|---:|---:|---|---:|",
        ]
        for r in self.records:
            err = r.info.get("error")
            lines.append(
                f"| {r.name} | {r.pass_name} | {r.module_type} | {r.shape[0]}x{r.shape[1]} | "
                f"{r.info.get('rank', r.info.get('bits', ''))} | {r.info.get('dim', '')} | "
                f"{r.params_before:,} | {r.params_after:,} | {r.bits_after / max(r.params_before, 1):.3f} | "
                f"{'' if err is None else f'{err:.4g}'} | "
                f"{r.info.get('error_metric', r.info.get('kept_dense', ''))} | {r.seconds:.2f} |"
            )
        return "\n".join(lines) + "\n"

    def write(self, directory: str | Path) -> None:
        d = Path(directory)
        (d / "report.json").write_text(json.dumps(self.to_dict(), indent=2, default=str) + "\n")
        (d / "report.md").write_text(self.to_markdown())


def _yaml(obj: Any) -> str:
    import yaml

    return yaml.safe_dump(obj, sort_keys=False)
