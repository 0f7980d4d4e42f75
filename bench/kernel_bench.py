"""Kernel benchmark (one call on a GPU machine): cuBLAS fp16 dense, PyTorch 2:4, our 2:4 kernel and
our LUT-GEMM at 2/3/4 bits on Llama-7B/70B shapes at decode batch sizes, each against its memory
floor (bytes it must read ÷ the device-to-device copy bandwidth measured in the same run), then an
end-to-end decode of a randomly initialised Llama-2-7B-shaped model, fp16 vs every linear in BCQ
3-bit (milliseconds per token).

    python bench/kernel_bench.py                    # on the GPU machine; writes bench/results/kernels.{json,md}
    python bench/kernel_bench.py --dry-run          # anywhere: tiny shapes through the reference paths (checks the script)

Timing: CUDA events, warm-up first, median of --reps runs, weights rotated among enough copies to
exceed the L2 cache, activations drawn fresh (never zeros).
"""

from __future__ import annotations

import argparse
import json
import math
import statistics
import time
from pathlib import Path
from typing import Any, Callable

import torch
import torch.nn.functional as F

from compress.kernels import ops
from compress.kernels.layout import bcq_kernel_layout
from compress.solvers.packing import pack_signs
from compress.solvers.sparse import nm_mask
from compress.solvers.sparse24 import pack_24

SHAPES = [(4096, 4096), (11008, 4096), (4096, 11008), (8192, 8192), (28672, 8192), (8192, 28672)]  # (out N, in K)
BATCHES = [1, 4, 16]
BITS = [2, 3, 4]
GROUP = 128
L2_ROTATE_BYTES = 256 << 20


#: the kernel preference the op timings run with (the script sets "cuda" on a GPU)
PREFERENCE = ["auto"]

def _timer(dev: str) -> Callable[[Callable[[], Any], int], float]:
    """Median seconds of fn over reps runs (CUDA events on GPU, perf_counter elsewhere)."""
    def run(fn: Callable[[], Any], reps: int) -> float:
        for _ in range(3):
            fn()
        times = []
        for _ in range(reps):
            if dev == "cuda":
                a, b = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
                a.record()
                fn()
                b.record()
                b.synchronize()
                times.append(a.elapsed_time(b) / 1e3)
            else:
                t0 = time.perf_counter()
                fn()
                times.append(time.perf_counter() - t0)
        return statistics.median(times)
    return run


def copy_bandwidth(dev: str, timer: Callable, nbytes: int) -> float:
    """Bytes per second of a device-to-device copy, counting bytes read plus bytes written."""
    src = torch.randint(0, 255, (nbytes,), dtype=torch.uint8, device=dev)
    dst = torch.empty_like(src)
    t = timer(lambda: dst.copy_(src), 20)
    return 2 * nbytes / t


def _rotating(make: Callable[[], Any], nbytes: int) -> Callable[[], Any]:
    copies = [make() for _ in range(min(64, max(1, math.ceil(L2_ROTATE_BYTES / max(nbytes, 1)))))]
    state = {"i": 0}

    def nxt() -> Any:
        state["i"] = (state["i"] + 1) % len(copies)
        return copies[state["i"]]
    return nxt


