"""Engine before/after check on SmolLM2-135M with the project's benchmark protocol: the same three
recipes (svd-llm 0.2, gptq 3-bit g64, slicegpt 0.25) must give the same perplexity and bytes on the
restructured engine as on the one before it; wall time is compared as a ratio between the two runs,
each also against its own dense calibration forward.

    python bench/engine_v2.py --model ../shared/models/smollm2-135m-instruct-q4_1-gguf --data-dir ../shared/data \
        --label after --compare bench/results/engine_v2_before.json

Run it once on the code before the change (``--label before --out bench/results/engine_v2_before``),
then on the new code with ``--compare`` pointing at the first file: the markdown table gets the
perplexity change and the time ratio per row.
"""

from __future__ import annotations

import json
from pathlib import Path

from common import Bench, parser, protocol_for

ROWS = [
    ("svd-llm", "svd-llm:ratio=0.2"),
    ("gptq", "gptq:bits=3,group=64,actorder=false,clip=false,sequential=true"),  # the defaults of the measured rows (before 2026-12-03)
    ("slicegpt", "slicegpt:sparsity=0.25"),
]


def main() -> None:
    ap = parser(__doc__, "engine_v2")
    ap.add_argument("--label", default="after", help="which code this run measures (before / after)")
    ap.add_argument("--compare", default="", help="result file of the other run; adds ppl change and time ratio columns")
    args = ap.parse_args()
    protocol = protocol_for(args)
    cols = ["method", "recipe", "ppl", "params", "bytes", "bits_per_weight", "seconds", "seconds_vs_forward"]
    other: dict[str, dict] = {}
    if args.compare:
        prev = json.loads(Path(args.compare).read_text())
        other = {r.get("config", {}).get("recipe", "dense"): r for r in prev["rows"]}
        cols += ["ppl_before", "ppl_change", "bytes_before", "seconds_before", "time_ratio"]
    bench = Bench(args.model, args.data_dir, Path(args.out), protocol, cols, append=args.append)
    bench.results.data["label"] = args.label
    for method, recipe in [ROWS[i] for i in range(len(ROWS))] if not args.only else [ROWS[int(i)] for i in args.only.split(",")]:
        row = bench.row(method, [recipe], {"recipe": recipe}, extra=lambda rep: {"bytes": rep.summary()["model_bytes_after"]})
        ref = other.get(recipe)
        if ref is not None and "ppl" in row and "ppl" in ref:
            row.update(ppl_before=ref["ppl"], ppl_change=round(row["ppl"] / ref["ppl"] - 1, 5), bytes_before=ref.get("bytes"),
                       seconds_before=ref["seconds"], time_ratio=round(row["seconds"] / ref["seconds"], 3))
    bench.results.path.with_suffix(".json").write_text(json.dumps(bench.results.data, indent=2) + "\n")
    bench.results.write_markdown(f"Engine check ({args.label}) on SmolLM2-135M-Instruct", [
        "ppl: token-level WikiText-2 test perplexity, first windows of 2048 tokens (see protocol).",
        "bytes: the whole model as stored (packed codes, scales and factors; tied weights once).",
        "seconds: compression wall time of the row; seconds_vs_forward: the same over one dense forward of the calibration set "
        "measured in the same run. time_ratio: seconds over the other run's seconds for the same recipe (machine and protocol equal).",
    ])


if __name__ == "__main__":
    main()
