"""The tokenizer of a GGUF file, in the form llama.cpp's converter writes it.

Copied key by key from the source's own GGUF when the model came from one (its vocabulary the
model's); otherwise written from ``tokenizer.json``: byte-level BPE ("gpt2": tokens, types, merges,
and the pre-tokenizer name llama.cpp knows, recognised from the split pattern) or SentencePiece-style
BPE with byte fallback ("llama": tokens, types, and scores that keep the merge order). Special token
ids, add-bos/eos flags and the chat template go through the ``gguf`` package's ``SpecialVocab``.
"""

from __future__ import annotations

import json
import tempfile
from pathlib import Path
from typing import Any

#: byte-level BPE pre-tokenizer split patterns → llama.cpp's pre-tokenizer name
_PRE_PATTERNS = {
    r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+": "qwen2",
    r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1,3}| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+": "llama-bpe",
}


def source_gguf(source: str) -> Path | None:
    """The source's GGUF file when the model came from exactly one."""
    p = Path(source)
    if p.is_file() and p.suffix == ".gguf":
        return p
    found = sorted(p.glob("*.gguf")) if p.is_dir() else []
    return found[0] if len(found) == 1 else None


def copy_tokenizer(writer: Any, path: Path, n_vocab: int) -> bool:
    """Copy the tokenizer.* keys of a GGUF file (when its vocabulary is the model's)."""
    import gguf

    reader = gguf.GGUFReader(str(path))
    tokens = reader.fields.get("tokenizer.ggml.tokens")
    if tokens is None or len(tokens.data) != n_vocab:
        return False
    for key, f in reader.fields.items():
        if not key.startswith("tokenizer."):
            continue
        vtype = f.types[0]
        if vtype == gguf.GGUFValueType.ARRAY:
            writer.add_key_value(key, f.contents(), vtype, sub_type=f.types[-1])
        else:
            writer.add_key_value(key, f.contents(), vtype)
    return True


def tokenizer_reason(tokenizer: Any, n_vocab: int | None = None) -> str | None:
    """Why a tokenizer cannot be written for a model of ``n_vocab`` embedding rows (None: it can)."""
    if tokenizer is None:
        return "the model has no tokenizer to write into the GGUF file; pass a source with tokenizer files"
    tj = _tokenizer_json(tokenizer)
    if tj is None:
        return "the tokenizer has no tokenizer.json (fast tokenizer); GGUF export writes fast BPE tokenizers only"
    size = len(tokenizer)
    if n_vocab is not None and size > n_vocab:
        return (f"the tokenizer has {size:,} tokens but the model embeds {n_vocab:,}; a GGUF file holds one vocabulary: "
                "export with the model's own tokenizer")
    model = tj.get("model", {})
    if model.get("type") != "BPE":
        return f"the tokenizer is {model.get('type')}, not BPE; use --export dense and llama.cpp's convert_hf_to_gguf.py"
    if model.get("byte_fallback"):
        return None
    if _pre_name(tj) is None:
        return ("the tokenizer's pre-tokenizer is not one this exporter maps to llama.cpp's (gpt-2, llama-bpe, qwen2, smollm); "
                "use --export dense and llama.cpp's convert_hf_to_gguf.py")
    return None


def _tokenizer_json(tokenizer: Any) -> dict[str, Any] | None:
    backend = getattr(tokenizer, "backend_tokenizer", None) or getattr(tokenizer, "_tokenizer", None)
    if backend is None or not hasattr(backend, "to_str"):
        return None
    return json.loads(backend.to_str())


def _pre_name(tj: dict[str, Any]) -> str | None:
    pre = tj.get("pre_tokenizer") or {}
    items = pre.get("pretokenizers", [pre]) if pre.get("type") == "Sequence" else [pre]
    kinds = [p.get("type") for p in items]
    if kinds == ["ByteLevel"] and items[0].get("use_regex", True):
        return "gpt-2"
    if kinds == ["Digits", "ByteLevel"] and items[0].get("individual_digits") and items[1].get("use_regex", True):
        return "smollm"
    if kinds[:1] == ["Split"] and "ByteLevel" in kinds[1:]:
        pattern = items[0].get("pattern", {})
        return _PRE_PATTERNS.get(pattern.get("Regex", ""))
    return None


def write_tokenizer(writer: Any, tokenizer: Any, n_vocab: int) -> None:
    import gguf

    tj = _tokenizer_json(tokenizer)
    assert tj is not None
    vocab: dict[str, int] = dict(tj["model"]["vocab"])
    added = {t["id"]: t for t in tj.get("added_tokens", [])}
    for i, t in added.items():
        vocab[t["content"]] = i
    by_id = {i: tok for tok, i in vocab.items()}
    spm = bool(tj["model"].get("byte_fallback"))
    tokens, types, scores = [], [], []
    for i in range(n_vocab):
        tok = by_id.get(i)
        if tok is None:
            tokens.append(f"[PAD{i}]")
            types.append(gguf.TokenType.UNUSED)
        elif i in added:
            tokens.append(tok)
            types.append(gguf.TokenType.CONTROL if added[i].get("special") else gguf.TokenType.USER_DEFINED)
        elif spm and len(tok) == 6 and tok.startswith("<0x") and tok.endswith(">"):
            tokens.append(tok)
            types.append(gguf.TokenType.BYTE)
        else:
            tokens.append(tok)
            types.append(gguf.TokenType.NORMAL)
        # SentencePiece BPE ranks pieces by score; its pieces are ordered by merge, so −id keeps that order
        scores.append(-float(i) if types[-1] == gguf.TokenType.NORMAL else 0.0)
    writer.add_tokenizer_model("llama" if spm else "gpt2")
    writer.add_tokenizer_pre("default" if spm else (_pre_name(tj) or "default"))
    writer.add_token_list(tokens)
    writer.add_token_types(types)
    if spm:
        writer.add_token_scores(scores)
    with tempfile.TemporaryDirectory() as tmp:
        tokenizer.save_pretrained(tmp)
        special = gguf.SpecialVocab(tmp, load_merges=not spm, n_vocab=n_vocab)
        special.add_to_gguf(writer, quiet=True)