def bench_shapes(dev: str, shapes: list[tuple[int, int]], batches: list[int], reps: int, bw: float) -> list[dict[str, Any]]:
    timer = _timer(dev)
    dt = torch.float16 if dev == "cuda" else torch.float32
    rows: list[dict[str, Any]] = []
    for n, k in shapes:
        dense_w = _rotating(lambda: torch.randn(n, k, device=dev, dtype=dt) * 0.02, n * k * 2)

        def make24() -> tuple[torch.Tensor, torch.Tensor, Any]:
            W = torch.randn(n, k, device=dev) * 0.02
            W = (W * nm_mask(W.abs(), 2, 4)).to(dt)
            v, m = pack_24(W)
            sw = None
            if dev == "cuda":
                try:
                    from torch.sparse import to_sparse_semi_structured

                    sw = to_sparse_semi_structured(W)
                except Exception:
                    sw = None
            return v, m, sw
        s24 = _rotating(make24, n * k * 9 // 8)
        luts = {}
        for q in BITS:
            def make_lut(q: int = q) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
                signs = torch.rand(q, n, k, device=dev) > 0.5
                return bcq_kernel_layout(pack_signs(signs), (torch.rand(q, n, k // GROUP, device=dev) * 0.01).half(),
                                         torch.randn(n, k // GROUP, device=dev) * 0.01)
            luts[q] = _rotating(make_lut, n * k * q // 8)
        for b in batches:
            xs = [torch.randn(b, k, device=dev, dtype=dt) for _ in range(4)]
            xi = {"i": 0}

            def x() -> torch.Tensor:
                xi["i"] = (xi["i"] + 1) % len(xs)
                return xs[xi["i"]]
            act = (b * k + b * n) * 2
            t_dense = timer(lambda: F.linear(x(), dense_w()), reps)
            row: dict[str, Any] = {"N": n, "K": k, "batch": b, "cublas_fp16_us": t_dense * 1e6,
                                   "cublas_floor_us": (n * k * 2 + act) / bw * 1e6}
            t24 = timer(lambda: ops.sparse24_linear(x(), *s24()[:2], None, PREFERENCE[0]), reps)
            row.update(ours_24_us=t24 * 1e6, ours_24_floor_us=(n * k + n * k // 8 + act) / bw * 1e6, ours_24_speedup=t_dense / t24)
            try:
                if dev != "cuda" or s24()[2] is None:
                    raise RuntimeError("to_sparse_semi_structured unavailable")
                tt = timer(lambda: F.linear(x(), s24()[2]), reps)
                row.update(torch_24_us=tt * 1e6, torch_24_speedup=t_dense / tt)
            except Exception as e:
                row["torch_24_error"] = f"{type(e).__name__}: {str(e)[:120]}"
            for q in BITS:
                if b > ops.LUT_MAX_TOKENS:
                    row[f"lut{q}_us"] = None
                    continue
                tq = timer(lambda q=q: ops.bcq_linear(x(), *luts[q](), k, None, PREFERENCE[0]), reps)
                floor = (n * k * q // 8 + q * n * (k // GROUP) * 2 + n * (k // GROUP) * 4 + act) / bw
                row.update({f"lut{q}_us": tq * 1e6, f"lut{q}_floor_us": floor * 1e6, f"lut{q}_speedup": t_dense / tq,
                            f"lut{q}_floor_speedup": t_dense / floor})
            rows.append(row)
            print(json.dumps({k2: (round(v, 2) if isinstance(v, float) else v) for k2, v in row.items()}), flush=True)
    return rows


def end_to_end(dev: str, dry: bool, tokens: int) -> dict[str, Any]:
    """ms/token of greedy decode, fp16 vs all decoder linears in BCQ 3-bit (random weights)."""
    from transformers import LlamaConfig, LlamaForCausalLM

    from compress.modules.bcq import BCQLinear

    if dry:
        cfg = LlamaConfig(hidden_size=128, intermediate_size=256, num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=4, vocab_size=512)
    else:  # Llama-2-7B shapes
        cfg = LlamaConfig(hidden_size=4096, intermediate_size=11008, num_hidden_layers=32, num_attention_heads=32, num_key_value_heads=32,
                          vocab_size=32000, max_position_embeddings=4096)
    dt = torch.float16 if dev == "cuda" else torch.float32
    with torch.device(dev):
        model = LlamaForCausalLM(cfg).to(dt).eval()

    def decode() -> float:
        ids = torch.randint(0, cfg.vocab_size, (1, 32), device=dev)
        with torch.no_grad():
            out = model(input_ids=ids, use_cache=True)
            past, nxt = out.past_key_values, out.logits[:, -1:].argmax(-1)
            for _ in range(3):  # warm-up
                out = model(input_ids=nxt, past_key_values=past, use_cache=True)
                past, nxt = out.past_key_values, out.logits[:, -1:].argmax(-1)
            if dev == "cuda":
                torch.cuda.synchronize()
            t0 = time.perf_counter()
            for _ in range(tokens):
                out = model(input_ids=nxt, past_key_values=past, use_cache=True)
                past, nxt = out.past_key_values, out.logits[:, -1:].argmax(-1)
            if dev == "cuda":
                torch.cuda.synchronize()
            return (time.perf_counter() - t0) / tokens * 1e3
    t_fp16 = decode()
    for layer in model.model.layers:
        for name, lin in list(layer.named_modules()):
            if isinstance(lin, torch.nn.Linear):
                n, k = lin.out_features, lin.in_features
                mod = BCQLinear(k, n, 3, GROUP, dtype=dt, device=dev)
                with torch.no_grad():
                    mod.planes.copy_(torch.randint(0, 256, mod.planes.shape, dtype=torch.uint8, device=dev))
                    mod.alpha.copy_((torch.rand(mod.alpha.shape, device=dev) * 0.01).half())
                    mod.offset.copy_(torch.randn(mod.offset.shape, device=dev) * 0.001)
                parent, _, child = name.rpartition(".")
                setattr(layer.get_submodule(parent) if parent else layer, child, mod)
    t_bcq = decode()
    return {"config": "Llama-2-7B shapes" if not dry else "tiny (dry run)", "tokens": tokens, "fp16_ms_per_token": t_fp16,
            "bcq3_ms_per_token": t_bcq, "speedup": t_fp16 / t_bcq, "note": "eager HF decode, batch 1, prompt 32, KV cache"}


def write(rows: list[dict[str, Any]], e2e: dict[str, Any], bw: float, dev_name: str, out: Path) -> None:
    data = {"device": dev_name, "torch": torch.__version__, "copy_bandwidth_GBps": bw / 1e9, "group": GROUP, "rows": rows, "end_to_end": e2e,
            "protocol": {"timing": "CUDA events, median", "weights": f"rotated over >= {L2_ROTATE_BYTES >> 20} MiB", "dtype": "float16"}}
    out.with_suffix(".json").write_text(json.dumps(data, indent=2) + "\n")
    cols = ["N", "K", "batch", "cublas_fp16_us", "ours_24_us", "ours_24_speedup", "torch_24_speedup", "lut2_speedup", "lut3_speedup", "lut4_speedup",
            "lut3_floor_speedup"]
    lines = [f"# Kernels on {dev_name}", "", f"Copy bandwidth {bw / 1e9:.0f} GB/s (read + write). Speedups are vs cuBLAS fp16 `F.linear` in the same run;"
             " floors are bytes read ÷ copy bandwidth. Targets: LUT-GEMM 3-bit ≥ 4.5× (70B shapes, batch 1), 4-bit ≥ 3.5×; 2:4 ≥ 1.5× at batch 1-16.", "",
             "| " + " | ".join(cols) + " |", "|" + "---|" * len(cols)]
    for r in rows:
        lines.append("| " + " | ".join("" if r.get(c) is None else f"{r[c]:.2f}" if isinstance(r[c], float) else str(r[c]) for c in cols) + " |")
    lines += ["", f"End to end ({e2e['config']}): fp16 {e2e['fp16_ms_per_token']:.2f} ms/token, BCQ 3-bit {e2e['bcq3_ms_per_token']:.2f} ms/token, "
              f"{e2e['speedup']:.2f}× ({e2e['note']})."]
    out.with_suffix(".md").write_text("\n".join(lines) + "\n")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--dry-run", action="store_true", help="tiny shapes through the reference paths on any device")
    ap.add_argument("--reps", type=int, default=50)
    ap.add_argument("--tokens", type=int, default=64)
    ap.add_argument("--out", default=str(Path(__file__).parent / "results" / "kernels"))
    args = ap.parse_args()
    dev = "cuda" if torch.cuda.is_available() and not args.dry_run else "cpu"
    global L2_ROTATE_BYTES
    if args.dry_run:
        shapes, batches, reps = [(256, 512), (128, 384)], [1, 4, 16], 3
        L2_ROTATE_BYTES = 1 << 20
    else:
        if dev != "cuda":
            raise SystemExit("no CUDA device: run on the GPU machine, or use --dry-run to check the script")
        PREFERENCE[0] = "cuda"  # a kernel that cannot run is an error, not a silent fallback
        shapes, batches, reps = SHAPES, BATCHES, args.reps
    timer = _timer(dev)
    bw = copy_bandwidth(dev, timer, (1 << 30) if dev == "cuda" else (64 << 20))
    dev_name = torch.cuda.get_device_name(0) if dev == "cuda" else "CPU (dry run: reference paths, timings meaningless)"
    print(f"{dev_name}: copy bandwidth {bw / 1e9:.0f} GB/s", flush=True)
    rows = bench_shapes(dev, shapes, batches, reps, bw)
    e2e = end_to_end(dev, args.dry_run, args.tokens if not args.dry_run else 4)  # the modules' own preference: auto
    print(json.dumps(e2e), flush=True)
    out = Path(args.out) if not args.dry_run else Path("/tmp/kernels_dry")
    out.parent.mkdir(parents=True, exist_ok=True)
    write(rows, e2e, bw, dev_name, out)
    print(out.with_suffix(".md").read_text())


if __name__ == "__main__":
    main()
