"""A run is planned once: ``plan()`` builds each pass object once, reads each calibration corpus once,
runs every check before any compute (without side effects on the passes), and holds the per-target
assignment that ``compress run --dry-run`` prints. Errors name the option as the command spells it."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest
import torch

from compress import CalibConfig, EvalSpec, plan, run
from compress.errors import CompressError, ConfigError
from compress.passes.base import Pass

from .conftest import DATA_DIR, STORIES, make_tiny, needs

pytestmark = needs(STORIES)
CALIB = CalibConfig(samples=4, seqlen=64, batch_size=2)


@pytest.fixture
def counts(monkeypatch: pytest.MonkeyPatch) -> dict[str, Any]:
    """Calls of the pass constructors (per pass) and of the corpus reader (per source and split)."""
    import compress.calib.data as data
    import compress.planning.build as build

    seen: dict[str, Any] = {"passes": {}, "corpus": {}}
    init = Pass.__init__

    def counting_init(self: Pass[Any], config: Any) -> None:
        seen["passes"][self.name] = seen["passes"].get(self.name, 0) + 1
        init(self, config)

    real = data.load_documents

    def counting_reader(source: str, split: str = "train", data_dir: Any = None) -> list[str]:
        key = (Path(source).name, split)
        seen["corpus"][key] = seen["corpus"].get(key, 0) + 1
        return real(source, split, data_dir)

    monkeypatch.setattr(Pass, "__init__", counting_init)
    monkeypatch.setattr(data, "load_documents", counting_reader)
    monkeypatch.setattr(build, "load_documents", counting_reader)
    return seen


@pytest.mark.parametrize("stream", ["on", "off"])
def test_a_run_builds_each_pass_once_and_reads_each_corpus_once(stream: str, counts: dict[str, Any], tmp_path: Path) -> None:
    """Streamed and whole-model runs, with the dense baseline and an evaluation: the recipe's passes
    are built once each, the calibration corpus and eora's own corpus are read once each."""
    spec = EvalSpec(ppl=("wikitext2",), ppl_seqlen=256, max_windows=1)
    task_text = tmp_path / "task.txt"
    task_text.write_text((DATA_DIR / "wikitext-2-raw" / "wiki.test.raw").read_text()[:200_000])
    run(STORIES, ["gptq:bits=4,group=0", f"eora:rank=4,calib={task_text}"], tmp_path / "o", calib=CALIB, data_dir=DATA_DIR, stream=stream,
        eval_spec=spec, baseline=True)
    assert counts["passes"] == {"gptq": 1, "eora": 1}
    assert counts["corpus"][("c4", "train")] == 1 and counts["corpus"][("task.txt", "train")] == 1
    assert {k for k in counts["corpus"] if k[1] == "train"} == {("c4", "train"), ("task.txt", "train")}


def test_a_model_level_recipe_and_the_in_memory_verb_plan_once(counts: dict[str, Any], calib_ids: torch.Tensor) -> None:
    from compress import compress

    compress(make_tiny("llama"), ["modegpt:ratio=0.3,allocate=uniform", "gptq:bits=4,group=8"], calib_ids)
    assert counts["passes"] == {"modegpt": 1, "gptq": 1}
    assert counts["corpus"] == {}  # token ids given: nothing to read


def test_checks_have_no_side_effects_and_the_plan_holds_what_they_decided(calib_ids: torch.Tensor) -> None:
    """modegpt's global allocation avoids widths the later gptq refuses: planning records them in the
    pass's PassPlan (not on the pass), and the same plan twice gives the same decision."""
    model = make_tiny("llama")
    p1 = plan(model, ["modegpt:ratio=0.3,allocate=knapsack", "gptq:bits=4,group=16"], calib=calib_ids)
    p2 = plan(model, ["modegpt:ratio=0.3,allocate=knapsack", "gptq:bits=4,group=16"], calib=calib_ids)
    assert p1.pass_plans[0].refused and p1.pass_plans[0].refused == p2.pass_plans[0].refused
    assert not hasattr(p1.passes[0], "_refused") or not p1.passes[0]._refused  # type: ignore[attr-defined]
    assert p1.pass_plans[1].before == (p1.passes[0],) and p1.pass_plans[0].later == (p1.passes[1],)


