"""Size of compressed checkpoints on disk and in memory after plain ``from_pretrained``, by module type.

    python bench/sizes.py --model ../shared/models/smollm2-135m-instruct-q4_1-gguf --data-dir ../shared/data

Rows: dense (the source written as a compress checkpoint of the unchanged model), GPTQ W4 g64,
svd-llm 0.2, SparseGPT 2:4, SliceGPT 0.25. Each row compresses a copy (benchmark calibration),
writes its checkpoint, then opens it in a fresh process with ``AutoModelForCausalLM.from_pretrained``
(after ``import compress``) and measures:
- disk_bytes: the checkpoint's weight files (model*.safetensors);
- tensor_bytes (by module type): bytes of the parameters and buffers the loaded model holds at rest,
  every shared tensor counted once;
- rss_load_mb: the process's resident memory added by from_pretrained (transformers maps the
  safetensors file, so pages count only once they are touched);
- rss_forward_mb / rss_forward_nocache_mb: resident memory added after one 512-token forward with
  the CPU dense-weight cache forced on (COMPRESS_DENSE_CACHE=1) and off (=0, which is also what a
  model opened with from_pretrained does by default: the cache lives only inside compress's own
  calibration and evaluation loops).
No perplexity here (the other benchmark files have it for the same configurations).
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import tempfile
from pathlib import Path
from typing import Any

from common import Bench, parser, protocol_for

ROWS = [
    ("gptq", ["gptq:bits=4,group=64"]),
    ("svd-llm", ["svd-llm:ratio=0.2"]),
    ("sparsegpt", ["sparsegpt:pattern=2:4"]),
    ("slicegpt", ["slicegpt:sparsity=0.25"]),
]

PROBE = r'''
import json, os, sys, resource, torch
torch.set_num_threads(2)
def rss():
    for line in open("/proc/self/status"):
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) * 1024
import compress
from transformers import AutoModelForCausalLM
import transformers.modeling_utils  # noqa: F401  (imports outside the measured window)
base = rss()
m = AutoModelForCausalLM.from_pretrained(sys.argv[1])
loaded = rss()
seen, by_type = set(), {}
for mod in m.modules():
    for t in list(mod._parameters.values()) + list(mod._buffers.values()):
        if t is None or t.untyped_storage().data_ptr() in seen:
            continue
        seen.add(t.untyped_storage().data_ptr())
        k = type(mod).__name__
        by_type[k] = by_type.get(k, 0) + t.numel() * t.element_size()
n = min(512, getattr(m.config, "max_position_embeddings", 512))
ids = torch.randint(0, m.config.vocab_size, (1, n), generator=torch.Generator().manual_seed(0))
with torch.no_grad():
    m(input_ids=ids, use_cache=False)
fwd = rss()
print(json.dumps({"rss_load": loaded - base, "rss_forward": fwd - base, "by_type": by_type}))
'''


def _probe(directory: Path, cache: bool) -> dict[str, Any]:
    env = {**os.environ, "COMPRESS_DENSE_CACHE": "1" if cache else "0"}
    p = subprocess.run([sys.executable, "-c", PROBE, str(directory)], capture_output=True, text=True, env=env, timeout=1800)
    if p.returncode:
        raise RuntimeError(p.stderr[-2000:])
    return json.loads(p.stdout.strip().splitlines()[-1])


def measure(model: Any, tok: Any) -> dict[str, Any]:
    from compress.checkpoint import save_checkpoint

    with tempfile.TemporaryDirectory() as d:
        save_checkpoint(model, tok, Path(d), {})
        disk = sum(f.stat().st_size for f in Path(d).glob("model*.safetensors"))
        on, off = _probe(Path(d), True), _probe(Path(d), False)
    mb = 1024 * 1024
    return {
        "disk_bytes": disk, "tensor_bytes": sum(on["by_type"].values()), "tensor_bytes_by_type": on["by_type"],
        "rss_load_mb": round(on["rss_load"] / mb, 1), "rss_forward_mb": round(on["rss_forward"] / mb, 1),
        "rss_forward_nocache_mb": round(off["rss_forward"] / mb, 1),
    }


NOTES = [
    "disk_bytes: model*.safetensors of the compress checkpoint. tensor_bytes: parameters and buffers of the model "
    "opened with plain from_pretrained (after import compress), shared tensors once.",
    "rss_*_mb: resident memory added in a fresh process by from_pretrained (the file is memory-mapped: pages count "
    "once touched, so rss_load is small for every row), then after one 512-token forward with the CPU dense-weight "
    "cache forced on (COMPRESS_DENSE_CACHE=1) and off (=0; also the default outside compress's own calibration and "
    "evaluation loops). Only QuantLinear keeps a cache (its dequantized weight, built at its first CPU forward "
    "inside such a loop, dropped when the loop returns); on CUDA it is never kept.",
    "The dense row is the unchanged model written the same way (fp32, tied embeddings stored once). The dense row's "
    "ppl comes from the Bench's protocol run; compressed rows carry no ppl here.",
    "by_type_mb: tensor_bytes by the module type that holds them (MiB); the embedding is tied to the LM head and stored once.",
]


def write(results: Any) -> None:
    for r in results.data["rows"]:
        if "tensor_bytes_by_type" in r:
            r["by_type_mb"] = ", ".join(f"{k} {v / 2**20:.1f}" for k, v in r["tensor_bytes_by_type"].items() if v >= 2**20)
    results.save()
    results.write_markdown("Checkpoint size on disk and in memory (SmolLM2-135M-Instruct)", NOTES)


def main() -> None:
    ap = parser(__doc__, "sizes", rows=False)
    args = ap.parse_args()
    protocol = protocol_for(args)
    cols = ["method", "params", "bits_per_weight", "disk_bytes", "tensor_bytes", "by_type_mb", "rss_load_mb", "rss_forward_mb",
            "rss_forward_nocache_mb"]
    bench = Bench(args.model, args.data_dir, Path(args.out), protocol, cols)
    dense = bench.results.data["rows"][0]
    dense.update(measure(bench.model, bench.tok))
    bench.results.save()
    print(dense, flush=True)
    for method, recipe in ROWS:
        bench.row(method, recipe, {"recipe": recipe}, measure=lambda m: measure(m, bench.tok), measure_ppl=False)
    write(bench.results)


if __name__ == "__main__":
    main()
