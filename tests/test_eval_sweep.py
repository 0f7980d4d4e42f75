"""lm-eval in memory, reports, sweeps (statistics reuse, resume, failures), and bad inputs."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
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
    import compress.pipeline.profile as prof
    import compress.pipeline.sequential as seq
    from compress import CalibConfig
    from compress.sweeps import make_grid

    calls = {"n": 0}
    real = seq.capture_layer0_inputs

    def counting(*a: Any, **k: Any) -> Any:
        calls["n"] += 1
        return real(*a, **k)

    monkeypatch.setattr(seq, "capture_layer0_inputs", counting)
    monkeypatch.setattr(prof, "capture_layer0_inputs", counting)
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


SHARD_GRID = [("svd-llm", {}, "ratio", ["0.1", "0.2"]), ("rtn", {"bits": 4}, "group", [48])]  # as the CLI builds it; rtn fails
SHARD_CALIB = dict(samples=8, seqlen=64)


def _csv_rows(path: Path) -> list[dict[str, Any]]:
    """sweep.csv's rows without the timings (the seconds column, each metric's seconds)."""
    import csv

    with path.open(newline="") as f:
        rows = [{k: v for k, v in r.items() if k != "seconds"} for r in csv.DictReader(f)]
    for r in rows:
        r["metrics"] = [{k: v for k, v in m.items() if k != "seconds"} for m in json.loads(r["metrics"])]
    return rows


def _md_table(path: Path) -> list[str]:
    """The table lines of sweep.md without the seconds column."""
    return [line.rsplit("|", 2)[0] for line in path.read_text().splitlines() if line.startswith("|")]


@pytest.fixture(scope="module")
def unsharded(stories, tmp_path_factory: pytest.TempPathFactory) -> Path:  # type: ignore[no-untyped-def]
    from compress import CalibConfig
    from compress.sweeps import make_grid

    root = tmp_path_factory.mktemp("unsharded")
    sweep(stories, make_grid(SHARD_GRID), root / "sw", eval_spec=PPL, calib=CalibConfig(**SHARD_CALIB), data_dir=DATA_DIR,
          cache_root=root / "cache", device="cpu")
    return root / "sw"


def test_sweep_shards_fill_one_directory_like_an_unsharded_sweep(stories, unsharded: Path, tmp_path: Path) -> None:  # type: ignore[no-untyped-def]
    import shutil

    from compress import CalibConfig
    from compress.sweeps import make_grid

    grid = make_grid(SHARD_GRID)
    out = tmp_path / "sw"
    kw: dict[str, Any] = dict(eval_spec=PPL, calib=CalibConfig(**SHARD_CALIB), data_dir=DATA_DIR, cache_root=tmp_path / "cache", device="cpu")
    ran: list[str] = []
    r1 = sweep(stories, grid, out, shard=(1, 2), on_point=lambda row, k, n: ran.append(row["label"]), **kw)
    assert ran == ["svd-llm:ratio=0.1", "rtn:bits=4,group=48"]  # grid indices 0 and 2
    assert [r["label"] for r in r1.rows] == ran and [r["label"] for r in _csv_rows(out / "sweep.csv")] == ran
    ran.clear()
    r2 = sweep(stories, grid, out, shard=(2, 2), on_point=lambda row, k, n: ran.append(row["label"]), **kw)
    assert ran == ["svd-llm:ratio=0.2"]
    assert [r["label"] for r in r2.rows] == [p.label for p in grid], "the last shard returns (and writes) every point"
    ref = _csv_rows(unsharded / "sweep.csv")
    assert [r["status"] for r in ref] == ["ok", "ok", "failed"]
    assert _csv_rows(out / "sweep.csv") == ref
    assert _md_table(out / "sweep.md") == _md_table(unsharded / "sweep.md")
    dense = [json.loads((d / "dense.json").read_text()) for d in (out, unsharded)]
    assert [m["value"] for m in dense[0]["metrics"]] == [m["value"] for m in dense[1]["metrics"]]
    assert (out / "sweep.png").is_file()
    # resume: a shard whose points are finished runs nothing (a failed point is rerun by its shard)
    ran.clear()
    sweep(stories, grid, out, shard=(2, 2), on_point=lambda row, k, n: ran.append(row["label"]), **kw)
    assert ran == [] and _csv_rows(out / "sweep.csv") == ref
    # more shards than points: an empty shard only rewrites the table
    sweep(stories, grid, out, shard=(7, 7), on_point=lambda row, k, n: ran.append(row["label"]), **kw)
    assert ran == [] and _csv_rows(out / "sweep.csv") == ref
    # a directory from before per-point result files (sweep.csv only) is resumed from its csv
    old = tmp_path / "old"
    old.mkdir()
    for f in ("sweep.csv", "dense.json"):
        shutil.copy(unsharded / f, old / f)
    r3 = sweep(stories, grid[:2], old, on_point=lambda row, k, n: ran.append(row["label"]), **kw)
    assert ran == [] and [r["status"] for r in r3.rows] == ["ok", "ok", "failed"]
    assert _csv_rows(old / "sweep.csv") == ref
    with pytest.raises(CompressError, match=r"shard expects \(i, n\) with 1 <= i <= n"):
        sweep(stories, grid, out, shard=(0, 2), **kw)


def test_concurrent_shard_processes_fill_one_directory(unsharded: Path, tmp_path: Path) -> None:
    """Two `compress sweep --shard i/2` processes started together on one directory: one measures the
    dense model and one profiles the statistics while the other waits; no row is lost."""
    out = tmp_path / "sw"
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "COMPRESS_DATA_DIR": str(DATA_DIR), "COMPRESS_CACHE_DIR": str(tmp_path / "cache")}
    cmd = [sys.executable, "-m", "compress.cli.main", "sweep", str(STORIES), "--pass", "svd-llm", "--ratios", "0.1,0.2",
           "--out", str(out), "--eval", "ppl=wikitext2;ppl_seqlen=512;max_windows=1", "--calib-samples", str(SHARD_CALIB["samples"]),
           "--calib-seqlen", str(SHARD_CALIB["seqlen"]), "--device", "cpu", "--dtype", "float32", "--json"]
    jobs = [subprocess.Popen([*cmd, "--shard", f"{i}/2"], stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env) for i in (1, 2)]
    results = [j.communicate(timeout=600) for j in jobs]
    for j, (stdout, stderr) in zip(jobs, results):
        assert j.returncode == 0, stderr[-3000:]
    ran = [[json.loads(line)["label"] for line in stdout.splitlines() if line.startswith("{")] for stdout, _ in results]
    assert ran == [["svd-llm:ratio=0.1"], ["svd-llm:ratio=0.2"]]
    assert _csv_rows(out / "sweep.csv") == _csv_rows(unsharded / "sweep.csv")[:2]
    assert _md_table(out / "sweep.md") == _md_table(unsharded / "sweep.md")[:-1]
    assert not [p for p in [*out.rglob("*.tmp"), *(tmp_path / "cache").rglob("*.tmp")]], "a temporary file was left behind"


_WRITER = """
import random, sys, time
from pathlib import Path
from compress import EvalSpec, sweeps
from compress.sweeps import store
store._plot = lambda *a, **k: None  # the table, not matplotlib, is under test
table = store._table
store._table = lambda *a: (table(*a), time.sleep(random.uniform(0, 0.02)))[0]  # slow jobs: a gap between reading and writing
i, n, out = int(sys.argv[1]), int(sys.argv[2]), Path(sys.argv[3])
grid = sweeps.make_grid([("svd", {}, "ratio", [round(0.01 * k, 2) for k in range(1, 41)])])
dense = {"params": 1, "metrics": [{"name": "ppl_x", "value": 1.0, "protocol": {}}]}
for p in sweeps.shard_points(grid, (i, n)):
    row = {"label": p.label, "method": p.method, "options": "{}", "status": "ok", "metrics": [{"name": "ppl_x", "value": 2.0}]}
    store._save_row(out, row)
    store._publish(out, grid, dense, {}, "m", EvalSpec(ppl=("x",)), (i, n))
