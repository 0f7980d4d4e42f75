"""Seconds to compress one decoder layer, per pass, as a multiple of that layer's calibration forward.

    python bench/layer_cost.py                       # every width, every pass
    python bench/layer_cost.py --widths smollm2,qwen0.5b --timeout 900
    python bench/layer_cost.py --widths llama3-8b --passes gptq,wanda --append

Each row runs in its own process: a one-layer Llama-shaped model at the width named (random weights,
std 0.02; vocabulary 512, so the embedding and head cost nothing), 32 × 512 random token ids (the
protocol's calibration size), one timed dense forward over them (batches of the engine's size), then
the pass through ``compress(...)`` on the same ids, timed as a whole: the engine's captures, statistic
forwards and propagation forwards included. The ratio is compression seconds over forward seconds
of the same process. A row that exceeds ``--timeout`` is recorded as a lower bound.

Widths (hidden / MLP / heads / KV heads): SmolLM2-135M 576 / 1536 / 9 / 3, Qwen2.5-0.5B
896 / 4864 / 14 / 2, Llama-3-8B 4096 / 14336 / 32 / 8. Group 64 divides every width.
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

from common import Results

WIDTHS: dict[str, dict[str, int]] = {
    "smollm2": {"hidden_size": 576, "intermediate_size": 1536, "num_attention_heads": 9, "num_key_value_heads": 3},
    "qwen0.5b": {"hidden_size": 896, "intermediate_size": 4864, "num_attention_heads": 14, "num_key_value_heads": 2},
    "llama3-8b": {"hidden_size": 4096, "intermediate_size": 14336, "num_attention_heads": 32, "num_key_value_heads": 8},
}

PASSES: dict[str, list[str]] = {
    "gptq": ["gptq:bits=4,group=64"],
    "awq+gptq": ["awq:samples=8", "gptq:bits=4,group=64"],
    "sparsegpt": ["sparsegpt"],
    "wanda": ["wanda"],
    "svd-llm": ["svd-llm:ratio=0.2"],
    "cospadi closed-form": ["cospadi:ratio=0.2,solver=closed-form"],
    "cospadi ksvd": ["cospadi:ratio=0.2,solver=ksvd"],
    "modegpt": ["modegpt:ratio=0.25"],
    "slicegpt": ["slicegpt:sparsity=0.25"],
    "lq-lora": ["lq-lora:bits=3,group=64,rank=32"],
    "eora": ["gptq:bits=3,group=64", "eora:rank=32"],
    "bcq": ["bcq:bits=3,group=64"],
}

SAMPLES, SEQLEN = 32, 512

TITLE = "Per-layer compression cost at three widths"
NOTES = [
    "x_forward: seconds to compress the layer (the whole compress() call) / seconds of one dense forward of the same layer over "
    "the same 32 x 512 calibration ids, measured in the same process, one job on the CPU (2 threads).",
    "measured_x_gptq: x_forward over the gptq row's at the same width. estimated_x_gptq: the planner's estimate of the same "
    "ratio (compress/planning/cost.py, constants fitted to these rows; a pass estimated above 10x GPTQ on a model is announced "
    "before its first layer, with a faster option).",
    "The smollm2 rows of cospadi closed-form, lq-lora, eora and bcq were re-measured after the cospadi change below (the first "
    "run of lq-lora, eora and bcq shared the CPU with a test run). qwen0.5b cospadi ksvd was stopped by hand after 198 s.",
    "Where the time goes (cProfile, one thread, SmolLM2 layers): cospadi closed form: the coefficient refits by conjugate "
    "gradients (each step an n x k by k x k product; 16 refits per matrix) were 75-80 % of a 4864 x 896 matrix's 163 s; now 4 "
    "CG steps per refit instead of 24 (the relative whitened error within 0.4 %), keep-or-drop errors in float32, and every "
    "sub-group's Gram from one forward of the layer: 11.6 -> 7.2 forwards at the SmolLM2 width, 18.3 at the 0.5B width, "
    "where k = 1163 atoms exceed the 896 inputs of gate/up and the refits grow with n·k². K-SVD: its batched OMP (s steps, "
    "each a k-wide product per row, Python-level per step) is 445 forwards of a 576/1536 layer. BCQ: 15 element-wise "
    "refinement rounds per matrix and the feedback sweeps (2 refits). LQ-LoRA: the alternations (subspace iterations and NF "
    "rounding, about 30) then the GPTQ sweep. GPTQ (whole SmolLM2, bench/results/speed.md): the two layer forwards with "
    "their Gram accumulation, then the column sweep.",
    "8B on paper (32 layers of 4096/14336; one layer is 218 M weights, 14.6x the 0.5B layer): a layer forward over 32 x 512 "
    "tokens is about 57 s on this CPU (the 0.5B forward scaled by weights: 125 GFLOP/s measured). GPTQ: 4-5 forwards per layer "
    "(the estimate, scaled by its measured/estimated ratio at the two smaller widths) is about 4.5 min a layer, 2.3 h for the "
    "model; the others at their 8B estimate times that: wanda about 1 h, sparsegpt 2.3 h, svd-llm 3 h, lq-lora 6 h, bcq 10 h, "
    "cospadi closed form about 24 h, K-SVD years. On one H100 (assumed: bf16 forwards at 200 TFLOP/s effective, float32 and "
    "float64 matmuls at 50 TFLOP/s, GPTQ's column loop launch-bound at 50 us per column, no overlap, weights already on the "
    "device): GPTQ about 2.6 s a layer (the 39 k column steps dominate), 1.5 min for the model; the cospadi closed form about "
    "5-10 s a layer (its refits are large matmuls), 3-5 min; K-SVD's small batched OMP products at 20 TFLOP/s effective about "
    "2 h a layer. These 8B figures are arithmetic, not measurements.",
]


def _one(width: str, recipe: list[str]) -> dict[str, Any]:
    """In the child: build the layer, time its forward, then the compression."""
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    from compress import compress
    from compress.calib.data import CalibConfig

    torch.manual_seed(0)
    cfg = LlamaConfig(vocab_size=512, num_hidden_layers=1, max_position_embeddings=SEQLEN, initializer_range=0.02,
                      tie_word_embeddings=False, **WIDTHS[width])
    model = LlamaForCausalLM(cfg).eval()
    ids = torch.randint(0, 512, (SAMPLES, SEQLEN), generator=torch.Generator().manual_seed(0))
    bs = CalibConfig().batch_size
    t0 = time.perf_counter()
    with torch.no_grad():
        for b in range(0, SAMPLES, bs):
            model(input_ids=ids[b : b + bs], use_cache=False)
    forward = time.perf_counter() - t0
    params = sum(p.numel() for p in model.model.layers[0].parameters())
    t0 = time.perf_counter()
    compress(model, recipe, ids)
    secs = time.perf_counter() - t0
    return {"forward_seconds": round(forward, 2), "seconds": round(secs, 2), "x_forward": round(secs / forward, 2),
            "layer_params": params}


def _estimated_vs_gptq(width: str, recipe: list[str]) -> float | None:
    """The planner's estimate (compress.planning.cost) of the recipe's last pass against GPTQ's, on this width's layer."""
    from compress.planning.cost import FORWARDS
    from compress.recipe import parse_shorthand
    from compress.solvers.gptq import gptq_work

    w = WIDTHS[width]
    h, m, heads, kv = w["hidden_size"], w["intermediate_size"], w["num_attention_heads"], w["num_key_value_heads"]
    hd = h // heads
    shapes = [(heads * hd, h), (kv * hd, h), (kv * hd, h), (h, heads * hd), (m, h), (m, h), (h, m)]
    p = parse_shorthand(recipe[-1]).build()
    tokens = SAMPLES * SEQLEN
    ours = ref = 0.0
    for d_out, d_in in shapes:
        work = p.work(d_out, d_in, tokens)
        if work is None:
            return None
        ours += work + FORWARDS * d_out * d_in * tokens
        ref += gptq_work(d_out, d_in, tokens) + FORWARDS * d_out * d_in * tokens
    return round(ours / ref, 2)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--widths", default=",".join(WIDTHS))
    ap.add_argument("--passes", default=",".join(PASSES), help="comma-separated row names of PASSES")
    ap.add_argument("--timeout", type=float, default=1800.0, help="seconds a row may run before it is recorded as a lower bound")
    ap.add_argument("--out", default=str(Path(__file__).parent / "results" / "layer_cost"))
    ap.add_argument("--append", action="store_true", help="add rows to the existing result file")
    ap.add_argument("--one", nargs=2, metavar=("WIDTH", "PASS"), help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.one:
        print("RESULT " + json.dumps(_one(args.one[0], PASSES[args.one[1]])), flush=True)
        return
    protocol = {"calibration": {"tokens": "random ids", "samples": SAMPLES, "seqlen": SEQLEN}, "model": "one random Llama-shaped layer",
                "unit": "one dense forward of the layer over the calibration ids, same process"}
    cols = ["width", "method", "recipe", "forward_seconds", "seconds", "x_forward", "measured_x_gptq", "estimated_x_gptq", "layer_params"]
    res = Results(Path(args.out), protocol, cols, append=args.append)
    for width in args.widths.split(","):
        for name in args.passes.split(","):
            row: dict[str, Any] = {"width": width, "method": name, "recipe": " + ".join(PASSES[name]),
                                   "estimated_x_gptq": _estimated_vs_gptq(width, PASSES[name]) if len(PASSES[name]) == 1 else None}
            t0 = time.perf_counter()
            try:
                p = subprocess.run([sys.executable, __file__, "--one", width, name], capture_output=True, text=True, timeout=args.timeout)
                line = [ln for ln in p.stdout.splitlines() if ln.startswith("RESULT ")]
                if p.returncode or not line:
                    row["error"] = (p.stderr.strip().splitlines() or ["no output"])[-1]
                else:
                    row.update(json.loads(line[0][7:]))
            except subprocess.TimeoutExpired:
                row["seconds"] = f"> {args.timeout:.0f} (stopped)"
                row["x_forward"] = "see note"
            row["wall_seconds"] = round(time.perf_counter() - t0, 1)
            ref = next((r for r in res.data["rows"] if r["width"] == width and r["method"] == "gptq" and "x_forward" in r), None)
            if ref is not None and isinstance(row.get("x_forward"), float) and isinstance(ref["x_forward"], float):
                row["measured_x_gptq"] = round(row["x_forward"] / ref["x_forward"], 2)
            # a re-measured row replaces the earlier one of the same width and pass
            res.data["rows"] = [r for r in res.data["rows"] if (r["width"], r["method"]) != (width, name)]
            res.add(row)
            print(row, flush=True)
            res.write_markdown(TITLE, NOTES)


if __name__ == "__main__":
    main()
