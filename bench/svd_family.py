"""Benchmark of the low-rank family on SmolLM2-135M with the project's benchmark protocol.

    python bench/svd_family.py --model ../shared/models/smollm2-135m-instruct-q4_1-gguf --data-dir ../shared/data

Rows: dense, then svd / asvd / svd-llm / lord at each ratio: token-level WikiText-2 perplexity
(first N 2048-token windows), parameters, compression seconds and those seconds as a ratio of one
dense forward pass over the calibration set measured in the same run.
"""

from __future__ import annotations

import argparse
import copy
import time
from pathlib import Path

import torch

from common import PROTOCOL, Results

from compress import compress
from compress.calib.data import CalibConfig, calibration_ids
from compress.eval.perplexity import perplexity
from compress.models import count_parameters, load_model


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", required=True)
    ap.add_argument("--data-dir", required=True)
    ap.add_argument("--methods", default="svd,asvd,svd-llm,lord")
    ap.add_argument("--ratios", default="0.1,0.2,0.3")
    ap.add_argument("--windows", type=int, default=PROTOCOL["perplexity"]["windows"])
    ap.add_argument("--out", default=str(Path(__file__).parent / "results" / "svd_family"))
    args = ap.parse_args()

    protocol = copy.deepcopy(PROTOCOL)
    protocol["perplexity"]["windows"] = args.windows
    protocol["model"] = Path(args.model).name
    protocol["ratio_definition"] = "fraction of the decoder linears' parameters removed"
    res = Results(Path(args.out), protocol, ["method", "ratio", "ppl", "params", "target_ratio", "bits_per_weight", "seconds", "seconds_vs_forward"])

    model, tok, _ = load_model(args.model, dtype="float32", device="cpu")
    c = protocol["calibration"]
    cfg = CalibConfig(source="c4", samples=c["samples"], seqlen=c["seqlen"], seed=c["seed"])
    ids = calibration_ids(tok, cfg, args.data_dir)
    t0 = time.perf_counter()
    with torch.no_grad():
        for b in range(0, ids.shape[0], 8):
            model(input_ids=ids[b : b + 8], use_cache=False)
    t_forward = time.perf_counter() - t0

    def ppl(m: torch.nn.Module) -> float:
        return perplexity(m, tok, "wikitext2", seqlen=2048, max_windows=args.windows, data_dir=args.data_dir)["value"]

    dense_params = count_parameters(model)
    t0 = time.perf_counter()
    res.add({"method": "dense", "config": {}, "ppl": ppl(model), "params": dense_params, "target_ratio": 0.0,
             "bits_per_weight": 32.0, "seconds": 0.0, "seconds_vs_forward": 0.0,
             "calib_forward_seconds": t_forward, "ppl_seconds": time.perf_counter() - t0})
    print(res.data["rows"][-1], flush=True)
    for ratio in [float(r) for r in args.ratios.split(",")]:
        for method in args.methods.split(","):
            m = copy.deepcopy(model)
            t0 = time.perf_counter()
            report = compress(m, [f"{method}:ratio={ratio}"], ids)
            secs = time.perf_counter() - t0
            s = report.summary()
            row = {"method": method, "config": {"ratio": ratio}, "ppl": ppl(m), "params": count_parameters(m),
                   "target_ratio": round(s["target_ratio"], 4),
                   "bits_per_weight": round(32.0 * s["target_params_after"] / s["target_params_before"], 3),
                   "seconds": round(secs, 1), "seconds_vs_forward": round(secs / t_forward, 2)}
            res.add(row)
            print(row, flush=True)
            del m
    notes = [
        "ppl: token-level WikiText-2 test perplexity over the first windows of 2048 tokens (see protocol).",
        "params: all distinct parameters of the model (tied embedding counted once).",
        "bits_per_weight: stored bits of the target linears per original target weight, fp32 checkpoint.",
        "seconds_vs_forward: compression time / one dense fp32 forward over the 32x512 calibration tokens, same run.",
    ]
    res.write_markdown("Low-rank family on SmolLM2-135M-Instruct", notes)


if __name__ == "__main__":
    main()
