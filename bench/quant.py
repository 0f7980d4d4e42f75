"""Benchmark of the quantization passes on SmolLM2-135M with the project's benchmark protocol.

    python bench/quant.py --model ../shared/models/smollm2-135m-instruct-q4_1-gguf --data-dir ../shared/data

Rows: dense; GPTQ with its defaults at 3 and 4 bits, group 64, per-OC (and per-IC, AdaDim), the
defaults before 2026-12-03 and activation order without clipping; RTN at 3 and 4 bits; AWQ before
RTN and GPTQ at W4 g64 and before GPTQ at W3 g64 (group 128 does not divide this model's 576-wide
inputs); BCQ 3-bit at group 64, and at group 192 against GPTQ 3-bit g48 (3.42 vs 3.40 bits/weight).
bits_per_weight counts the packed codes, float16 scales and packed zero-points of the decoder
linears per original weight. Note: this model's weights come from a Q4_1 GGUF (4-bit grid, blocks of
32 along the input dimension), which flatters 4-bit per-OC rows; the 3-bit rows count.
"""

from __future__ import annotations

from collections import Counter
from pathlib import Path
from typing import Any

from common import Bench, parser, protocol_for, select

# the 3-bit rows first: they are the ones that count on this model. (method, options, recipe): a
# recipe of None is the pass alone with those options
ROWS: list[tuple[str, str, list[str] | None]] = [
    ("gptq", "bits=3,group=64", None),  # the defaults
    ("gptq", "bits=4,group=64", None),
    ("rtn", "bits=3,group=64", None),
    ("rtn", "bits=4,group=64", None),
    # group 128 does not divide this model's 576 inputs; the scale search on 8 of the 32 sequences (CPU time)
    ("awq+rtn", "bits=4,group=64", ["awq:samples=8", "rtn:bits=4,group=64"]),
    ("awq+gptq", "bits=4,group=64", ["awq:samples=8", "gptq:bits=4,group=64"]),
    ("awq+gptq", "bits=3,group=64", ["awq:samples=8", "gptq:bits=3,group=64"]),
    ("gptq", "bits=3,group=64,actorder=false,clip=false,sequential=true", None),  # the defaults before 2026-12-03
    ("gptq", "bits=3,group=64,clip=false", None),  # activation order alone
    ("gptq", "bits=3,group=64,dim=ic", None),
    ("gptq", "bits=3,group=64,dim=ada", None),
    ("bcq", "bits=3,group=64", None),
    ("bcq", "bits=3,group=192", None),  # 3.42 bits/weight: against gptq 3-bit g48 (3.40)
    ("gptq", "bits=3,group=48", None),
    ("gptq", "bits=3,group=64,propagate=dense", None),  # one forward per layer (next layer on dense outputs)
]


TITLE = "Quantization on SmolLM2-135M-Instruct"
NOTES = [
    "ppl: token-level WikiText-2 test perplexity, first windows of 2048 tokens (see protocol).",
    "bits_per_weight: stored bits of the decoder linears (codes + float16 scales + zero-points) per weight.",
    "dims: per-layer grouping chosen (AdaDim) or used.",
    "seconds_vs_forward: compression time / one dense fp32 forward over the 32x512 calibration tokens, same run.",
    "The model's weights sit on a 4-bit grid of 32-blocks along the input dimension (Q4_1 GGUF): 4-bit per-OC is flattered.",
    "BCQ rows since 2026-12-07: feedback=true (GPTQ's sweep on the BCQ grid under the full Gram, 2 least-squares refits of "
    "(alpha, beta)). Without it (the refinement weighted by diag(XtX) alone): g64 32.88, g192 45.60. Per layer (relative output "
    "error on the calibration Gram, SmolLM2 layers 3/15/27, q/o/up/down), BCQ g192 with feedback sits at 0.86-1.01x GPTQ "
    "3-bit g192's and 1.04-1.24x GPTQ g64's: at 3.4 bits/weight its 80 bits of alpha and beta per group leave it groups of "
    "192, where uniform GPTQ has groups of 48.",
    "Timing caveat: the test suite and other benchmarks shared the 2 cores during parts of these runs, so `seconds` are upper "
    "bounds; bench/results/speed.md has the clean timings.",
    "Each row's config records the defaults its passes ran with (tests/test_bench_defaults.py ties them to the code).",
    "GPTQ defaults since 2026-12-03: actorder=true (static groups), clip=true (diag(XtX)-weighted range shrink per group), "
    "sequential=false (one forward per layer). The row 'actorder=false,clip=false,sequential=true' is the previous defaults.",
    "propagate=dense (one forward per layer; the next layer calibrated on the dense layer's outputs) stays an option: W3 g64 "
    "37.18 against 35.35 with the default (+5.2 %), W4 g64 23.27 against 23.21 (bench/results/speed.md).",
    "AWQ rows: awq:samples=8 runs the scale search's attention/MLP blocks on 8 of the 32 calibration sequences (CPU time); "
    "channel magnitudes and the o/down Gram use all 32. Group 128 does not divide this model's 576-wide inputs, so AWQ is "
    "measured at group 64.",
    "Rows not re-run after 2026-12-07's change of GPTQ's H^-1 path (torch.cholesky_inverse, then one Cholesky of the reversed H "
    "and a triangular inverse: the same factor up to round-off, faster): every gptq row. Round-off moves single codes: W4 g64 "
    "is 23.21 in bench/results/speed.md (run after the change) against 23.17 here. Rows of bench/quant.py not in the table: "
    "the previous defaults (W3 g64 59.84 in an earlier run of this file) and activation order without clipping (42.59, "
    "bench/results/defaults_search.md).",
]


