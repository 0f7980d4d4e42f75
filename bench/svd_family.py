"""Benchmark of the low-rank family on SmolLM2-135M with the project's benchmark protocol.

    python bench/svd_family.py --model ../shared/models/smollm2-135m-instruct-q4_1-gguf --data-dir ../shared/data

Rows: dense, then svd / asvd / svd-llm / lord at each ratio: token-level WikiText-2 perplexity
(first N 2048-token windows), parameters, compression seconds and those seconds as a ratio of one
dense forward pass over the calibration set measured in the same run.
"""

from __future__ import annotations

import argparse
import copy
from pathlib import Path

from common import PROTOCOL, Bench


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
    cols = ["method", "ratio", "ppl", "params", "target_ratio", "bits_per_weight", "seconds", "seconds_vs_forward"]
    bench = Bench(args.model, args.data_dir, Path(args.out), protocol, cols)
    for ratio in [float(r) for r in args.ratios.split(",")]:
        for method in args.methods.split(","):
            bench.row(method, [f"{method}:ratio={ratio}"], {"ratio": ratio})
    bench.results.write_markdown("Low-rank family on SmolLM2-135M-Instruct", [
        "ppl: token-level WikiText-2 test perplexity over the first windows of 2048 tokens (see protocol).",
        "params: all distinct parameters of the model (tied embedding counted once).",
        "bits_per_weight: stored bits of the target linears per original target weight, fp32 checkpoint.",
        "seconds_vs_forward: compression time / one dense fp32 forward over the 32x512 calibration tokens, same run.",
    ])


if __name__ == "__main__":
    main()
