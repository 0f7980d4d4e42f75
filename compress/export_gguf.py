"""Export to GGUF, the file llama.cpp (and Ollama, LM Studio) runs, written with the ``gguf`` package's writer.

What each tensor becomes:
- a :class:`~compress.modules.ggml.GGMLLinear` (``rtn``/``gptq`` with ``format=q4_k`` and the like):
  its stored blocks, byte for byte;
- a :class:`~compress.modules.quant.QuantLinear` whose codes are exactly a GGML type: symmetric
  4-bit groups of 32 → Q4_0 (d·(c − 8)), symmetric 8-bit groups of 32 → Q8_0 (d·(c − 128)); the
  float16 scale is the block's d, so the file dequantizes to the checkpoint's weights bit for bit;
- plain linears (unquantized, or a structurally smaller model's) → F16 (BF16 for a bfloat16 model,
  kept exactly); norms and biases → F32;
- the token embedding and the output head, which no pass quantizes, take the type llama.cpp's own
  quantizer gives them for the file's type (so file sizes compare): the head (or a tied embedding)
  Q6_K, or Q8_0 where 256 does not divide the width; an untied embedding the file's type. They
  are rounded to nearest at export. A file without quantized linears is F16 throughout.

Names and metadata follow llama.cpp's converter for the architecture (llama, mistral as llama,
qwen2, qwen3), including its row order of the llama query/key projections (llama.cpp rotates
interleaved pairs; transformers rotates halves). The tokenizer is copied from the source's own
GGUF when the model came from one; otherwise it is written from ``tokenizer.json`` (byte-level BPE
with a known pre-tokenizer, or SentencePiece-style BPE with byte fallback).
"""

from __future__ import annotations

from collections import Counter
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn

from .errors import CompressError
from .gguf_vocab import copy_tokenizer, source_gguf, tokenizer_reason, write_tokenizer
from .modules import CompressedLinear
from .modules.base import hf_config
from .modules.ggml import GGMLLinear
from .modules.quant import QuantLinear
from .solvers import ggml

#: transformers model_type → llama.cpp architecture
ARCHITECTURES = {"llama": "llama", "mistral": "llama", "qwen2": "qwen2", "qwen3": "qwen3"}
#: architectures whose q/k rows llama.cpp expects in interleaved-pair order
_PERMUTED = {"llama"}
#: the linears of a decoder layer: GGUF name → module path in the layer
LINEARS = {
    "attn_q": "self_attn.q_proj", "attn_k": "self_attn.k_proj", "attn_v": "self_attn.v_proj", "attn_output": "self_attn.o_proj",
    "ffn_gate": "mlp.gate_proj", "ffn_up": "mlp.up_proj", "ffn_down": "mlp.down_proj",
}
#: llama.cpp's file type for a file whose linears are mostly of this GGML type
FILE_TYPES = {
    None: "MOSTLY_F16", "bf16": "MOSTLY_BF16", "q8_0": "MOSTLY_Q8_0", "q4_0": "MOSTLY_Q4_0", "q4_1": "MOSTLY_Q4_1", "q5_0": "MOSTLY_Q5_0",
    "iq4_nl": "MOSTLY_IQ4_NL", "q6_k": "MOSTLY_Q6_K", "q4_k": "MOSTLY_Q4_K_S", "q3_k": "MOSTLY_Q3_K_S", "q2_k": "MOSTLY_Q2_K",
}
def exact_type(m: QuantLinear) -> str | None:
    """The GGML type holding this quantized linear's codes exactly, or None."""
    s = m.qspec
    if s.dim != "oc" or s.levels != "uniform" or not s.sym or (s.group_size or m.in_features) != 32:
        return None
    return {4: "q4_0", 8: "q8_0"}.get(s.bits)


