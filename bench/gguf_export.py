"""GGUF export against llama.cpp's own quantizer, scored by llama.cpp itself.

    python bench/gguf_export.py --model ../shared/models/smollm2-135m-instruct-q4_1-gguf --data-dir ../shared/data

Rows: dense (our PyTorch perplexity, the protocol's reference); F16 (our dense export, scored by
llama.cpp); llama.cpp's own Q4_0, Q4_1, Q4_K_S, Q4_K_M, Q3_K_S, Q3_K_M made from that F16 by its
quantizer (llama_model_quantize through llama-cpp-python, no importance matrix: the bindings take
one only as a C structure); ours: GPTQ → Q4_0 (bits=4,group=32,sym=true), AWQ + GPTQ on Q4_1's grid,
GPTQ on the Q4_K and Q3_K grids (where 256 does not divide a width, the same fallback llama.cpp
uses: Q5_0 and IQ4_NL); MoDeGPT 0.2 (uniform MLP) F16 and with GPTQ on Q4_K.

Perplexity is computed from llama.cpp's logits on the protocol's windows (WikiText-2 test joined
with "\\n\\n", tokenized by the model's tokenizer, non-overlapping windows, tokens 2..n of each
window predicted). Decode speed: llama.cpp, batch 1, 2 threads, 128 tokens after a 16-token prompt,
median of 3. Sizes are the whole file (embedding, head and norms included).
"""

from __future__ import annotations

import math
import statistics
import tempfile
import time
from pathlib import Path
from typing import Any

import numpy as np
import torch
from common import Bench, parser, protocol_for, select

#: llama.cpp file types made from the F16 export by llama.cpp's quantizer
PEERS = ["Q4_0", "Q4_1", "Q4_K_S", "Q4_K_M", "Q3_K_S", "Q3_K_M"]
#: (method, recipe): ours, exported to GGUF
OURS: list[tuple[str, list[str]]] = [
    ("gptq → Q4_0", ["gptq:bits=4,group=32,sym=true"]),
    ("awq+gptq → Q4_1", ["awq:samples=8", "gptq:format=q4_1"]),
    ("gptq → Q4_K", ["gptq:format=q4_k"]),
    ("gptq → Q3_K", ["gptq:format=q3_k"]),
    ("modegpt 0.2 mlp uniform → F16", ["modegpt:ratio=0.2,parts=mlp,allocate=uniform,round_to=32"]),
    ("modegpt 0.2 mlp uniform + gptq → Q4_K", ["modegpt:ratio=0.2,parts=mlp,allocate=uniform,round_to=32", "gptq:format=q4_k"]),
    ("gptq → Q4_1", ["gptq:format=q4_1"]),  # this source's weights already sit on a Q4_1 grid, which AWQ's scaling leaves
]
THREADS = 2
COLUMNS = ["method", "file_type", "ppl", "file_mb", "bits_per_weight", "params", "decode_tok_s", "decode_vs_peer", "seconds"]


def llama_ppl(path: Path, ids: torch.Tensor, seqlen: int, windows: int) -> tuple[float, float]:
    """(perplexity, seconds) from llama.cpp's logits over the protocol's windows."""
    import llama_cpp

    llm = llama_cpp.Llama(model_path=str(path), n_ctx=seqlen, n_batch=seqlen, logits_all=True, n_threads=THREADS, verbose=False)
    nll, n = 0.0, 0
    t0 = time.perf_counter()
    try:
        for w in range(windows):
            window = ids[w * seqlen:(w + 1) * seqlen].tolist()
            llm.reset()
            llm.eval(window)
            logits = torch.from_numpy(np.asarray(llm.scores[:seqlen], dtype=np.float32))
            nll += float(torch.nn.functional.cross_entropy(logits[:-1], torch.tensor(window[1:]), reduction="sum"))
            n += seqlen - 1
    finally:
        llm.close()
    return math.exp(nll / n), time.perf_counter() - t0


def llama_decode(path: Path, prompt: list[int], tokens: int = 128, repeats: int = 3) -> float:
    """Median tokens/s of greedy decoding, batch 1."""
    import llama_cpp

    llm = llama_cpp.Llama(model_path=str(path), n_ctx=512, n_threads=THREADS, verbose=False)
    rates = []
    try:
        for _ in range(repeats):
            llm.reset()
            llm.eval(prompt)
            t0 = time.perf_counter()
            for _ in range(tokens):
                nxt = int(np.argmax(llm.scores[llm.n_tokens - 1]))
                llm.eval([nxt])
            rates.append(tokens / (time.perf_counter() - t0))
    finally:
        llm.close()
    return statistics.median(rates)


