"""Benchmark of the quantization passes on SmolLM2-135M with the project's benchmark protocol.

    python bench/quant.py --model ../shared/models/smollm2-135m-instruct-q4_1-gguf --data-dir ../shared/data

Rows: dense; RTN and GPTQ at 4, 3 (and GPTQ 2) bits, group 64, per-OC / per-IC / AdaDim; BCQ 3-bit.
bits_per_weight counts the packed codes, float16 scales and packed zero-points of the decoder
linears per original weight. Note: this model's weights come from a Q4_1 GGUF (4-bit grid, blocks of
32 along the input dimension), which flatters 4-bit per-OC rows; the 3- and 2-bit rows count.
"""

from __future__ import annotations

from collections import Counter
from pathlib import Path
from typing import Any

from common import Bench, parser, protocol_for, select

# the 3-bit rows first: they are the ones that count on this model
ROWS = [
    ("rtn", "bits=3,group=64,dim=oc"),
    ("rtn", "bits=3,group=64,dim=ic"),
    ("gptq", "bits=3,group=64,dim=oc"),
    ("gptq", "bits=3,group=64,dim=ic"),
    ("gptq", "bits=3,group=64,dim=ada"),
    ("rtn", "bits=3,group=64,dim=ada"),
    ("bcq", "bits=3,group=64"),
    ("gptq", "bits=4,group=64,dim=oc"),
    ("rtn", "bits=4,group=64,dim=oc"),
    ("gptq", "bits=2,group=64,dim=oc"),
    ("rtn", "bits=4,group=64,dim=ic"),
    ("gptq", "bits=2,group=64,dim=ic"),
]


def _dims(report: Any) -> dict[str, Any]:
    dims = Counter(r.info.get("dim") for r in report.records if r.info.get("dim"))
    return {"dims": dict(dims)} if dims else {}


def main() -> None:
    ap = parser(__doc__, "quant", rows=True)
    args = ap.parse_args()
    protocol = protocol_for(args)
    cols = ["method", "options", "ppl", "bits_per_weight", "dims", "seconds", "seconds_vs_forward"]
    bench = Bench(args.model, args.data_dir, Path(args.out), protocol, cols, append=args.append)
    rows = select(ROWS, args.only)
    for method, options in rows:
        bench.row(method, [f"{method}:{options}"], {"options": options}, extra=_dims)
    bench.results.write_markdown("Quantization on SmolLM2-135M-Instruct", [
        "ppl: token-level WikiText-2 test perplexity, first windows of 2048 tokens (see protocol).",
        "bits_per_weight: stored bits of the decoder linears (codes + float16 scales + zero-points) per weight.",
        "dims: per-layer grouping chosen (AdaDim) or used.",
        "seconds_vs_forward: compression time / one dense fp32 forward over the 32x512 calibration tokens, same run.",
        "The model's weights sit on a 4-bit grid of 32-blocks along the input dimension (Q4_1 GGUF): 4-bit per-OC is flattered.",
    ])


if __name__ == "__main__":
    main()