def recipe_reason(model_type: str | None, passes: list[Any], final_kinds: set[str]) -> str | None:
    """Why a recipe (its passes, and the module types a linear may have after them) cannot produce a
    GGUF file (checked before anything is compressed)."""
    if model_type is not None and model_type not in ARCHITECTURES:
        return (f"--export gguf writes the architectures llama.cpp runs that this exporter maps ({', '.join(sorted(ARCHITECTURES))}); "
                f"this model is '{model_type}': use --export dense and llama.cpp's convert_hf_to_gguf.py")
    kinds = final_kinds - {"Linear", "QuantLinear", "GGMLLinear"}
    if kinds:
        return (f"--export gguf has no form for {', '.join(sorted(kinds))} modules; what fits: gptq:format=q4_k (or q3_k, q6_k, "
                "q4_0, q4_1, q8_0), gptq:bits=4,group=32,sym=true → Q4_0, or a structural pass whose dense export is plain (F16)")
    for p in passes:
        c = p.config
        if p.dense_blocker():
            return f"--export gguf needs a plain transformers model; {p.name}: {p.dense_blocker()}"
        if getattr(c, "format", "int") == "int" and "QuantLinear" in p.produces(frozenset({"Linear"})):
            sym, dim = getattr(c, "sym", False), getattr(c, "dim", "oc")
            if not (sym and dim == "oc" and c.group == 32 and c.bits in (4, 8)):
                return (f"--export gguf stores {p.name}:bits={c.bits},group={c.group}{',sym=true' if sym else ''} in no GGUF type exactly; "
                        "use bits=4,group=32,sym=true (→ Q4_0), bits=8,group=32,sym=true (→ Q8_0), format=q4_1 (asymmetric 4-bit "
                        "groups of 32 with the float16 minimum Q4_1 stores) or format=q4_k/q3_k/q6_k")
    return None


def opened_reason(model: Any, tokenizer: Any, source: str) -> str | None:
    """Why the opened model cannot become a GGUF file: architecture, RoPE, tokenizer."""
    cfg = getattr(model, "config", None)
    if cfg is None:
        return None
    why = recipe_reason(getattr(cfg, "model_type", None), [], set()) or rope_reason(cfg)
    if why:
        return why
    if source_gguf(source) is not None:
        return None
    emb = model.get_input_embeddings() if hasattr(model, "get_input_embeddings") else None
    n_vocab = int(emb.weight.shape[0]) if emb is not None else getattr(cfg, "vocab_size", None)
    return tokenizer_reason(tokenizer, n_vocab)


def check_model(model: nn.Module, layers_path: str) -> None:
    from .checkpoint import dense_export_blocker

    cfg = hf_config(model)
    if cfg.model_type not in ARCHITECTURES:
        raise CompressError(recipe_reason(cfg.model_type, [], set()) or "")
    why = dense_export_blocker(model)
    if why is not None:
        raise CompressError(f"--export gguf needs a plain transformers model: {why}")
    bad = []
    for name, m in model.named_modules():
        if isinstance(m, QuantLinear) and exact_type(m) is None:
            bad.append(f"{name} ({m.qspec.bits}-bit, group {m.qspec.group_size}, {'sym' if m.qspec.sym else 'asym'})")
        elif isinstance(m, CompressedLinear) and not isinstance(m, (QuantLinear, GGMLLinear)):
            bad.append(f"{name} ({type(m).__name__})")
    if bad:
        more = f" and {len(bad) - 2} more" if len(bad) > 2 else ""
        raise CompressError(f"--export gguf cannot store {', '.join(bad[:2])}{more}; quantize with gptq:format=q4_k (or q4_0, q4_1, "
                            "q8_0, q3_k, q6_k) or gptq:bits=4,group=32,sym=true")


# -- tensors ---------------------------------------------------------------------------------------


