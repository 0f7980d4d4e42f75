"""Benchmark of the pruning passes on SmolLM2-135M with the project's benchmark protocol.

    python bench/sparse.py --model ../shared/models/smollm2-135m-instruct-q4_1-gguf --data-dir ../shared/data

Rows: dense; magnitude, Wanda, SparseGPT at 2:4 and at 50 % unstructured; RIA (rows 8-10) at 2:4 and
50 % unstructured (per layer, the paper's, and per output row); ARMOR 2:4 with block 64
(50 iterations) and block 16 (100 iterations: wrappers of 64·(d_out + d_in) parameters cost 18 % of
this model's linears at block 64, 4.6 % at block 16, close to the paper's 2.4-5 % at 4096 dims). bits_per_weight counts what is stored: for 2:4 the kept values (fp32 here)
and 4 bits of position metadata per group of 4; for ARMOR also the block-diagonal wrappers.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from common import Bench, parser, protocol_for, select

ROWS = [
    ("magnitude", "pattern=2:4"),
    ("wanda", "pattern=2:4"),
    ("sparsegpt", "pattern=2:4"),
    ("magnitude", "sparsity=0.5"),
    ("wanda", "sparsity=0.5"),
    ("sparsegpt", "sparsity=0.5"),
    ("armor", "block=64,iters=50,lr=1e-3"),
    ("armor", "block=16,iters=100,lr=1e-3"),
    ("ria", "pattern=2:4"),
    ("ria", "sparsity=0.5"),
    ("ria", "sparsity=0.5,per_row=true"),
]


def _armor(report: Any) -> dict[str, Any]:
    infos = [r.info for r in report.records if "proxy_loss" in r.info]
    if not infos:
        return {}
    n = len(infos)
    return {
        "proxy_loss_init_mean": sum(i["proxy_loss_init"] for i in infos) / n,
        "proxy_loss_mean": sum(i["proxy_loss"] for i in infos) / n,
        "iterations_mean": sum(i["iterations"] for i in infos) / n,
        "extra_params": sum(i["extra_params"] for i in infos),
    }


def main() -> None:
    ap = parser(__doc__, "sparse", rows=True)
    args = ap.parse_args()
    protocol = protocol_for(args)
    cols = ["method", "options", "ppl", "bits_per_weight", "proxy_loss_init_mean", "proxy_loss_mean", "seconds", "seconds_vs_forward"]
    bench = Bench(args.model, args.data_dir, Path(args.out), protocol, cols, append=args.append)
    rows = select(ROWS, args.only)
    for method, options in rows:
        bench.row(method, [f"{method}:{options}"], {"options": options}, extra=_armor)
    bench.results.write_markdown("Pruning on SmolLM2-135M-Instruct", [
        "ppl: token-level WikiText-2 test perplexity, first windows of 2048 tokens (see protocol).",
        "bits_per_weight: stored bits of the decoder linears per original weight (fp32 values).",
        "proxy_loss: ARMOR's normalized proxy loss, mean over layers, at the NoWag-P start and at the end.",
        "50 % unstructured rows are stored dense (32 bits/weight); the 2:4 rows store values + 2-bit positions.",
    ])


if __name__ == "__main__":
    main()