def test_the_plan_assigns_every_target_its_passes_and_bits(calib_ids: torch.Tensor) -> None:
    model = make_tiny("qwen2")
    p = plan(model, ["sparsegpt:sparsity=0.5,targets=mlp.*", "gptq:bits=4,group=16"], calib=calib_ids)
    by_name = {t.name: t for t in p.targets}
    assert len(by_name) == 14  # 7 linears x 2 layers
    down = by_name["model.layers.1.mlp.down_proj"]
    assert [p.passes[s.pass_index].name for s in down.steps] == ["sparsegpt", "gptq"]
    q = by_name["model.layers.0.self_attn.q_proj"]
    assert [p.passes[s.pass_index].name for s in q.steps] == ["gptq"]
    assert q.steps[-1].bits is not None and q.steps[-1].bits < q.dense_bits / 4
    lines = p.describe()
    assert any("mlp.down_proj" in line and "sparsegpt:pattern=unstructured,sparsity=0.5,targets=mlp.* -> Linear; gptq:group=16 -> QuantLinear"
               in line for line in lines), lines


def _cli(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-m", "compress", *args], capture_output=True, text=True, timeout=600,
                          env={**__import__("os").environ, "COMPRESS_DATA_DIR": str(DATA_DIR)})


def test_dry_run_prints_the_plan_and_writes_nothing(tmp_path: Path) -> None:
    out = tmp_path / "o"
    r = _cli("run", str(STORIES), "--pass", "gptq:bits=3,group=0", "--out", str(out), "--calib-samples", "4", "--calib-seqlen", "64", "--dry-run")
    assert r.returncode == 0, r.stderr
    assert "targets (layers | module | shape" in r.stdout and "layers 0-4 | self_attn.q_proj | 64x64 |" in r.stdout
    assert "gptq:bits=3,group=0 -> QuantLinear" in r.stdout and "calibration: 4 x 64 tokens from c4" in r.stdout
    assert not out.exists() and not (tmp_path / "o.partial").exists()


@pytest.mark.parametrize(("args", "named"), [
    (["run", "--eval", "ppl=wikitext2;batch_size=0"], "--eval batch_size= must be in [1, inf], got 0"),
    (["run", "--ppl", "wikitext2", "--eval-batch-size", "0"], "--eval-batch-size must be in [1, inf], got 0"),
    (["run", "--calib-samples", "0"], "--calib-samples must be in [1, inf], got 0"),
    (["run", "--ppl", "wikitext2", "--max-windows", "x"], "--max-windows: expected an integer, got 'x'"),
    (["eval", "--batch-size", "0"], "--batch-size must be in [1, inf], got 0"),
    (["eval", "--tasks", "arc_easy", "--limit", "-1"], "--limit must be in (0.0, inf], got -1.0"),
])
def test_errors_name_the_flag_of_the_command_they_came_from(args: list[str], named: str, tmp_path: Path) -> None:
    if args[0] == "run":
        full = ["run", str(STORIES), "--pass", "rtn:bits=4,group=0", "--out", str(tmp_path / "o"), *args[1:]]
    else:
        full = ["eval", str(STORIES), *args[1:]]
    r = _cli(*full)
    assert r.returncode == 2, (r.stdout, r.stderr)
    assert named in " ".join(r.stderr.split()), r.stderr
    assert "Traceback" not in r.stderr


def test_a_recipe_files_calibration_errors_name_its_key(tmp_path: Path) -> None:
    recipe = tmp_path / "r.yaml"
    recipe.write_text("passes:\n  - pass: rtn\n    group: 0\ncalibration:\n  samples: 0\n")
    with pytest.raises(ConfigError, match=r"the recipe's 'calibration: samples' must be in \[1, inf\], got 0"):
        run(STORIES, str(recipe), tmp_path / "o")
    with pytest.raises(CompressError, match="unknown calibration key"):
        plan(make_tiny("llama"), {"passes": [{"pass": "svd"}], "calibration": {"sampels": 4}})


def test_a_calibration_split_that_does_not_exist_is_named_before_anything_is_opened(tmp_path: Path) -> None:
    r = _cli("run", str(STORIES), "--pass", "gptq:bits=4,group=0", "--out", str(tmp_path / "o"), "--calib-split", "validation")
    assert r.returncode == 2 and "Traceback" not in r.stderr
    assert "c4 split 'validation' not found" in " ".join(r.stderr.split()) and not (tmp_path / "o").exists()
