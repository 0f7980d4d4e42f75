"""``compress lm-eval``: lm-eval's own CLI with compress checkpoints readable, arguments passed
through; the local task directory is added as lm-eval's --include_path."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from compress.errors import CompressError

from .conftest import DATA_DIR, STORIES, needs

pytestmark = [needs(STORIES), needs(DATA_DIR)]
pytest.importorskip("lm_eval")


def test_local_task_directory_is_added_and_offline_names_resolve() -> None:
    from compress.eval.lm_eval_cli import lm_eval_args

    args = lm_eval_args(["--model", "hf", "--tasks", "arc_easy,piqa", "--limit", "4"], data_dir=DATA_DIR)
    assert args[args.index("--tasks") + 1] == "arc_easy_offline,piqa_offline"
    assert args[-2] == "--include_path" and Path(args[-1]).is_dir()
    given = ["--model", "hf", "--tasks", "arc_easy", "--include_path", "/my/tasks"]
    assert lm_eval_args(given, data_dir=DATA_DIR) == given  # the user's own task directory wins
    assert lm_eval_args(["--help"], data_dir=DATA_DIR) == ["--help"]


def test_without_lm_eval_says_how_to_install(monkeypatch: pytest.MonkeyPatch) -> None:
    import compress.eval.harness as h
    from compress.eval.lm_eval_cli import main

    monkeypatch.setattr(h, "lm_eval_version", lambda: None)
    with pytest.raises(CompressError, match=r"pip install 'compress\[eval\]'"):
        main(["--model", "hf", "--tasks", "arc_easy"])


def test_stock_cli_scores_a_compressed_checkpoint_as_compress_eval_does(tmp_path: Path) -> None:
    from compress import CalibConfig, EvalSpec, evaluate, load, run

    out = tmp_path / "q"
    run(STORIES, ["gptq:bits=4,group=0"], out, device="cpu", calib=CalibConfig(samples=4, seqlen=64), data_dir=DATA_DIR)
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "HF_DATASETS_OFFLINE": "1", "COMPRESS_DATA_DIR": str(DATA_DIR)}
    p = subprocess.run(
        [sys.executable, "-m", "compress", "lm-eval", "--model", "hf", "--model_args", f"pretrained={out},dtype=float32",
         "--tasks", "arc_easy", "--limit", "12", "--device", "cpu", "--batch_size", "4", "--output_path", str(tmp_path / "res")],
        capture_output=True, text=True, env=env, timeout=600,
    )
    assert p.returncode == 0, p.stderr[-3000:]
    found = list((tmp_path / "res").rglob("results_*.json"))
    assert len(found) == 1, found
    stock = json.loads(found[0].read_text())["results"]["arc_easy_offline"]
    model, tok = load(out)
    ours = {m["protocol"]["metric"]: m["value"] for m in evaluate(model, tok, EvalSpec(tasks=("arc_easy",), limit=12, batch_size=4), data_dir=DATA_DIR)}
    assert stock["acc,none"] == pytest.approx(ours["acc"], abs=1e-12)
    assert stock["acc_norm,none"] == pytest.approx(ours["acc_norm"], abs=1e-12)
