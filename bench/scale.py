"""Large-model benchmarks: peak memory and time of streamed runs, data-parallel calibration.

    # peak RSS (measured by the OS: /usr/bin/time -v) and wall time of one `compress run`
    python bench/scale.py rss --model /work/scale/llama3-8b --pass rtn:bits=4,group=128 --label "8B rtn w4 g128"
    python bench/scale.py rss --model /work/scale/llama3-8b --pass gptq:bits=4,group=128 --calib-samples 16 --data-dir ../shared/data
    python bench/scale.py rss ... --no-stream          # the whole model loaded (the loader before streaming)

    # SmolLM2: 1 process vs 2 gloo processes (perplexity, the all-reduced Gram matrices, wall time)
    python bench/scale.py dp --model ../shared/models/smollm2-135m-instruct-q4_1-gguf --data-dir ../shared/data

Rows go to bench/results/scale.json (+ .md), appended per measurement; the synthetic checkpoints
come from bench/make_synthetic_llama.py.
"""

from __future__ import annotations

import argparse
import json
import os
import re
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import torch

RESULTS = Path(__file__).parent / "results" / "scale"
GRAM_LAYERS = (0, 15, 29)
GRAM_LINEARS = ("self_attn.q_proj", "mlp.down_proj")


def _device() -> str:
    import platform

    return f"CPU ({platform.processor() or platform.machine()}, {os.cpu_count()} cores, {os.sysconf('SC_PAGE_SIZE') * os.sysconf('SC_PHYS_PAGES') / 1024**3:.0f} GiB)"


def _load() -> dict[str, Any]:
    p = RESULTS.with_suffix(".json")
    if p.is_file():
        return json.loads(p.read_text())
    return {"protocol": {"rss": "peak resident set size of the whole `compress run` process as reported by /usr/bin/time -v "
                         "(Maximum resident set size); wall time of the same run",
                         "dp": "SmolLM2-135M GGUF->fp32, gptq W4 g64, calibration 32 x 512 C4 seed 0 batch 8, WikiText-2 token-level "
                               "perplexity over the first 16 non-overlapping 2048-token windows; 1 process vs torchrun 2 gloo processes"},
            "device": _device(), "rows": []}


def _save(doc: dict[str, Any]) -> None:
    RESULTS.parent.mkdir(parents=True, exist_ok=True)
    RESULTS.with_suffix(".json").write_text(json.dumps(doc, indent=2) + "\n")
    lines = ["# Large-model runs", "", f"Device: {doc['device']}", ""]
    for k, v in doc["protocol"].items():
        lines.append(f"- **{k}**: {v}")
    lines += ["", "| method | config | peak RSS (GiB) | seconds | notes |", "|---|---|---|---|---|"]
    for r in doc["rows"]:
        cfg = ", ".join(f"{k}={v}" for k, v in r.get("config", {}).items())
        rss = f"{r['peak_rss_gib']:.2f}" if r.get("peak_rss_gib") is not None else ""
        sec = f"{r['seconds']:.0f}" if r.get("seconds") is not None else ""
        lines.append(f"| {r['method']} | {cfg} | {rss} | {sec} | {r.get('notes', '')} |")
    RESULTS.with_suffix(".md").write_text("\n".join(lines) + "\n")


def _timed(cmd: list[str], env: dict[str, str] | None = None) -> tuple[int, float, float, str]:
    """(exit status, peak RSS GiB, wall seconds, output tail) of ``cmd`` under /usr/bin/time -v."""
    t0 = time.perf_counter()
    p = subprocess.run(["/usr/bin/time", "-v", *cmd], capture_output=True, text=True, env=env)
    wall = time.perf_counter() - t0
    m = re.search(r"Maximum resident set size \(kbytes\): (\d+)", p.stderr)
    rss = int(m.group(1)) / 1024**2 if m else float("nan")
    return p.returncode, rss, wall, (p.stdout + p.stderr)[-3000:]


def cmd_rss(a: argparse.Namespace) -> None:
    out = Path(a.out or tempfile.mkdtemp(prefix="scale-", dir=a.work))
    cmd = ["compress", "run", a.model, "--out", str(out), "--overwrite", "-q", "--device", "cpu"]
    for p in a.passes:
        cmd += ["--pass", p]
    if a.calib_samples:
        cmd += ["--calib-samples", str(a.calib_samples), "--calib-seqlen", str(a.calib_seqlen)]
    if a.data_dir:
        cmd += ["--data-dir", a.data_dir]
    if a.no_stream:
        cmd.append("--no-stream")
    rc, rss, wall, tail = _timed(cmd)
    print(tail)
    size = sum(f.stat().st_size for f in out.rglob("*") if f.is_file()) if out.exists() else 0
    row = {"method": a.label or " + ".join(a.passes), "config": {"model": Path(a.model).name, "passes": a.passes,
           "calibration": f"{a.calib_samples}x{a.calib_seqlen}" if a.calib_samples else "none", "loader": "whole" if a.no_stream else "streamed"},
           "peak_rss_gib": rss, "seconds": wall, "exit_status": rc, "checkpoint_gib": size / 1024**3, "notes": a.notes}
    if not a.keep and a.out is None:
        shutil.rmtree(out, ignore_errors=True)
    doc = _load()
    doc["rows"].append(row)
    _save(doc)
    print(json.dumps(row, indent=1))


