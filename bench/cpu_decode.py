"""Decode speed of compressed modules on the CPU, opened as a user opens a checkpoint.

    python bench/cpu_decode.py --model ../shared/models/smollm2-135m-instruct-q4_1-gguf --data-dir ../shared/data

Every row is compressed in memory, written as a checkpoint, opened again with ``from_pretrained``
(after ``import compress``, outside compress's own loops: no dense cache) and timed with
``compress.eval.speed`` (batch 1, 256-token random prompt, 32 greedy decode steps, median of 3 after
a warm-up), beside the dense fp32 model in the same run. Speed does not depend on the weights'
values, so each storage format is produced by its fastest pass (RTN for the integer grids, magnitude
for 2:4, plain SVD for low rank; calibration 8 × 128 tokens where a pass needs it); quality rows are
in the other benchmark files.
"""

from __future__ import annotations

import copy
import os
import tempfile
import time
from pathlib import Path
from typing import Any

import torch
from common import Results, parser, protocol_for, select

#: (row, recipe, environment)
ROWS: list[tuple[str, list[str], dict[str, str]]] = [
    ("W4 g64 (int4 CPU matmul)", ["rtn:bits=4,group=64"], {}),
    ("W4 g32 sym (int4 CPU matmul)", ["rtn:bits=4,group=32,sym=true"], {}),
    ("W8 per-channel sym (int8 CPU matmul)", ["rtn:bits=8,group=0,sym=true"], {}),
    ("W4 g64, COMPRESS_KERNELS=torch (dequantize each step)", ["rtn:bits=4,group=64"], {"COMPRESS_KERNELS": "torch"}),
    ("W3 g64 (dequantize each step)", ["rtn:bits=3,group=64"], {}),
    ("W3 g64, COMPRESS_DENSE_CACHE=1", ["rtn:bits=3,group=64"], {"COMPRESS_DENSE_CACHE": "1"}),
    ("Q4_K grid (q4_k / q5_0 fallback)", ["rtn:format=q4_k"], {}),
    ("BCQ 3-bit g64", ["bcq:bits=3,group=64"], {}),
    ("2:4 (magnitude)", ["magnitude:pattern=2:4"], {}),
    ("low rank 0.2 (svd)", ["svd:ratio=0.2"], {}),
    ("dictionary 0.2 (cospadi closed form)", ["cospadi:ratio=0.2,solver=closed-form"], {}),
    ("sliced 25 % (slicegpt)", ["slicegpt:sparsity=0.25"], {}),
]


def kernel_vs_reference(model: Any, tok: Any, data_dir: str, windows: int = 4) -> dict[str, Any]:
    """Perplexity through the bfloat16 CPU kernels and through the exact dequantizing path (the
    protocol's WikiText-2 windows, the first ``windows``)."""
    from compress.eval.perplexity import perplexity

    out: dict[str, Any] = {"ppl_windows": windows}
    for key, env in (("ppl_kernel", {"COMPRESS_DENSE_CACHE": "0"}), ("ppl_reference", {"COMPRESS_KERNELS": "torch"})):
        old = {k: os.environ.get(k) for k in env}
        os.environ.update(env)
        try:
            out[key] = round(perplexity(model, tok, "wikitext2", seqlen=2048, max_windows=windows, data_dir=data_dir)["value"], 4)
        finally:
            for k, v in old.items():
                os.environ.pop(k, None) if v is None else os.environ.__setitem__(k, v)
    return out


def main() -> None:
    ap = parser(__doc__, "cpu_decode")
    args = ap.parse_args()
    from compress import api, compress
    from compress.calib.data import CalibConfig, calibration_ids
    from compress.checkpoint import save_checkpoint
    from compress.eval.speed import generation_speed
    from compress.models import load_model

    protocol = protocol_for(args)
    protocol["calibration"] = {"source": "c4", "samples": 8, "seqlen": 128, "seed": 0, "note": "speed rows only"}
    del protocol["perplexity"]
    protocol["speed"] = {"batch": 1, "prompt_len": 256, "new_tokens": 32, "repeats": 3, "threads": torch.get_num_threads()}
    res = Results(Path(args.out), protocol, ["method", "decode_tok_s", "decode_vs_dense", "prefill_tok_s", "prefill_vs_dense", "disk_mb"],
                  args.append)
    model, tok, _ = load_model(args.model, dtype="float32", device="cpu")
    ids = calibration_ids(tok, CalibConfig(source="c4", samples=8, seqlen=128, seed=0), args.data_dir)
    dense = generation_speed(model)
    res.add({"method": "dense fp32", "config": {}, "decode_tok_s": round(dense["decode_tokens_per_s"], 2),
             "prefill_tok_s": round(dense["prefill_tokens_per_s"], 1), "decode_vs_dense": 1.0, "prefill_vs_dense": 1.0})
    for name, recipe, env in select(ROWS, args.only):
        m = copy.deepcopy(model)
        t0 = time.perf_counter()
        try:
            compress(m, recipe, ids)
        except Exception as e:  # a row that cannot run here is recorded
            res.add({"method": name, "config": {"recipe": recipe}, "error": f"{type(e).__name__}: {e}"})
            continue
        with tempfile.TemporaryDirectory() as d:
            save_checkpoint(m, tok, Path(d), {"recipe": recipe})
            disk = sum(p.stat().st_size for p in Path(d).glob("*.safetensors"))
            del m
            old = {k: os.environ.get(k) for k in env}
            os.environ.update(env)
            try:
                opened, _ = api.load(d)
                sp = generation_speed(opened)
            finally:
                for k, v in old.items():
                    if v is None:
                        os.environ.pop(k, None)
                    else:
                        os.environ[k] = v
            ppl_rows = kernel_vs_reference(opened, tok, args.data_dir) if name.startswith("W4 g64 (int4") else {}
        row: dict[str, Any] = {
            **ppl_rows, "method": name, "config": {"recipe": recipe, "env": env}, "decode_tok_s": round(sp["decode_tokens_per_s"], 2),
            "decode_vs_dense": round(sp["decode_tokens_per_s"] / dense["decode_tokens_per_s"], 3),
            "prefill_tok_s": round(sp["prefill_tokens_per_s"], 1),
            "prefill_vs_dense": round(sp["prefill_tokens_per_s"] / dense["prefill_tokens_per_s"], 3),
            "disk_mb": round(disk / 1e6, 1), "compress_seconds": round(time.perf_counter() - t0, 1),
        }
        res.add(row)
        print(row, flush=True)
    dense2 = generation_speed(model)
    res.data["dense_decode_again"] = round(dense2["decode_tokens_per_s"], 2)
    res.save()
    res.write_markdown("Decode speed on the CPU, checkpoints opened with from_pretrained", [
        "decode_vs_dense: against the dense fp32 model measured at the start of the same run "
        f"(measured again at the end: {res.data['dense_decode_again']} tokens/s).",
        "int4/int8 rows run PyTorch's weight-only CPU matmuls (aten._weight_int4pack_mm_for_cpu, _weight_int8pack_mm) in bfloat16; "
        "the others dequantize their weight at every step unless COMPRESS_DENSE_CACHE=1.",
        "ppl_kernel / ppl_reference (W4 g64 row): WikiText-2 perplexity on the first 4 windows of 2048 through the bfloat16 kernels "
        "and through the exact dequantizing path, same checkpoint.",
    ])


if __name__ == "__main__":
    main()