def quantize_peer(f16: Path, out: Path, ftype: str) -> None:
    import llama_cpp

    params = llama_cpp.llama_model_quantize_default_params()
    params.ftype = getattr(llama_cpp, f"LLAMA_FTYPE_MOSTLY_{ftype}")
    params.nthread = THREADS
    rc = llama_cpp.llama_model_quantize(str(f16).encode(), str(out).encode(), params)
    if rc != 0:
        raise RuntimeError(f"llama_model_quantize {ftype} returned {rc}")


def file_params(path: Path) -> int:
    """Weights the file holds (every tensor's elements)."""
    import gguf

    return int(sum(int(t.n_elements) for t in gguf.GGUFReader(str(path)).tensors))


def tensor_types(path: Path) -> dict[str, int]:
    import gguf

    r = gguf.GGUFReader(str(path))
    out: dict[str, int] = {}
    for t in r.tensors:
        if t.name.startswith("blk.") and t.name.endswith(".weight") and "norm" not in t.name:
            out[t.tensor_type.name] = out.get(t.tensor_type.name, 0) + 1
    return dict(sorted(out.items()))


def row_file(work: Path, i: int, method: str) -> Path:
    """Where the run put row ``i``'s file."""
    if method.startswith("F16"):
        return work / "f16" / "model-F16.gguf"
    if method.startswith("llama.cpp "):
        return work / "llamacpp" / f"model-{method.split()[1]}.gguf"
    (found,) = (work / method.split()[0].replace("+", "_") / str(i)).glob("model-*.gguf")
    return found


def redecode(out: Path, work: Path, model: str) -> None:
    """Decode tokens/s of every row again, in one pass, and the ratios against llama.cpp's own files."""
    import json

    from transformers import AutoTokenizer

    data = json.loads(out.with_suffix(".json").read_text())
    tok = AutoTokenizer.from_pretrained(model)
    from compress.calib.data import join_documents, load_documents

    prompt = tok(join_documents("wikitext2", load_documents("wikitext2", "test", None))[:2000]).input_ids[:16]
    speeds: dict[str, float] = {}
    for i, r in enumerate(data["rows"]):
        if r["method"] == "dense" or "error" in r:
            continue
        f = row_file(work, i, r["method"])
        r["decode_tok_s"] = round(llama_decode(f, prompt), 1)
        r["params"] = file_params(f)
        if r["method"].startswith("llama.cpp "):
            speeds[r["file_type"]] = r["decode_tok_s"]
        print(r["method"], r["decode_tok_s"], flush=True)
    for r in data["rows"]:
        peer = {"Q4_K": "Q4_K_S", "Q3_K": "Q3_K_S"}.get(r.get("file_type", ""), r.get("file_type", ""))
        if not r["method"].startswith(("llama.cpp", "F16", "dense")) and peer in speeds and "decode_tok_s" in r:
            r["decode_vs_peer"] = round(r["decode_tok_s"] / speeds[peer], 3)
    data["decode_remeasured"] = time.strftime("%Y-%m-%d %H:%M:%S") + " (idle machine, one pass over every file)"
    from common import Results

    if "notes" not in data:
        dense = next(r for r in data["rows"] if r["method"] == "dense")
        import gguf

        f16 = gguf.GGUFReader(str(work / "f16" / "model-F16.gguf")).tensors
        n_linear = sum(int(t.n_elements) for t in f16 if t.name.startswith("blk.") and t.name.endswith(".weight") and "norm" not in t.name)
        data["notes"] = notes(data["protocol"]["model"], dense["params"], n_linear)
    res = Results(out, data["protocol"], COLUMNS)
    res.data = data
    res.save()
    write_markdown(res)


