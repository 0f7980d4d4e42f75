"""Shared pieces of the benchmark scripts: the benchmark protocol, model loading, result files."""

from __future__ import annotations

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


def device_name() -> str:
    if torch.cuda.is_available():
        return torch.cuda.get_device_name(0)
    return f"CPU ({platform.processor() or platform.machine()}, {torch.get_num_threads()} threads)"


class Results:
    """Rows written to ``<name>.json`` after each row (partial results survive) and ``<name>.md``."""

    def __init__(self, path: Path, protocol: dict[str, Any], columns: list[str]) -> None:
        self.path = path
        self.data: dict[str, Any] = {"protocol": protocol, "device": device_name(), "torch": torch.__version__,
                                     "started": time.strftime("%Y-%m-%d %H:%M:%S"), "rows": []}
        self.columns = columns

    def add(self, row: dict[str, Any]) -> None:
        self.data["rows"].append(row)
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
        lines += [""] + notes
        self.path.with_suffix(".md").write_text("\n".join(lines) + "\n")
