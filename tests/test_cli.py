"""The command line: bad inputs give one line and exit 2, never a traceback or a half-written output."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from .conftest import DATA_DIR, STORIES, needs


def _run(*args: str, cwd: Path | None = None, env_extra: dict[str, str] | None = None) -> subprocess.CompletedProcess[str]:
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "COLUMNS": "200", **(env_extra or {})}
    if DATA_DIR.is_dir():
        env["COMPRESS_DATA_DIR"] = str(DATA_DIR)
    return subprocess.run(
        [sys.executable, "-m", "compress.cli.main", *args], capture_output=True, text=True, env=env, cwd=cwd, timeout=600
    )


def _assert_one_line_error(p: subprocess.CompletedProcess[str], match: str) -> None:
    assert p.returncode == 2, (p.stdout, p.stderr)
    assert "Traceback" not in p.stderr
    lines = [line for line in p.stderr.splitlines() if line.strip()]
    err = [line for line in lines if line.startswith("error:")]
    assert len(err) == 1, p.stderr
    assert match in err[0], err[0]


def test_ls_passes() -> None:
    p = _run("ls", "passes")
    assert p.returncode == 0
    for name in ("svd", "asvd", "svd-llm", "lord", "ratio", "fraction of the target linears"):
        assert name in p.stdout


def test_env_reports_kernels() -> None:
    p = _run("env")
    assert p.returncode == 0, p.stderr
    for what in ("torch", "nvcc", "bcq_linear (LUT-GEMM)", "sparse24_linear (2:4)", "PyTorch implementation always available"):
        assert what in p.stdout
    p = _run("env", env_extra={"COMPRESS_KERNELS": "fastest"})
    assert p.returncode == 2 and "COMPRESS_KERNELS='fastest'" in p.stderr and "Traceback" not in p.stderr


@needs(STORIES)
@pytest.mark.parametrize(
    "args,match",
    [
        (["/no/such/model", "--pass", "svd:ratio=0.2"], "does not exist"),
        (["some-org/no-such-model", "--pass", "svd:ratio=0.2"], "hub is unreachable"),
        ([str(STORIES), "--pass", "svdd:ratio=0.2"], "unknown pass 'svdd'"),
        ([str(STORIES), "--pass", "svd:ratio=1.5"], "must be in (0.0, 1.0)"),
        ([str(STORIES), "--pass", "svd:foo=1"], "unknown option(s) foo"),
        ([str(STORIES)], "no passes"),
        ([str(STORIES), "--pass", "svd-llm:ratio=0.2", "--calib-samples", "100000"], "fewer than samples x seqlen"),
    ],
)
def test_bad_inputs(tmp_path: Path, args: list[str], match: str) -> None:
    out = tmp_path / "out"
    p = _run("run", *args, "--out", str(out))
    _assert_one_line_error(p, match)
    assert not out.exists()
    assert not any(tmp_path.iterdir()), "a temporary directory was left behind"


def test_directory_without_model(tmp_path: Path) -> None:
    (tmp_path / "empty").mkdir()
    p = _run("run", str(tmp_path / "empty"), "--pass", "svd", "--out", str(tmp_path / "o"))
    _assert_one_line_error(p, "holds no model")


@needs(STORIES)
def test_existing_output_and_bad_recipe(tmp_path: Path) -> None:
    out = tmp_path / "exists"
    out.mkdir()
    p = _run("run", str(STORIES), "--pass", "svd:ratio=0.2", "--out", str(out))
    _assert_one_line_error(p, "exists; choose another --out or pass --overwrite")
    bad = tmp_path / "bad.yaml"
    bad.write_text("passes: [\n")
    p = _run("run", str(STORIES), "--recipe", str(bad), "--out", str(tmp_path / "o2"))
    _assert_one_line_error(p, "not valid YAML")


@needs(STORIES)
def test_run_eval_export_end_to_end(tmp_path: Path) -> None:
    out = tmp_path / "svdllm"
    p = _run(
        "run", str(STORIES), "--pass", "svd-llm:ratio=0.2", "--out", str(out), "--calib-samples", "8",
        "--calib-seqlen", "128", "--export", "dense", "--ppl", "wikitext2", "--ppl-seqlen", "512", "--max-windows", "2",
    )
    assert p.returncode == 0, p.stderr
    for f in ("manifest.json", "model.safetensors", "config.json", "report.json", "report.md", "recipe.yaml", "dense/model.safetensors"):
        assert (out / f).is_file(), f
    assert "ppl_wikitext2" in p.stderr
    e = _run("eval", str(out), "--seqlen", "512", "--max-windows", "2")
    assert e.returncode == 0, e.stderr
    assert "token-level, wikitext2 test, seqlen 512, 2/" in e.stdout
    d = _run("eval", str(out / "dense"), "--seqlen", "512", "--max-windows", "2")
    # the dense export multiplies the factors out: equal up to float rounding of that product
    assert float(d.stdout.split("=")[1].split()[0]) == pytest.approx(float(e.stdout.split("=")[1].split()[0]), rel=1e-5)
    x = _run("export", str(out), "--out", str(tmp_path / "dense2"))
    assert x.returncode == 0 and (tmp_path / "dense2" / "model.safetensors").is_file()


@needs(STORIES)
def test_quant_run_and_gptq_export_refusal(tmp_path: Path) -> None:
    out = tmp_path / "q"
    p = _run("run", str(STORIES), "--pass", "gptq:bits=4,group=0,dim=ada", "--out", str(out), "--calib-samples", "8", "--calib-seqlen", "128")
    assert p.returncode == 0, p.stderr
    report = (out / "report.md").read_text()
    assert "QuantLinear" in report and "bits per original weight" in report
    # stories260k's 172-wide MLP cannot be packed into GPTQ's 32-bit words at 4 bits: refused, nothing written
    p = _run("export", str(out), "--format", "gptq", "--out", str(tmp_path / "g"))
    _assert_one_line_error(p, "not packable")
    assert not (tmp_path / "g").exists()
    p = _run("run", str(STORIES), "--pass", "bcq:bits=3,group=128", "--out", str(tmp_path / "b"))
    _assert_one_line_error(p, "BCQ group size 128 must divide the input dimension 64")


@needs(STORIES)
def test_modegpt_run_and_speed_against_the_source_model(tmp_path: Path) -> None:
    out = tmp_path / "mdg"
    p = _run("run", str(STORIES), "--pass", "modegpt:ratio=0.25", "--out", str(out), "--calib-samples", "8", "--calib-seqlen", "128",
             "--export", "dense")
    _assert_one_line_error(p, "--export dense is not possible after modegpt: MoDeGPT's attention")
    assert not out.exists()
    p = _run("run", str(STORIES), "--pass", "modegpt:ratio=0.25", "--out", str(out), "--calib-samples", "8", "--calib-seqlen", "128")
    assert p.returncode == 0, p.stderr
    assert "MoDeGPT: ratio 0.25 requested, allocation global" in " ".join(p.stderr.split())
    e = _run("eval", str(out), "--ppl", "wikitext2", "--seqlen", "128", "--max-windows", "1", "--speed", "--speed-prompt", "16", "--speed-new", "4")
    assert e.returncode == 0, e.stderr
    lines = {line.split(":")[0]: line for line in e.stdout.splitlines() if line.startswith("speed_")}
    for name in ("speed_prefill", "speed_decode"):
        assert "tokens/s  (dense " in lines[name] and "x)" in lines[name] and "prompt 16, 4 decode steps" in lines[name]
    # the source model moved away: one line naming it and the flag that fixes it
    m = json.loads((out / "manifest.json").read_text())
    m["source"]["source"] = str(tmp_path / "gone")
    (out / "manifest.json").write_text(json.dumps(m))
    _assert_one_line_error(_run("eval", str(out), "--speed"), "which is not on this machine; pass --speed-baseline DIR")
    _assert_one_line_error(_run("eval", str(out), "--speed", "--speed-new", "0"), "--speed-prompt and --speed-new must be positive")
    n = _run("eval", str(out), "--ppl", "wikitext2", "--seqlen", "128", "--max-windows", "1", "--speed", "--speed-baseline", "none",
             "--speed-prompt", "8", "--speed-new", "2")
    assert n.returncode == 0 and "speed_decode:" in n.stdout and "(dense" not in n.stdout, n.stderr
