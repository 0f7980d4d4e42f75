"""GPTQ's defaults switched off one at a time, W3 g64, on the model given (issue 30, part 3).

    python bench/gptq_ablation.py --model ../shared/models/smollm2-135m-instruct-q4_1-gguf --data-dir ../shared/data
    python bench/gptq_ablation.py --model ~/.cache/compress-models/qwen2.5-coder-0.5b --data-dir ../shared/data --windows 4 \
        --out bench/results/gptq_ablation_qwen

Every row uses ``propagate=dense`` (the next layer's inputs from the dense layer: one forward per
layer, about 2x faster on the CPU; on SmolLM2 it costs 35.35 -> 37.18 at the defaults), so that the
rows compare the solver's options and nothing else. Rows: the defaults; activation order off;
the clipping search off; both off; both off with static groups (activation order's other half); the
clipping search on the attention linears only and on the MLP linears only (two gptq passes split
by ``targets``: the second observes its linears' inputs after the first quantized the attention).
Then the clipping search alone, without GPTQ: round to nearest with and without it, and with it everywhere
but the MLP's gate and up projections (where on Qwen it loses); and GPTQ's defaults with the search
switched off on those two projections only (three passes: attention, gate/up, down). Last, damping
ten times the default, and each sub-group (q/k/v, o, gate/up, down) observed after the ones before it
in the layer were quantized (``sequential=true``).
"""

from __future__ import annotations

from pathlib import Path

from common import Bench, parser, protocol_for, select

BASE = "gptq:bits=3,group=64,propagate=dense"

RTN = "rtn:bits=3,group=64"
GATE_UP = "mlp.gate_proj|mlp.up_proj"

#: (method, label, recipe)
ROWS: list[tuple[str, str, list[str]]] = [
    ("gptq", "defaults", [BASE]),
    ("gptq", "actorder=false", [f"{BASE},actorder=false"]),
    ("gptq", "clip=false", [f"{BASE},clip=false"]),
    ("gptq", "actorder=false,clip=false", [f"{BASE},actorder=false,clip=false"]),
    ("gptq", "actorder=false,clip=false,static_groups=true", [f"{BASE},actorder=false,clip=false,static_groups=true"]),
    ("gptq", "clip on the MLP only", [f"{BASE},clip=false,targets=self_attn.*", f"{BASE},targets=mlp.*"]),
    ("gptq", "clip on attention only", [f"{BASE},targets=self_attn.*", f"{BASE},clip=false,targets=mlp.*"]),
    ("rtn", "clip=false (plain round to nearest)", [RTN]),
    ("rtn", "clip=true", [f"{RTN},clip=true"]),
    ("rtn", "clip=true except gate/up", [f"{RTN},clip=true,targets=self_attn.*|mlp.down_proj", f"{RTN},targets={GATE_UP}"]),
    ("gptq", "clip except gate/up", [f"{BASE},targets=self_attn.*", f"{BASE},clip=false,targets={GATE_UP}",
                                     f"{BASE},targets=mlp.down_proj"]),
    ("gptq", "damp=0.1", [f"{BASE},damp=0.1"]),
    ("gptq", "sequential=true", [f"{BASE},sequential=true"]),
]

NOTES = [
    "ppl: token-level WikiText-2 test perplexity over the protocol's windows of 2048 tokens (16 on SmolLM2, 4 on Qwen).",
    "Every row: gptq bits=3, group=64, propagate=dense, the other options at their defaults (actorder=true, clip=true with "
    "diag(H) weights, damp=0.01, static_groups=false, sequential=false) unless the row says otherwise.",
    "rtn rows: bits=3, group=64, the default propagate (the clipping search's diag(XᵀX) from the model as quantized so far).",
]


def main() -> None:
    args = parser(__doc__, "gptq_ablation", rows=True).parse_args()
    protocol = protocol_for(args)
    cols = ["method", "options", "ppl", "bits_per_weight", "seconds"]
    bench = Bench(args.model, args.data_dir, Path(args.out), protocol, cols, append=args.append)
    for method, label, recipe in select(ROWS, args.only):
        bench.row(method, recipe, {"options": label, "recipe": recipe})
    bench.results.write_markdown(f"GPTQ W3 g64 ablation on {protocol['model']}", NOTES)


if __name__ == "__main__":
    main()
