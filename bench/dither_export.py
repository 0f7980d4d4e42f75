"""Write an off-grid bf16 export of a model whose weights come from a llama.cpp quantized GGUF.

Both real benchmark models are 4-bit GGUFs (SmolLM2: Q4_1; Qwen2.5-Coder: Q4_K/Q6_K), so every
decoder-linear weight sits on a grid of 32-value blocks along the input. A quantizer run on them sees
that grid, which an original bf16 checkpoint does not have. This script builds the closest stand-in
there is without the original weights: each decoder-linear weight is moved by an independent uniform
offset within its source grid cell, w + u·Δ with u ~ U(−½, ½) and Δ the block's grid step (the
smallest gap between distinct values of the 32-block; 0 where a block holds one value, which stays).
The result is continuous (no two weights share a grid), has the same expected value as the source,
and is saved in bf16 with the tokenizer, in the project's checkpoint layout. Embeddings, norms and biases are
copied unchanged (then everything is rounded to bf16). Q6_K's 16-value sub-blocks make the step
of a 32-block the smaller of its two halves' there. The offset adds the source grid's rounding noise once
more, and that is not small: on SmolLM2 (Q4_1, step ≈ 0.36 × mean |w|) the dense perplexity goes from 24.15
to 33.10 (WikiText-2, first 4 windows of 2048). ``--amplitude`` takes a fraction of the cell instead.
The script prints the dense perplexity before and after on the given protocol, for rows on the export.

    python bench/dither_export.py --model ../shared/models/smollm2-135m-instruct-q4_1-gguf --out DIR [--seed 0]
"""

from __future__ import annotations

import argparse
from pathlib import Path

import torch
from torch import nn

BLOCK = 32


def grid_step(W: torch.Tensor, block: int = BLOCK) -> torch.Tensor:
    """Per-block grid step of W (d_out, d_in) along the input: (d_out, d_in / block)."""
    d_out, d_in = W.shape
    B = W.reshape(d_out, d_in // block, block).sort(dim=-1).values
    gaps = B.diff(dim=-1)
    tol = 1e-4 * B.abs().amax(dim=-1, keepdim=True).clamp_min(1e-30)
    gaps = torch.where(gaps > tol, gaps, torch.full_like(gaps, float("inf")))
    step = gaps.amin(dim=-1)
    return torch.where(torch.isfinite(step), step, torch.zeros_like(step))


def dither_(W: torch.Tensor, gen: torch.Generator, block: int = BLOCK, amplitude: float = 1.0) -> float:
    """Move every weight uniformly within ``amplitude`` of its grid cell, in place; returns the mean step
    over mean |w|."""
    step = grid_step(W, block) * amplitude
    rel = float(step.mean() / W.abs().mean().clamp_min(1e-30))
    u = torch.rand(W.shape, generator=gen, dtype=W.dtype) - 0.5
    W.add_(u * step.repeat_interleave(block, dim=1))
    return rel


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", required=True)
    ap.add_argument("--out", required=True)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--amplitude", type=float, default=1.0, help="fraction of the grid cell the offset spans")
    ap.add_argument("--data-dir", default=None, help="print the dense perplexity before and after (WikiText-2)")
    ap.add_argument("--windows", type=int, default=16)
    args = ap.parse_args()
    if not 0.0 < args.amplitude <= 1.0:
        ap.error(f"--amplitude {args.amplitude}: the offset spans a fraction of one grid cell, in (0, 1]")
    from compress.adapters import get_adapter
    from compress.models import load_model

    model, tok, _ = load_model(args.model, dtype="float32", device="cpu")
    layers = get_adapter(model).layers(model)
    gen = torch.Generator().manual_seed(args.seed)
    linears = [(n, m) for n, m in layers.named_modules() if isinstance(m, nn.Linear) and m.in_features % BLOCK == 0]

    def ppl() -> float:
        from compress.eval.perplexity import perplexity

        return perplexity(model, tok, "wikitext2", seqlen=2048, max_windows=args.windows, data_dir=args.data_dir)["value"]

    before = ppl() if args.data_dir else None
    rel = [dither_(m.weight.data, gen, amplitude=args.amplitude) for _, m in linears]
    with torch.no_grad():  # the export's values, evaluated in float32 as the benchmarks load them
        for p in model.parameters():
            p.copy_(p.to(torch.bfloat16).float())
    after = ppl() if args.data_dir else None
    model.to(torch.bfloat16)
    from compress.checkpoint import save_checkpoint

    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    save_checkpoint(model, tok, out, {"recipe": []})
    print(f"{len(linears)} decoder linears dithered (offset span / mean |w|: {sum(rel) / len(rel):.3f}); bf16 export in {out}")
    if before is not None:
        print(f"dense WikiText-2 perplexity, first {args.windows} windows of 2048: source {before:.4f}, export {after:.4f}")


if __name__ == "__main__":
    main()
