"""Write a randomly initialised Llama checkpoint of a given shape, in the Hugging Face layout.

Purpose: benchmark compression at real model sizes (memory, time, kernels) without downloading weights.
The output directory holds config.json, generation_config.json, sharded safetensors
(model-0000i-of-0000N.safetensors + model.safetensors.index.json) and the tokenizer of
/work/shared/models/stories260k (vocab 512 < the model's vocab, so token ids stay in range).
The numbers are meaningless (perplexity ≈ vocab size); only shapes, dtypes and finiteness matter.

Low memory: the shard plan is computed from the shapes first, then each shard is generated tensor by
tensor (in row chunks) and written as soon as it is complete, so peak memory is about one shard
(--shard-gb, default 2 GB); the whole state dict is never built.

Initialisation (the HF default): linear and embedding weights normal(0, 0.02), RMSNorm weights 1.
With it a bf16 forward stays finite: for llama3-8b (32 layers) the residual RMS grows to ≈15 (max |x| ≈ 70)
and the logits have std ≈ 1.3.
Each tensor has its own torch.Generator seeded with seed * 2**20 + tensor index, so the output is
byte-for-byte reproducible (same torch version).

Usage:
    python bench/make_synthetic_llama.py --shape {llama3-8b,llama2-70b-layer,tiny} --out DIR
        [--layers N] [--seed 0] [--dtype bf16|fp16|fp32] [--shard-gb 2] [--overwrite]
e.g.  python bench/make_synthetic_llama.py --shape llama3-8b --out /tmp/llama3-8b-synth        # ≈16 GB
      python bench/make_synthetic_llama.py --shape llama2-70b-layer --layers 2 --out /tmp/l70-2
"""

from __future__ import annotations

import argparse
import json
import shutil
import time
from pathlib import Path

import torch
from safetensors.torch import save_file

TOKENIZER_DIR = Path("/work/shared/models/stories260k")
TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "tokenizer.model", "special_tokens_map.json")
BOS, EOS = 1, 2  # ids of <s>, </s> in that tokenizer

SHAPES = {
    "llama3-8b": dict(hidden_size=4096, intermediate_size=14336, num_hidden_layers=32, num_attention_heads=32,
                      num_key_value_heads=8, vocab_size=128256, rope_theta=500000.0, max_position_embeddings=8192),
    "llama2-70b-layer": dict(hidden_size=8192, intermediate_size=28672, num_hidden_layers=1, num_attention_heads=64,
                             num_key_value_heads=8, vocab_size=32000, rope_theta=10000.0, max_position_embeddings=4096),
    "tiny": dict(hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
                 num_key_value_heads=2, vocab_size=512, rope_theta=10000.0, max_position_embeddings=2048),
}
DTYPES = {"bf16": torch.bfloat16, "fp16": torch.float16, "fp32": torch.float32}
STD = 0.02
CHUNK = 1 << 24  # elements generated per randn call (bounds the fp32 temporary to 64 MB)


def gb(n: float) -> str:
    return f"{n / 1e9:.2f} GB" if n >= 1e8 else f"{n / 1e6:.2f} MB"


def make_config(shape: str, layers: int | None, dtype: str) -> dict:
    s = dict(SHAPES[shape])
    if layers is not None:
        s["num_hidden_layers"] = layers
    dt = {"bf16": "bfloat16", "fp16": "float16", "fp32": "float32"}[dtype]
    return {"architectures": ["LlamaForCausalLM"], "model_type": "llama", **s,
            "head_dim": s["hidden_size"] // s["num_attention_heads"], "hidden_act": "silu", "rms_norm_eps": 1e-5,
            "rope_parameters": {"rope_theta": s["rope_theta"], "rope_type": "default"}, "attention_bias": False,
            "attention_dropout": 0.0, "mlp_bias": False, "initializer_range": STD, "tie_word_embeddings": False,
            "bos_token_id": BOS, "eos_token_id": EOS, "pretraining_tp": 1, "use_cache": True, "dtype": dt}


def tensor_specs(c: dict) -> list[tuple[str, tuple[int, ...]]]:
    """(name, shape) of every tensor, in the usual HF order; 1-D tensors are RMSNorm weights."""
    h, i, v, hd = c["hidden_size"], c["intermediate_size"], c["vocab_size"], c["head_dim"]
    q, kv = c["num_attention_heads"] * hd, c["num_key_value_heads"] * hd
    specs = [("model.embed_tokens.weight", (v, h))]
    for li in range(c["num_hidden_layers"]):
        p = f"model.layers.{li}."
        specs += [(p + "input_layernorm.weight", (h,)), (p + "self_attn.q_proj.weight", (q, h)),
                  (p + "self_attn.k_proj.weight", (kv, h)), (p + "self_attn.v_proj.weight", (kv, h)),
                  (p + "self_attn.o_proj.weight", (h, q)), (p + "post_attention_layernorm.weight", (h,)),
                  (p + "mlp.gate_proj.weight", (i, h)), (p + "mlp.up_proj.weight", (i, h)),
                  (p + "mlp.down_proj.weight", (h, i))]
    return specs + [("model.norm.weight", (h,)), ("lm_head.weight", (v, h))]


