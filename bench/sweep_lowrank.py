"""Sweep of the low-rank family on SmolLM2-135M (benchmark protocol) through ``compress.sweep``.

    python bench/sweep_lowrank.py --model ../shared/models/smollm2-135m-instruct-q4_1-gguf --data-dir ../shared/data

Writes bench/results/sweep_lowrank/{sweep.csv,sweep.md,sweep.png,dense.json} and
bench/results/sweep_lowrank.{json,md}: every point, the one-off profiling time, and the sweep's cost
against separate runs of the same points (each separate run would profile the statistics itself:
n·profile + Σ point time, every term measured here).
"""

from __future__ import annotations

import argparse
import copy
import json
import time
from pathlib import Path

from common import PROTOCOL, Results

from compress import CalibConfig, EvalSpec, sweep
from compress.sweeps import make_grid


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", required=True)
    ap.add_argument("--data-dir", required=True)
    ap.add_argument("--methods", default="svd-llm,asvd,svd,lord")
    ap.add_argument("--ratios", default="0.1,0.2,0.3,0.4")
    ap.add_argument("--windows", type=int, default=PROTOCOL["perplexity"]["windows"])
    ap.add_argument("--out", default=str(Path(__file__).parent / "results" / "sweep_lowrank"))
    args = ap.parse_args()
    protocol = copy.deepcopy(PROTOCOL)
    protocol["perplexity"]["windows"] = args.windows
    protocol["model"] = Path(args.model).name
    protocol["statistics"] = "profiled once on the dense model, reused by every point"
    c = protocol["calibration"]
    ratios = [float(r) for r in args.ratios.split(",")]
    grid = make_grid([(m, {}, "ratio", ratios) for m in args.methods.split(",")])
    t0 = time.perf_counter()
    res = sweep(
        args.model, grid, args.out, eval_spec=EvalSpec(ppl=("wikitext2",), max_windows=args.windows),
        calib=CalibConfig(source="c4", samples=c["samples"], seqlen=c["seqlen"], seed=c["seed"]), data_dir=args.data_dir,
        device="cpu", dtype="float32", on_point=lambda row, k, n: print(k, n, row["label"], row["status"], row.get("metrics"), flush=True),
    )
    total = time.perf_counter() - t0
    profile = res.timings.get("profile", 0.0)
    points = [r for r in res.rows if r["status"] == "ok"]
    point_seconds = sum(float(r["seconds"]) for r in points)
    calibrated = [r for r in points if r["method"] in ("svd-llm", "asvd")]
    separate = point_seconds + profile * len(calibrated)
    # bench/results/sweep_lowrank.{json,md} beside the sweep directory
    out = Results(Path(args.out), protocol, ["method", "ratio", "ppl", "compression", "bits_per_weight", "seconds"])
    out.add({"method": "dense", "config": {}, "ppl": res.dense["metrics"][0]["value"], "params": res.dense["params"]})
    for r in res.rows:
        if r["status"] != "ok":
            out.add({"method": r["method"], "config": json.loads(r["options"]), "error": r.get("error")})
            continue
        out.add({
            "method": r["method"], "config": json.loads(r["options"]), "ratio": json.loads(r["options"])["ratio"],
            "ppl": r["metrics"][0]["value"], "params": int(r["params"]), "compression": float(r["compression"]),
            "bits_per_weight": float(r["bits_per_weight"]), "seconds": float(r["seconds"]),
        })
    out.data["cost"] = {
        "sweep_seconds_total": round(total, 1), "profile_seconds": round(profile, 1),
        "point_seconds_sum": round(point_seconds, 1), "separate_runs_seconds": round(separate, 1),
        "sweep_vs_separate": round((profile + point_seconds) / separate, 3) if separate else None,
        "definition": "separate runs = sum of each point's measured time + one profiling per calibrated point",
    }
    out.path.with_suffix(".json").write_text(json.dumps(out.data, indent=2) + "\n")
    cost = out.data["cost"]
    out.write_markdown("Sweep of the low-rank family on SmolLM2-135M-Instruct", [
        "ppl: token-level WikiText-2 test perplexity, first windows of 2048 tokens (see protocol).",
        "compression: 1 - stored bits / dense bits of the decoder linears (= fraction of parameters removed, fp32).",
        "seconds: compression + evaluation of the point, statistics excluded (profiled once).",
        f"Cost: profiling {cost['profile_seconds']} s once; points {cost['point_seconds_sum']} s; the same points as separate "
        f"runs would take {cost['separate_runs_seconds']} s; sweep/separate = {cost['sweep_vs_separate']}.",
        "Plot: sweep_lowrank/sweep.png.",
    ])


if __name__ == "__main__":
    main()