def _grams(model_dir: str, data_dir: str) -> dict[str, torch.Tensor]:
    """Gram matrices of a few linears over the benchmark calibration set (all-reduced under torchrun)."""
    from compress.adapters import get_adapter
    from compress.calib.data import CalibConfig, calibration_ids
    from compress.models import load_model
    from compress.pipeline import distributed
    from compress.pipeline.profile import profile_statistics

    d, _ = distributed.init(torch.device("cpu"))
    model, tok, _ = load_model(model_dir)
    cfg = CalibConfig()
    ids = calibration_ids(tok, cfg, data_dir)
    if d is not None:
        ids = distributed.shard_batches(ids, cfg.batch_size, d)
    out: dict[str, torch.Tensor] = {}

    def on_layer(i: int, stats: Any) -> None:
        if i in GRAM_LAYERS:
            for n in GRAM_LINEARS:
                out[f"{i}.{n}"] = stats.linears[n].gram.clone()

    profile_statistics(model, get_adapter(model), ids, frozenset({"gram"}), device=torch.device("cpu"), batch_size=cfg.batch_size, on_layer=on_layer,
                       dist=d)
    return out


def cmd_gram_worker(a: argparse.Namespace) -> None:
    grams = _grams(a.model, a.data_dir)
    if int(os.environ.get("RANK", "0")) == 0:
        torch.save(grams, a.save)


def _ppl(out: Path) -> float:
    rep = json.loads((out / "report.json").read_text())
    return next(m["value"] for m in rep["metrics"] if m["name"] == "ppl_wikitext2")


def cmd_dp(a: argparse.Namespace) -> None:
    work = Path(tempfile.mkdtemp(prefix="dp-", dir=a.work))
    env = {**os.environ, "OMP_NUM_THREADS": str(a.threads_per_rank)}
    base = ["run", a.model, "--pass", "gptq:bits=4,group=64,actorder=false,clip=false,sequential=true", "--data-dir", a.data_dir, "--ppl", "wikitext2", "--max-windows", "16",
            "--device", "cpu", "-q", "--overwrite"]
    rows = []
    doc = _load()
    for nproc in (1, 2):
        out = work / f"p{nproc}"
        launcher = [sys.executable, "-m", "compress"] if nproc == 1 else [sys.executable, "-m", "torch.distributed.run", "--nproc-per-node", str(nproc), "-m", "compress"]
        rc, rss, wall, tail = _timed(launcher + base + ["--out", str(out)], env=env if nproc > 1 else None)
        if rc != 0:
            print(tail)
            raise SystemExit(f"{nproc}-process run failed")
        rep = json.loads((out / "report.json").read_text())
        rows.append({"nproc": nproc, "ppl": _ppl(out), "seconds": wall, "compress_seconds": rep["timings"]["compress"], "peak_rss_gib": rss})
    gram_files = []
    for nproc in (1, 2):
        f = work / f"grams{nproc}.pt"
        launcher = [sys.executable] if nproc == 1 else [sys.executable, "-m", "torch.distributed.run", "--nproc-per-node", "2"]
        p = subprocess.run(launcher + [__file__, "gram-worker", "--model", a.model, "--data-dir", a.data_dir, "--save", str(f)],
                           capture_output=True, text=True, env=env if nproc > 1 else None)
        if p.returncode != 0:
            print(p.stderr[-3000:])
            raise SystemExit("gram worker failed")
        gram_files.append(torch.load(f))
    rel = max(float((gram_files[0][k] - gram_files[1][k]).abs().max() / gram_files[0][k].abs().max()) for k in gram_files[0])
    one, two = rows
    note = (f"ppl 1 proc {one['ppl']:.4f} vs 2 procs {two['ppl']:.4f} (rel. diff {abs(two['ppl'] - one['ppl']) / one['ppl']:.2e}); "
            f"Gram max rel. diff {rel:.2e} over layers {GRAM_LAYERS} x {GRAM_LINEARS}; compress time 2 procs / 1 proc "
            f"{two['compress_seconds'] / one['compress_seconds']:.2f}")
    for r in rows:
        doc["rows"].append({"method": f"gptq w4 g64, {r['nproc']} process{'es' if r['nproc'] > 1 else ''}",
                            "config": {"model": Path(a.model).name, "processes": r["nproc"], "threads_per_process": a.threads_per_rank if r["nproc"] > 1 else "all"},
                            "ppl": r["ppl"], "peak_rss_gib": r["peak_rss_gib"], "seconds": r["seconds"], "compress_seconds": r["compress_seconds"],
                            "gram_max_rel_diff": rel, "notes": note})
    _save(doc)
    print(note)
    shutil.rmtree(work, ignore_errors=True)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = ap.add_subparsers(dest="cmd", required=True)
    r = sub.add_parser("rss")
    r.add_argument("--model", required=True)
    r.add_argument("--pass", dest="passes", action="append", required=True)
    r.add_argument("--calib-samples", type=int, default=0)
    r.add_argument("--calib-seqlen", type=int, default=512)
    r.add_argument("--data-dir")
    r.add_argument("--no-stream", action="store_true")
    r.add_argument("--label", default="")
    r.add_argument("--notes", default="")
    r.add_argument("--out", help="keep the checkpoint here (default: a temporary folder, removed)")
    r.add_argument("--keep", action="store_true")
    r.add_argument("--work", default=None, help="folder for temporary outputs")
    d = sub.add_parser("dp")
    d.add_argument("--model", required=True)
    d.add_argument("--data-dir", required=True)
    d.add_argument("--threads-per-rank", type=int, default=1)
    d.add_argument("--work", default=None)
    g = sub.add_parser("gram-worker")
    g.add_argument("--model", required=True)
    g.add_argument("--data-dir", required=True)
    g.add_argument("--save", required=True)
    a = ap.parse_args()
    {"rss": cmd_rss, "dp": cmd_dp, "gram-worker": cmd_gram_worker}[a.cmd](a)


if __name__ == "__main__":
    main()