#: title and notes of a run on another model (the SmolLM2 notes above describe that model's rows)
OTHER_MODELS = {
    "qwen2.5-coder-0.5b": ("Quantization on Qwen2.5-Coder-0.5B-Instruct", [
        "ppl: token-level WikiText-2 test perplexity, the first 4 windows of 2048 tokens (the CPU budget of this model).",
        "bits_per_weight: stored bits of the decoder linears (codes + float16 scales + zero-points) per weight.",
        "Model: Qwen2.5-Coder-0.5B-Instruct, Q4_K_M GGUF dequantized to fp32 (../shared/models/qwen2.5-coder-0.5b/fetch.sh): "
        "q/k/v biases, 14 query heads on 2 key-value heads, untied head; its weights sit on llama.cpp's Q4_K/Q6_K grids.",
        "Default GPTQ W3 g64 loses to RTN here (on SmolLM2: 35.35 against 69.88). Per layer it does not: on the dense model's "
        "inputs (layers 1/3/6/12/18/23; q, o, gate, down), GPTQ's relative output error on held-out WikiText-2 text is 1.5-10x "
        "below RTN's, also counting only the tokens after each sequence's first (the first token holds at most 7 % of tr(XtX)); "
        "each default switched off (activation order, clipping) or damp 0.1 stays far below RTN too. The loss is end to end. "
        "Which default: bench/results/gptq_ablation_qwen.md (propagate=dense, same protocol): switching the clipping search off "
        "gives 46.78 (defaults 54.42), off on the MLP linears only 45.14, and activation order matters little (52.68 without); "
        "on SmolLM2 the same search is worth 50.08 -> 37.18 (bench/results/gptq_ablation_smollm2.md), so no single switch "
        "meets issue 30's target on both models and the defaults stay. At W4 g64 default GPTQ loses to RTN as well (41.34 vs 39.63), "
        "and AWQ's scales before GPTQ W3 do not recover it (54.10).",
        "seconds: other benchmarks, statistics captures or the test suite shared the 2 cores during these rows: upper bounds only.",
        "Each row's config records the defaults its passes ran with.",
    ]),
}


def _defaults(recipe: list[str]) -> dict[str, Any]:
    """The options each pass of the recipe takes from its defaults (a test ties them to this file)."""
    from dataclasses import fields

    from compress.registry import get_pass

    out: dict[str, Any] = {}
    for spec in recipe:
        name, _, given = spec.partition(":")
        keys = {kv.split("=")[0] for kv in given.split(",") if kv}
        cls = get_pass(name).config_cls
        out[name] = {f.name: getattr(cls(), f.name) for f in fields(cls) if f.name not in keys and f.name != "targets"}
    return out


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
    for method, options, recipe in rows:
        recipe = recipe or [f"{method}:{options}"]
        bench.row(method, recipe, {"options": options, "recipe": recipe, "defaults": _defaults(recipe)}, extra=_dims)
    title, notes = OTHER_MODELS.get(protocol["model"], (TITLE, NOTES))
    bench.results.write_markdown(title, notes)


if __name__ == "__main__":
    main()