def plan_shards(specs, itemsize: int, shard_bytes: float) -> list[list[int]]:
    """Greedy split of tensor indices into shards of at most shard_bytes (a bigger tensor gets its own shard)."""
    shards, cur, size = [], [], 0
    for idx, (_, shape) in enumerate(specs):
        n = itemsize * torch.Size(shape).numel()
        if cur and size + n > shard_bytes:
            shards.append(cur)
            cur, size = [], 0
        cur.append(idx)
        size += n
    return shards + [cur] if cur else shards


def make_tensor(shape: tuple[int, ...], dtype: torch.dtype, seed: int) -> torch.Tensor:
    if len(shape) == 1:
        return torch.ones(shape, dtype=dtype)
    g = torch.Generator().manual_seed(seed)
    out = torch.empty(shape, dtype=dtype)
    rows = max(1, CHUNK // shape[1])
    for r in range(0, shape[0], rows):
        blk = out[r:r + rows]
        blk.copy_(torch.randn(blk.shape, generator=g).mul_(STD))
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--shape", required=True, choices=sorted(SHAPES))
    ap.add_argument("--out", required=True, type=Path)
    ap.add_argument("--layers", type=int, default=None, help="override the preset's num_hidden_layers")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--dtype", default="bf16", choices=sorted(DTYPES))
    ap.add_argument("--shard-gb", type=float, default=2.0, help="shard size limit in GB (1e9 bytes)")
    ap.add_argument("--overwrite", action="store_true", help="replace --out if it exists")
    a = ap.parse_args()
    if a.out.exists():
        if not a.overwrite:
            ap.error(f"{a.out} exists (use --overwrite)")
        shutil.rmtree(a.out)
    a.out.mkdir(parents=True)

    t0 = time.time()
    cfg, dtype = make_config(a.shape, a.layers, a.dtype), DTYPES[a.dtype]
    specs = tensor_specs(cfg)
    shards = plan_shards(specs, dtype.itemsize, a.shard_gb * 1e9)
    weight_map, total = {}, 0
    for k, idxs in enumerate(shards, 1):
        fname = f"model-{k:05d}-of-{len(shards):05d}.safetensors"
        tensors = {specs[i][0]: make_tensor(specs[i][1], dtype, a.seed * 2**20 + i) for i in idxs}
        save_file(tensors, a.out / fname, metadata={"format": "pt"})
        nbytes = sum(t.numel() * t.element_size() for t in tensors.values())
        del tensors
        total += nbytes
        weight_map.update({specs[i][0]: fname for i in idxs})
        print(f"[{time.time() - t0:7.1f}s] {fname}: {len(idxs)} tensors, {gb(nbytes)}", flush=True)

    index = {"metadata": {"total_size": total}, "weight_map": weight_map}
    (a.out / "model.safetensors.index.json").write_text(json.dumps(index, indent=2) + "\n")
    (a.out / "config.json").write_text(json.dumps(cfg, indent=2) + "\n")
    (a.out / "generation_config.json").write_text(
        json.dumps({"bos_token_id": BOS, "eos_token_id": EOS, "use_cache": True}, indent=2) + "\n")
    for f in TOKENIZER_FILES:
        if (TOKENIZER_DIR / f).exists():
            shutil.copyfile(TOKENIZER_DIR / f, a.out / f)
    tc = a.out / "tokenizer_config.json"  # let the tokenizer accept the model's full context without warnings
    tc.write_text(json.dumps({**json.loads(tc.read_text()), "model_max_length": cfg["max_position_embeddings"]},
                             indent=2) + "\n")
    n_params = sum(torch.Size(s).numel() for _, s in specs)
    dt = time.time() - t0
    print(f"wrote {a.out}: {a.shape}, {cfg['num_hidden_layers']} layers, {n_params / 1e6:,.1f} M params, "
          f"{gb(total)} {a.dtype} in {len(shards)} shards, {dt:.1f}s ({dt / max(total / 1e9, 1e-9):.1f} s/GB)")


if __name__ == "__main__":
    main()
