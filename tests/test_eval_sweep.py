"""lm-eval in memory, reports, sweeps (statistics reuse, resume, failures), and bad inputs."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest

from compress import EvalSpec, compress, evaluate, load, sweep
from compress.errors import CompressError

from .conftest import DATA_DIR, STORIES, needs

pytestmark = [needs(STORIES), needs(DATA_DIR)]
lm_eval_model = pytest.importorskip("lm_eval.api.model")

PPL = EvalSpec(ppl=("wikitext2",), ppl_seqlen=512, max_windows=1)


@pytest.fixture(scope="module")
def stories():  # type: ignore[no-untyped-def]
    from compress.models import load_model

    model, tok, _ = load_model(STORIES, dtype="float32")
    return model, tok


class _FakeLM(lm_eval_model.LM):  # type: ignore[misc]
    """Prefers the shortest continuation: deterministic, no model needed."""

    def loglikelihood(self, requests: list[Any], disable_tqdm: bool = False) -> list[tuple[float, bool]]:
        return [(-float(len(r.args[1])), False) for r in requests]

    def loglikelihood_rolling(self, requests: list[Any], disable_tqdm: bool = False) -> list[float]:
        return [-float(len(r.args[0])) for r in requests]

    def generate_until(self, requests: list[Any], disable_tqdm: bool = False) -> list[str]:
        return ["" for _ in requests]


def test_report_plumbing_with_a_fake_lm(stories) -> None:  # type: ignore[no-untyped-def]
    model, tok = stories
    spec = EvalSpec(tasks=("arc_easy", "piqa"), limit=6)
    metrics = evaluate(model, tok, spec, lm_factory=lambda m, t, b: _FakeLM())
    names = {m["name"] for m in metrics}
    assert {"arc_easy/acc", "arc_easy/acc_norm", "piqa/acc"} <= names
    m = next(m for m in metrics if m["name"] == "arc_easy/acc")
    p = m["protocol"]
    assert p["task"] == "arc_easy_offline" and p["lm_eval_version"] and p["n_shot"] == 0 and p["limit"] == 6
    assert p["samples"] == 6 and p["dtype"] == "float32" and 0.0 <= m["value"] <= 1.0


def test_real_offline_task_and_report(stories, tmp_path: Path) -> None:  # type: ignore[no-untyped-def]
    from compress import run

    out = tmp_path / "o"
    report = run(
        STORIES, ["svd-llm:ratio=0.2"], out, data_dir=DATA_DIR, device="cpu",
        calib=__import__("compress").CalibConfig(samples=8, seqlen=128),
        eval_spec=EvalSpec(ppl=("wikitext2",), tasks=("arc_easy",), limit=8, ppl_seqlen=512, max_windows=1), baseline=True,
    )
    data = json.loads((out / "report.json").read_text())
    names = {m["name"] for m in data["metrics"]}
    assert {"ppl_wikitext2", "arc_easy/acc"} <= names
    ppl = next(m for m in data["metrics"] if m["name"] == "ppl_wikitext2")
    assert ppl["baseline"] < ppl["value"] and ppl["change"] > 0
    md = (out / "report.md").read_text()
    assert "| ppl_wikitext2 |" in md and "word-level" in md and "bits per original weight" in md
    assert report.summary()["target_ratio"] > 0.2


def test_unknown_task_lists_close_matches(stories) -> None:  # type: ignore[no-untyped-def]
    model, tok = stories
    with pytest.raises(CompressError, match="unknown lm-eval task 'arc_eazy'.*arc_easy"):
        evaluate(model, tok, EvalSpec(tasks=("arc_eazy",)))
    with pytest.raises(CompressError, match="tasks directory .* does not exist"):
        evaluate(model, tok, EvalSpec(tasks=("arc_easy",), tasks_dir="/no/such/dir"))


def test_missing_lm_eval_says_how_to_install(stories, monkeypatch: pytest.MonkeyPatch) -> None:  # type: ignore[no-untyped-def]
    import compress.eval.harness as h

    monkeypatch.setattr(h, "lm_eval_version", lambda: None)
    model, tok = stories
    with pytest.raises(CompressError, match=r"pip install 'compress\[eval\]'"):
        evaluate(model, tok, EvalSpec(tasks=("arc_easy",)))


def test_sweep_reuses_statistics_resumes_and_records_failures(stories, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:  # type: ignore[no-untyped-def]
    import compress.pipeline.sequential as seq
    from compress import CalibConfig
    from compress.sweeps import make_grid

    calls = {"n": 0}
    real = seq.capture_layer0_inputs

    def counting(*a: Any, **k: Any) -> Any:
        calls["n"] += 1
        return real(*a, **k)

    monkeypatch.setattr(seq, "capture_layer0_inputs", counting)
    calib = CalibConfig(samples=8, seqlen=64)
    cache = tmp_path / "cache"
    grid = make_grid([("svd-llm", {}, "ratio", [0.1, 0.3])])
    seen: list[str] = []
    r1 = sweep(stories, grid, tmp_path / "sw", eval_spec=PPL, calib=calib, data_dir=DATA_DIR, cache_root=cache,
               on_point=lambda row, k, n: seen.append(row["label"]))
    assert calls["n"] == 1, "one profiling forward for the whole grid"
    assert [r["status"] for r in r1.rows] == ["ok", "ok"]
    ppl = [r["metrics"][0]["value"] for r in r1.rows]
    assert ppl[0] < ppl[1]
    # same points from a one-point-at-a-time run reproduce the sweep's numbers
    # resume: the done points are skipped; the new ones reuse the cached statistics (no forward)
    grid2 = make_grid([("svd-llm", {}, "ratio", [0.1, 0.3, 0.5]), ("rtn", {"bits": 4}, "group", [48])])
    seen.clear()
    r2 = sweep(stories, grid2, tmp_path / "sw", eval_spec=PPL, calib=calib, data_dir=DATA_DIR, cache_root=cache,
               on_point=lambda row, k, n: seen.append(row["label"]))
    assert seen == ["svd-llm:ratio=0.5", "rtn:bits=4,group=48"]
    assert calls["n"] == 1
    statuses = {r["label"]: r["status"] for r in r2.rows}
    assert statuses["rtn:bits=4,group=48"] == "failed" and statuses["svd-llm:ratio=0.5"] == "ok"
    for f in ("sweep.csv", "sweep.md", "sweep.png", "dense.json"):
        assert (tmp_path / "sw" / f).is_file()
    assert "failed: rtn: model.layers.0.self_attn.q_proj" in (tmp_path / "sw" / "sweep.md").read_text()


def test_incomplete_and_newer_checkpoints_are_refused(stories, tmp_path: Path) -> None:  # type: ignore[no-untyped-def]
    from compress.checkpoint import save_checkpoint

    model, tok = stories
    m = __import__("copy").deepcopy(model)
    compress(m, ["svd:ratio=0.2"])
    save_checkpoint(m, tok, tmp_path, {})
    (tmp_path / "model.safetensors").unlink()
    with pytest.raises(CompressError, match="incomplete: weight file 'model.safetensors' is missing"):
        load(tmp_path)
    manifest = json.loads((tmp_path / "manifest.json").read_text())
    manifest["format_version"] = 99
    (tmp_path / "manifest.json").write_text(json.dumps(manifest))
    with pytest.raises(CompressError, match="format version 99, newer"):
        load(tmp_path)


@pytest.mark.slow
def test_dense_export_runs_in_stock_lm_eval_cli(tmp_path: Path) -> None:
    from compress import run
    from compress.eval.harness import render_tasks_dir

    out = tmp_path / "x"
    run(STORIES, ["svd:ratio=0.2"], out, export=("dense",), device="cpu")
    include = render_tasks_dir(DATA_DIR / "lm_eval_tasks", DATA_DIR)
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "HF_DATASETS_OFFLINE": "1"}
    p = subprocess.run(
        [sys.executable, "-m", "lm_eval", "--model", "hf", "--model_args", f"pretrained={out / 'dense'},dtype=float32",
         "--tasks", "arc_easy_offline", "--include_path", str(include), "--limit", "4", "--device", "cpu", "--batch_size", "4"],
        capture_output=True, text=True, env=env, timeout=600,
    )
    assert p.returncode == 0, p.stderr[-2000:]
    assert "arc_easy_offline" in p.stdout and "acc" in p.stdout
