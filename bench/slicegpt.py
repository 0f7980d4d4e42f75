"""Benchmark of SliceGPT on SmolLM2-135M with the project's benchmark protocol, against SVD-LLM at
the same total parameter count.

    python bench/slicegpt.py --model ../shared/models/smollm2-135m-instruct-q4_1-gguf --data-dir ../shared/data

Rows: dense; SliceGPT at sparsity 0.1 / 0.2 / 0.25 / 0.3 (fraction of the hidden dimension removed,
the paper's definition; a sparsity that would make the model larger is refused and recorded as such);
SliceGPT with the paper's embedding-only basis for the tied embedding/head; then for each, SVD-LLM with the ratio that removes the same number of
parameters from the decoder linears (SVD-LLM leaves the tied embedding alone), so both rows have the
same total parameter count (shortcut matrices and the tied head's mixing matrix counted).
"""

from __future__ import annotations

import json
from pathlib import Path

from common import Bench, parser, protocol_for


def main() -> None:
    ap = parser(__doc__, "slicegpt", rows=False)
    ap.add_argument("--sparsities", default="0.1,0.2,0.25,0.3")
    ap.add_argument("--match", default="0.1,0.2,0.25,0.3", help="sparsities that get an equal-parameter SVD-LLM row ('' for none)")
    ap.add_argument("--variants", default="0.25:tied_basis=embedding",
                    help="extra SliceGPT rows, 'sparsity:options' separated by ';' (default: the paper's embedding-only basis for the tied head)")
    ap.add_argument("--append", action="store_true", help="add the rows to the existing result file of the same protocol")
    args = ap.parse_args()
    protocol = protocol_for(args)
    cols = ["method", "options", "ppl", "params", "params_removed", "hidden", "seconds", "seconds_vs_forward"]
    bench = Bench(args.model, args.data_dir, Path(args.out), protocol, cols, append=args.append)
    dense = bench.results.data["rows"][0]["params"]
    from torch import nn

    from compress.adapters import get_adapter

    layers = get_adapter(bench.model).layers(bench.model)
    linear_params = sum(m.weight.numel() for m in layers.modules() if isinstance(m, nn.Linear))
    bench.results.data["decoder_linear_params"] = linear_params
    removed: dict[float, int] = {}
    for s in (float(x) for x in args.sparsities.split(",")):
        row = bench.row("slicegpt", [f"slicegpt:sparsity={s}"], {"options": f"sparsity={s}"},
                        extra=lambda rep: {"hidden": rep.records[0].info.get("hidden", "")})
        if "params" in row:
            removed[s] = dense - row["params"]
            row["params_removed"] = round(removed[s] / dense, 4)
    for v in filter(None, args.variants.split(";")):
        sp, opts = v.split(":", 1)
        bench.row("slicegpt", [f"slicegpt:sparsity={sp},{opts}"], {"options": f"sparsity={sp},{opts}"},
                  extra=lambda rep: {"hidden": rep.records[0].info.get("hidden", "")})
    match = {float(x) for x in args.match.split(",") if x}
    for s, n in removed.items():
        if s in match:
            ratio = round(n / linear_params, 4)
            row = bench.row("svd-llm", [f"svd-llm:ratio={ratio}"], {"options": f"ratio={ratio} (= slicegpt {s} parameters)"})
            if "params" in row:
                row["params_removed"] = round((dense - row["params"]) / dense, 4)
    # the derived params_removed columns were added after each row was written: write the files again
    bench.results.path.with_suffix(".json").write_text(json.dumps(bench.results.data, indent=2) + "\n")
    bench.results.write_markdown("SliceGPT on SmolLM2-135M-Instruct, and SVD-LLM at equal parameters", [
        "ppl: token-level WikiText-2 test perplexity, first windows of 2048 tokens (see protocol).",
        "params: all parameters of the model (tied embedding/head once, shortcut and mixing matrices included).",
        "params_removed: fraction of the dense model's parameters removed. hidden: the sliced hidden dimension.",
        "SVD-LLM rows remove the same number of parameters from the decoder linears as the SliceGPT row named in options.",
        "SliceGPT rows use the default tied_basis=joint (the tied embedding/head keeps the subspace that both the layer-0 input "
        "and the head's input need); tied_basis=embedding is the paper's choice (layer-0 input PCA only).",
        "A sparsity whose shortcut matrices would add more parameters than slicing removes is refused (listed under rows that did not run).",
    ])


if __name__ == "__main__":
    main()
