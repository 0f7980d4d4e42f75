"""The quantization defaults are the ones the committed benchmark measured: changing a default
without re-running bench/quant.py (which records the defaults each row ran with) fails here."""

from __future__ import annotations

import json
from dataclasses import fields
from pathlib import Path

import pytest

from compress.registry import get_pass

RESULTS = Path(__file__).resolve().parent.parent / "bench" / "results" / "quant.json"


def _current(name: str) -> dict[str, object]:
    cls = get_pass(name).config_cls
    return {f.name: getattr(cls(), f.name) for f in fields(cls) if f.name != "targets"}


@pytest.mark.parametrize("name", ["gptq", "rtn", "awq"])
def test_defaults_match_the_benchmark_file(name: str) -> None:
    rows = json.loads(RESULTS.read_text())["rows"]
    ran = [r for r in rows if name in r.get("config", {}).get("defaults", {}) and "error" not in r]
    assert ran, f"bench/results/quant.json has no {name} row recording its defaults: run bench/quant.py"
    current = _current(name)
    for r in ran:
        recorded = r["config"]["defaults"][name]
        mismatch = {k: (v, current[k]) for k, v in recorded.items() if current.get(k) != v}
        assert not mismatch, (f"{name} defaults changed since bench/results/quant.json was measured "
                              f"(option: (benchmarked, now)) {mismatch}: re-run bench/quant.py")


def test_the_headline_gptq_rows_ran_with_defaults_only() -> None:
    rows = json.loads(RESULTS.read_text())["rows"]
    heads = {r["config"]["options"] for r in rows if r["method"] == "gptq" and "ppl" in r}
    assert {"bits=3,group=64", "bits=4,group=64"} <= heads