"""


def test_concurrent_writers_never_lose_a_row(tmp_path: Path) -> None:
    """Three processes finishing points as fast as they can on one directory: every sweep.csv a
    reader sees is whole and holds every row the one before it held; the last one has every point,
    once, in grid order; no temporary file is left."""
    import csv

    jobs = [subprocess.Popen([sys.executable, "-c", _WRITER, str(i), "3", str(tmp_path)], stderr=subprocess.PIPE, text=True) for i in (1, 2, 3)]
    seen: list[list[str]] = []
    while any(j.poll() is None for j in jobs):
        if (tmp_path / "sweep.csv").is_file():
            with (tmp_path / "sweep.csv").open(newline="") as f:
                labels = [r["label"] for r in csv.DictReader(f)]
            if not seen or labels != seen[-1]:
                seen.append(labels)
        time.sleep(0.002)
    for j in jobs:
        assert j.wait(timeout=300) == 0, j.stderr.read() if j.stderr else ""
    assert all(set(a) <= set(b) for a, b in zip(seen, seen[1:])), "a job overwrote the table with an older one"
    with (tmp_path / "sweep.csv").open(newline="") as f:
        labels = [r["label"] for r in csv.DictReader(f)]
    assert labels == [f"svd:ratio={round(0.01 * k, 2)}" for k in range(1, 41)]
    assert len([line for line in (tmp_path / "sweep.md").read_text().splitlines() if line.startswith("| svd:")]) == 40
    assert not list(tmp_path.rglob("*.tmp"))


@pytest.mark.parametrize("value", ["3/2", "0/0", "x", "0/2", "1/0", "1.5/2", "-1/2", ""])
def test_bad_shard_is_one_line_error(value: str, tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]) -> None:
    from typer.testing import CliRunner

    from compress.cli.main import app, main

    args = ["sweep", str(STORIES), "--pass", "svd-llm", "--ratios", "0.1", "--out", str(tmp_path / "sw"), "--shard", value]
    r = CliRunner().invoke(app, args)
    assert isinstance(r.exception, CompressError), r.output
    assert str(r.exception) == f"--shard expects i/n with 1 <= i <= n (e.g. --shard 1/2), got '{value}'"
    assert not (tmp_path / "sw").exists(), "checked before anything is loaded or written"
    # through the console entry point: one line on stderr, exit status 2, no traceback
    monkeypatch.setattr(sys, "argv", ["compress", *args])
    with pytest.raises(SystemExit) as e:
        main()
    assert e.value.code == 2
    err = [line for line in capsys.readouterr().err.splitlines() if line.strip()]
    assert len(err) == 1 and err[0].startswith("error: --shard expects i/n") and "Traceback" not in err[0], err


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
