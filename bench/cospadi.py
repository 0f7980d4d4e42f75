"""CoSpaDi against SVD-LLM on SmolLM2-135M with the project's benchmark protocol.

    python bench/cospadi.py --model ../shared/models/smollm2-135m-instruct-q4_1-gguf --data-dir ../shared/data [--only 0,3]

Rows (``--only`` picks indices): svd-llm and cospadi's closed form at ratios 0.1–0.4, with global
allocation and a shared dictionary (share=2), K-SVD, and the closed form followed by 4-bit GPTQ;
they run in order of what they answer, since the CPU bounds how many fit in one session. Every row reports perplexity, stored bits per original weight of the targets,
parameters, the model's bytes, seconds and seconds over one dense calibration forward of the same
run. The ratio is the fraction of the targets' stored bits removed (svd-llm: factors; cospadi:
dictionary + values + support), so rows of one ratio are at equal stored size.
"""

from __future__ import annotations

import json
from pathlib import Path

from common import Bench, parser, protocol_for

KSVD = "solver=ksvd,iters={iters}"
CF = "solver=closed-form"


def rows(ksvd_iters: int) -> list[tuple[str, str]]:
    """In the order they run: the rows that answer the most first (CPU time bounds a run)."""
    k = KSVD.format(iters=ksvd_iters)
    return [
        ("svd-llm", "svd-llm:ratio=0.2"),
        ("cospadi-cf", f"cospadi:ratio=0.2,{CF}"),
        ("cospadi-cf-global", f"cospadi:ratio=0.2,{CF},allocate=global"),
        ("cospadi-cf-share2", f"cospadi:ratio=0.2,{CF},share=2"),
        ("svd-llm", "svd-llm:ratio=0.3"),
        ("cospadi-cf", f"cospadi:ratio=0.3,{CF}"),
        ("cospadi-cf+gptq4", f"cospadi:ratio=0.2,{CF}|gptq:bits=4,group=64,actorder=false,clip=false,sequential=true"),
        ("cospadi-ksvd", f"cospadi:ratio=0.2,{k}"),
        ("svd-llm", "svd-llm:ratio=0.1"),
        ("cospadi-cf", f"cospadi:ratio=0.1,{CF}"),
        ("svd-llm", "svd-llm:ratio=0.4"),
        ("cospadi-cf", f"cospadi:ratio=0.4,{CF}"),
        ("cospadi-cf-global", f"cospadi:ratio=0.3,{CF},allocate=global"),
        ("cospadi-cf-share2", f"cospadi:ratio=0.3,{CF},share=2"),
        ("cospadi-ksvd", f"cospadi:ratio=0.3,{k}"),
        ("cospadi-ksvd-global", f"cospadi:ratio=0.2,{k},allocate=global"),
    ]


def main() -> None:
    ap = parser(__doc__, "cospadi")
    ap.add_argument("--ksvd-iters", type=int, default=2, help="K-SVD iterations of the ksvd rows (CPU time bounds them)")
    args = ap.parse_args()
    protocol = protocol_for(args)
    protocol["ratio_definition"] = "fraction of the target linears' stored bits removed (dictionary/factors + values + support)"
    cols = ["method", "recipe", "ppl", "bits_per_weight", "params", "bytes", "seconds", "seconds_vs_forward"]
    bench = Bench(args.model, args.data_dir, Path(args.out), protocol, cols, append=args.append)
    table = rows(args.ksvd_iters)
    pick = table if not args.only else [table[int(i)] for i in args.only.split(",")]
    for method, recipe in pick:
        bench.row(method, recipe.split("|"), {"recipe": recipe}, extra=lambda rep: {"bytes": rep.summary()["model_bytes_after"]})
    bench.results.path.with_suffix(".json").write_text(json.dumps(bench.results.data, indent=2) + "\n")
    bench.results.write_markdown("CoSpaDi vs SVD-LLM on SmolLM2-135M-Instruct", [
        "ppl: token-level WikiText-2 test perplexity, first windows of 2048 tokens (see protocol).",
        "bits_per_weight: stored bits of the target linears per original target weight (fp32 model: dense = 32).",
        "bytes: the whole model as stored; params: all distinct parameters (the support is not a parameter; it is in the bits).",
        "seconds_vs_forward: compression time over one dense forward of the 32x512 calibration set, same run "
        "(a row added with --append is timed against the forward re-measured in its own run).",
        "cospadi-cf: solver=closed-form with its defaults (rho 2.5, refits 4, reselect 4); cospadi-ksvd: K-SVD + OMP (rho 2, init svd) "
        "with the iteration count in its recipe; share2: one dictionary per projection for each pair of layers; global: per-target "
        "ratios by the knapsack.",
    ])


if __name__ == "__main__":
    main()