def _permute(x: torch.Tensor, n_head: int) -> torch.Tensor:
    """Rows of a llama q/k projection (or its bias) from halves order to interleaved pairs per head."""
    return x.reshape(n_head, 2, x.shape[0] // n_head // 2, *x.shape[1:]).swapaxes(1, 2).reshape(x.shape)


def linear_tensor(m: nn.Module) -> tuple[np.ndarray, str | None]:
    """(array, GGML type name) of a linear's weight: stored blocks, exact Q4_0/Q8_0 codes, or F16 (type None)."""
    if isinstance(m, GGMLLinear):
        return m.blocks.cpu().numpy(), m.gtype.name
    if isinstance(m, QuantLinear):
        name = exact_type(m)
        assert name is not None
        t = ggml.TYPES[name]
        g = ggml.Grid(t, m.scales.float(), torch.zeros_like(m.scales, dtype=torch.float32), {"d": m.scales.to(torch.float16)})
        return ggml.encode(m.codes().long(), g).numpy(), name
    assert isinstance(m, nn.Linear)
    return _plain(m.weight)


def _plain(w: torch.Tensor) -> tuple[np.ndarray, str | None]:
    """An unquantized weight: BF16 when it is bfloat16 (kept exactly), else F16 (type None)."""
    if w.dtype == torch.bfloat16:
        return w.detach().cpu().contiguous().view(torch.int16).numpy().view(np.uint8).reshape(w.shape[0], -1), "bf16"
    return w.detach().to(torch.float16).cpu().numpy(), None


def _head_type(base: str | None, width: int) -> str | None:
    """llama.cpp's type for the output head (or a tied embedding) in a file of type ``base``."""
    if base not in ggml.TYPES:
        return None
    return "q8_0" if width % ggml.QK_K or base == "q8_0" else "q6_k"


def _quantized(W: torch.Tensor, name: str | None) -> tuple[np.ndarray, str | None]:
    if name is None:
        return _plain(W)
    t = ggml.TYPES[name]
    return ggml.quantize(W.detach().float().cpu(), t).numpy(), name


def _base_type(types: list[str | None]) -> str | None:
    """The file's type: the most frequent k-quant among the linears (the one asked for; the others are
    its fallbacks), else the most frequent type; "bf16" or None (F16) without quantized linears."""
    counted = Counter(t for t in types if t in ggml.TYPES)
    if not counted:
        return "bf16" if "bf16" in types else None
    kq = [t for t, _ in counted.most_common() if t.endswith("_k")]
    return kq[0] if kq else counted.most_common(1)[0][0]


def file_type_name(base: str | None) -> str:
    return "F16" if base is None else base.upper()


def gguf_tensors(model: nn.Module, layers_path: str) -> tuple[list[tuple[str, np.ndarray, str | None]], str | None]:
    """Every tensor of the file in llama.cpp's names, and the file's type (None: F16)."""
    cfg = hf_config(model)
    arch = ARCHITECTURES[cfg.model_type]
    lm: Any = model  # a transformers causal LM (embeddings, layers by attribute)
    layers: Any = model.get_submodule(layers_path)
    n_head, n_kv = cfg.num_attention_heads, getattr(cfg, "num_key_value_heads", None) or cfg.num_attention_heads
    out: list[tuple[str, np.ndarray, str | None]] = []
    types: list[str | None] = []
    f32 = lambda t: t.detach().float().cpu().numpy()  # noqa: E731
    for i, layer in enumerate(layers):
        out.append((f"blk.{i}.attn_norm.weight", f32(layer.input_layernorm.weight), "f32"))
        out.append((f"blk.{i}.ffn_norm.weight", f32(layer.post_attention_layernorm.weight), "f32"))
        for gname, path in LINEARS.items():
            m = layer.get_submodule(path)
            arr, t = linear_tensor(m)
            bias = getattr(m, "bias", None)
            if arch in _PERMUTED and gname in ("attn_q", "attn_k"):
                heads = n_head if gname == "attn_q" else n_kv
                arr = _permute(torch.from_numpy(arr), heads).numpy()
                bias = _permute(bias.detach(), heads) if bias is not None else None
            out.append((f"blk.{i}.{gname}.weight", arr, t))
            types.append(t)
            if bias is not None:
                out.append((f"blk.{i}.{gname}.bias", f32(bias), "f32"))
        attn = layer.self_attn
        for norm, gname in (("q_norm", "attn_q_norm"), ("k_norm", "attn_k_norm")):
            if hasattr(attn, norm):
                out.append((f"blk.{i}.{gname}.weight", f32(getattr(attn, norm).weight), "f32"))
    base = _base_type(types)
    emb = lm.get_input_embeddings().weight
    head = lm.get_output_embeddings()
    tied = head is None or head.weight is emb or bool(getattr(cfg, "tie_word_embeddings", False))
    hidden = emb.shape[1]
    if tied:
        e_arr, e_t = _quantized(emb, _head_type(base, hidden))
    else:
        e_t0 = ggml.type_for(base, hidden) if base in ggml.TYPES else None
        e_arr, e_t = _quantized(emb, e_t0.name if e_t0 is not None else None)
    head_tensors = [("token_embd.weight", e_arr, e_t)]
    final_norm: Any = model.get_submodule(layers_path.rsplit(".", 1)[0] + ".norm") if "." in layers_path else None
    if final_norm is not None:
        head_tensors.append(("output_norm.weight", f32(final_norm.weight), "f32"))
    if not tied:
        assert head is not None
        arr, t = _quantized(head.weight, _head_type(base, hidden))
        head_tensors.append(("output.weight", arr, t))
    return head_tensors + out, base


# -- metadata --------------------------------------------------------------------------------------


def _rope(cfg: Any) -> tuple[float, dict[str, Any]]:
    params = dict(getattr(cfg, "rope_parameters", None) or getattr(cfg, "rope_scaling", None) or {})
    theta = float(params.get("rope_theta", getattr(cfg, "rope_theta", 10000.0)))
    return theta, params


def rope_reason(cfg: Any) -> str | None:
    _, params = _rope(cfg)
    kind = params.get("rope_type", params.get("type", "default")) or "default"
    if kind not in ("default", "linear", "llama3"):
        return f"--export gguf writes default, linear and llama3 RoPE; this model uses rope_type={kind}: use --export dense and llama.cpp's converter"
    return None


def _llama3_factors(cfg: Any, params: dict[str, Any], head_dim: int, theta: float) -> np.ndarray:
    """Per-frequency divisors of Llama-3.1's RoPE scaling (the rope_freqs tensor llama.cpp reads)."""
    factor = float(params["factor"])
    low, high = float(params.get("low_freq_factor", 1.0)), float(params.get("high_freq_factor", 4.0))
    old_ctx = float(params.get("original_max_position_embeddings", 8192))
    freqs = 1.0 / (theta ** (torch.arange(0, head_dim, 2, dtype=torch.float64) / head_dim))
    wavelen = 2 * torch.pi / freqs
    low_wl, high_wl = old_ctx / low, old_ctx / high
    smooth = (old_ctx / wavelen - low) / (high - low)
    out = torch.where(wavelen < high_wl, torch.ones_like(freqs),
                      torch.where(wavelen > low_wl, torch.full_like(freqs, factor), 1.0 / ((1 - smooth) / factor + smooth)))
    return out.float().numpy()


def export_gguf(model: nn.Module, tokenizer: Any, directory: Path, layers_path: str, source: str) -> Path:
    """Write ``model`` as one GGUF file into ``directory``; returns its path."""
    import gguf

    check_model(model, layers_path)
    cfg = hf_config(model)
    arch = ARCHITECTURES[cfg.model_type]
    why = rope_reason(cfg)
    if why:
        raise CompressError(why)
    tensors, base = gguf_tensors(model, layers_path)
    lm: Any = model
    n_vocab = int(lm.get_input_embeddings().weight.shape[0])
    src = source_gguf(source)
    directory.mkdir(parents=True, exist_ok=True)
    path = directory / f"model-{file_type_name(base)}.gguf"
    writer = gguf.GGUFWriter(str(path), arch)
    n_head = cfg.num_attention_heads
    head_dim = getattr(cfg, "head_dim", None) or cfg.hidden_size // n_head
    writer.add_name(Path(str(getattr(cfg, "_name_or_path", "") or source)).name or "model")  # a folder's name, not its path
    writer.add_context_length(int(cfg.max_position_embeddings))
    writer.add_embedding_length(int(cfg.hidden_size))
    writer.add_block_count(len(model.get_submodule(layers_path)))  # type: ignore[arg-type]
    writer.add_feed_forward_length(int(model.get_submodule(layers_path)[0].mlp.gate_proj.out_features))  # type: ignore[index]
    writer.add_head_count(int(n_head))
    writer.add_head_count_kv(int(getattr(cfg, "num_key_value_heads", None) or n_head))
    writer.add_key_length(int(head_dim))
    writer.add_value_length(int(head_dim))
    writer.add_rope_dimension_count(int(head_dim))
    writer.add_layer_norm_rms_eps(float(cfg.rms_norm_eps))
    theta, params = _rope(cfg)
    writer.add_rope_freq_base(theta)
    kind = params.get("rope_type", params.get("type", "default")) or "default"
    if kind == "linear":
        writer.add_rope_scaling_type(gguf.RopeScalingType.LINEAR)
        writer.add_rope_scaling_factor(float(params["factor"]))
    writer.add_vocab_size(n_vocab)
    writer.add_file_type(int(gguf.LlamaFileType[FILE_TYPES[base]]))
    writer.add_quantization_version(gguf.GGML_QUANT_VERSION)
    if not (src is not None and copy_tokenizer(writer, src, n_vocab)):
        why = tokenizer_reason(tokenizer, n_vocab)
        if why:
            raise CompressError(why)
        write_tokenizer(writer, tokenizer, n_vocab)
    if kind == "llama3":
        writer.add_tensor("rope_freqs.weight", _llama3_factors(cfg, params, head_dim, theta))
    for name, arr, t in tensors:
        if t == "f32":
            writer.add_tensor(name, np.ascontiguousarray(arr, dtype=np.float32))
        elif t is None:
            writer.add_tensor(name, np.ascontiguousarray(arr, dtype=np.float16))
        elif t == "bf16":
            writer.add_tensor(name, np.ascontiguousarray(arr), raw_dtype=gguf.GGMLQuantizationType.BF16)
        else:
            writer.add_tensor(name, np.ascontiguousarray(arr), raw_dtype=gguf.GGMLQuantizationType(ggml.TYPES[t].ggml_id))
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    return path