def main() -> None:
    ap = parser(__doc__, "gguf")
    ap.add_argument("--work", default="", help="folder for the GGUF files (default: a temporary one)")
    ap.add_argument("--peers", default=",".join(PEERS), help="llama.cpp file types to make (comma-separated)")
    ap.add_argument("--no-decode", action="store_true", help="perplexity and size only (a second model)")
    ap.add_argument("--redecode", action="store_true",
                    help="re-measure only the decode speed of every row's file in --work, one after the other (on an idle machine)")
    args = ap.parse_args()
    if args.redecode:
        redecode(Path(args.out), Path(args.work), args.model)
        return
    protocol = protocol_for(args)
    protocol["perplexity"]["scored_by"] = "llama.cpp logits (llama-cpp-python)"
    protocol["decode"] = {"engine": "llama.cpp", "batch": 1, "threads": THREADS, "tokens": 128, "prompt": 16, "repeats": 3}
    b = Bench(args.model, args.data_dir, Path(args.out), protocol, COLUMNS, args.append)
    from compress import compress
    from compress.calib.data import join_documents, load_documents
    from compress.export_gguf import export_gguf

    text = join_documents("wikitext2", load_documents("wikitext2", "test", args.data_dir))
    ids = b.tok(text, return_tensors="pt").input_ids[0]
    work = Path(args.work or tempfile.mkdtemp(prefix="gguf-bench-"))
    work.mkdir(parents=True, exist_ok=True)
    prompt = ids[:16].tolist()
    n_linear = sum(m.weight.numel() for m in b.model.model.layers.modules() if isinstance(m, torch.nn.Linear))
    n_params = b.count_parameters(b.model)
    peer_speed: dict[str, float] = {}

    def add(method: str, path: Path, secs: float, peer: str | None = None) -> None:
        ppl, ppl_s = llama_ppl(path, ids, args.seqlen, args.windows)
        tok_s = float("nan") if args.no_decode else llama_decode(path, prompt)
        size = path.stat().st_size
        row: dict[str, Any] = {"method": method, "file_type": path.stem.split("-")[-1], "ppl": round(ppl, 3), "file_mb": round(size / 1e6, 2),
                               "bits_per_weight": round(8 * size / n_params, 3), "decode_tok_s": None if args.no_decode else round(tok_s, 1),
                               "seconds": round(secs, 1), "llama_ppl_seconds": round(ppl_s, 1), "tensor_types": tensor_types(path),
                               "params": file_params(path), "config": {}}
        if peer is not None and peer_speed.get(peer) and not args.no_decode:
            row["decode_vs_peer"] = round(tok_s / peer_speed[peer], 3)
        b.results.add(row)
        print(row, flush=True)

    done = {r["method"] for r in b.results.data["rows"]}
    peer_speed.update({r["file_type"]: r["decode_tok_s"] for r in b.results.data["rows"] if r["method"].startswith("llama.cpp ")})
    t0 = time.perf_counter()
    f16 = work / "f16" / "model-F16.gguf"
    if "F16 (our dense export)" not in done:
        f16 = export_gguf(b.model, b.tok, work / "f16", "model.layers", args.model)
        add("F16 (our dense export)", f16, time.perf_counter() - t0)
    for ft in [p for p in args.peers.split(",") if p and f"llama.cpp {p}" not in done]:
        out = work / "llamacpp" / f"model-{ft}.gguf"
        out.parent.mkdir(parents=True, exist_ok=True)
        t0 = time.perf_counter()
        quantize_peer(f16, out, ft)
        add(f"llama.cpp {ft}", out, time.perf_counter() - t0)
        peer_speed[ft] = b.results.data["rows"][-1]["decode_tok_s"]
    for method, recipe in select(OURS, args.only):
        m = b.copy(b.model)
        t0 = time.perf_counter()
        compress(m, recipe, b.ids)
        path = export_gguf(m, b.tok, work / method.split()[0].replace("+", "_") / str(len(b.results.data["rows"])), "model.layers", args.model)
        ft = path.stem.split("-")[-1]
        add(method, path, time.perf_counter() - t0, {"Q4_K": "Q4_K_S", "Q3_K": "Q3_K_S"}.get(ft, ft))
        b.results.data["rows"][-1]["config"] = {"recipe": recipe}
        b.results.save()
    b.results.data["notes"] = notes(Path(args.model).name, n_params, n_linear)
    write_markdown(b.results)


def notes(model: str, n_params: int, n_linear: int) -> list[str]:
    return [
        f"Model: {model}; {n_params:,} parameters ({n_linear:,} in the decoder linears).",
        "ppl: llama.cpp's logits on the protocol's windows; dense: our PyTorch model on the same windows.",
        "bits_per_weight: the whole file's bits per source parameter; params: the weights the file holds.",
        "decode_vs_peer: decode tokens/s against llama.cpp's own file of the same type (Q4_K/Q3_K against Q4_K_S/Q3_K_S), same run.",
        "llama.cpp's quantizer ran without an importance matrix (the bindings take one only as a C++ map).",
    ]


def write_markdown(results: Any) -> None:
    results.write_markdown("GGUF export vs llama.cpp's quantizer (scored by llama.cpp)", results.data.get("notes", []))


if __name__ == "__main__":
    main()
