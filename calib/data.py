"""Text sources and calibration sampling.

Named sources (``wikitext2``, ``c4``, ``ptb``) load from a local data directory when one is given
(``--data-dir`` or the ``COMPRESS_DATA_DIR`` environment variable) and from the Hugging Face hub
otherwise. Local layout, one folder per source::

    wikitext-2-raw/wiki.<split>.raw  or  wikitext-2-raw/<split>.hf_rows.jsonl   ({"text"} rows)
    c4/c4-<split>.*.jsonl[.gz]                                                  ({"text"} docs)
    ptb/ptb.<split>.txt                                                         (one sentence a line)

Any other source is a path to a ``.txt``, ``.jsonl`` (a ``text`` field) or ``.parquet`` file.

Calibration sampling: the documents are joined with "\\n\\n" and tokenized once; the token stream
is cut into non-overlapping ``seqlen`` chunks and ``samples`` of them are drawn without replacement
with a seeded generator. The same (source, tokenizer, samples, seqlen, seed) always gives the same
tensor; a source with fewer than samples × seqlen tokens is an error.
"""

from __future__ import annotations

import glob
import gzip
import json
import os
import zlib
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from ..config import Options, option
from ..errors import CompressError
from ..readers import decode, read_text

DATA_DIR_ENV = "COMPRESS_DATA_DIR"
NAMED_SOURCES = ("wikitext2", "c4", "ptb")
_SPLIT_ALIASES = {"validation": "valid", "val": "valid", "dev": "valid"}


@dataclass
class CalibConfig(Options):
    """Calibration settings: source, number of sequences, their length, seed, forward batch size."""

    source: str = option("c4", "calibration text: c4, wikitext2, ptb or a path to a .txt/.jsonl/.parquet file", flag="--calib")
    samples: int = option(32, "calibration sequences", min=1, flag="--calib-samples")
    seqlen: int = option(512, "tokens per calibration sequence", min=1, flag="--calib-seqlen")
    seed: int = option(0, "calibration sampling seed", min=0, max=2**63 - 1, flag="--seed")
    batch_size: int = option(8, "calibration forward batch size", min=1, flag="--batch-size")
    split: str = option("train", "split of a named source", flag="--calib-split")

    def validate(self) -> None:
        super().validate()
        if self.source not in NAMED_SOURCES and self.split != "train":
            raise CompressError(f"{self.where('split')} {self.split} applies to the named sources ({', '.join(NAMED_SOURCES)}); "
                                f"the file '{self.source}' is read whole: drop {self.where('split')}")

    @classmethod
    def unknown_message(cls, unknown: list[str], what: str) -> str:
        return f"{what + ': ' if what else ''}unknown calibration key(s) {', '.join(unknown)}; allowed: {', '.join(f.name for f in cls.fields())}"


def resolve_data_dir(data_dir: str | Path | None) -> Path | None:
    """The local data directory: the argument, else $COMPRESS_DATA_DIR, else None (use the hub)."""
    d = data_dir if data_dir is not None else os.environ.get(DATA_DIR_ENV) or None
    if d is None:
        return None
    p = Path(d).expanduser()
    if p.exists() and not p.is_dir():
        raise CompressError(f"data directory '{p}' is a file, not a folder; pass --data-dir or set {DATA_DIR_ENV} to a folder holding wikitext-2-raw/, c4/, ptb/")
    if not p.is_dir():
        raise CompressError(f"data directory '{p}' does not exist; pass --data-dir or set {DATA_DIR_ENV} to a folder holding wikitext-2-raw/, c4/, ptb/")
    return p


def _read_jsonl(path: Path, field: str = "text", user: bool = False) -> list[str]:
    """The ``field`` of each row. ``user``: a file the user named, whose rows must each hold text
    (an empty one is skipped, a null or non-string one refused); a named source keeps its rows as
    they are (WikiText-2's empty rows are part of its text)."""
    opener: Any = gzip.open if path.suffix == ".gz" else open
    what = "calibration file" if user else "data file"
    try:
        with opener(path, "rb") as f:
            data = f.read()
    except (OSError, EOFError, zlib.error) as e:
        raise CompressError(f"cannot read {what} '{path}': {getattr(e, 'strerror', None) or e}; check or re-download it") from None
    text = decode(data, path, what)
    out = []
    for i, line in enumerate(text.splitlines()):
        if not line.strip():
            continue
        try:
            row = json.loads(line)
        except json.JSONDecodeError as e:
            raise CompressError(f"{what} '{path}': line {i + 1} is not JSON ({e.msg}); each line must be one object such as {{\"{field}\": \"...\"}}") from None
        if not isinstance(row, dict):
            raise CompressError(f"{what} '{path}': line {i + 1} is a JSON {type(row).__name__}, not an object with a '{field}' field")
        if field not in row:
            raise CompressError(f"{what} '{path}': line {i + 1} has no '{field}' field")
        value = row[field]
        if user and not isinstance(value, str):
            raise CompressError(f"{what} '{path}': line {i + 1} has a {'null' if value is None else type(value).__name__} '{field}', not text; remove the row or give it text")
        if user and not value.strip():
            continue
        out.append(str(value))
    return out


def _read_file(path: Path) -> list[str]:
    suffixes = "".join(path.suffixes[-2:])
    if path.suffix == ".txt" or path.suffix == ".raw":
        return [read_text(path, "calibration file")]
    if path.suffix == ".jsonl" or suffixes == ".jsonl.gz":
        return _read_jsonl(path, user=True)
    if path.suffix == ".parquet":
        return _read_parquet(path)
    raise CompressError(f"unsupported data file '{path}': use .txt, .jsonl (a 'text' field) or .parquet")


def _read_parquet(path: Path) -> list[str]:
    try:
        import pyarrow as pa
        import pyarrow.parquet as pq
    except ImportError:
        raise CompressError("reading .parquet needs pyarrow: pip install 'compress[parquet]'") from None
    try:
        schema = pq.read_schema(path)
        if "text" not in schema.names:
            raise CompressError(f"calibration file '{path}' has no 'text' column (columns: {', '.join(schema.names[:8])})")
        values = pq.read_table(path, columns=["text"]).column("text").to_pylist()
    except (pa.ArrowException, OSError) as e:
        raise CompressError(f"calibration file '{path}' is not a readable parquet file ({str(e).splitlines()[0][:120]}); check or re-export it") from None
    out = []
    for i, v in enumerate(values):
        if not isinstance(v, str):
            raise CompressError(f"calibration file '{path}': row {i} has a {'null' if v is None else type(v).__name__} 'text', not text; drop the row or give it text")
        if v.strip():
            out.append(v)
    return out


def _local_named(source: str, split: str, root: Path) -> list[str]:
    s = _SPLIT_ALIASES.get(split, split)
    if source == "wikitext2":
        raw = root / "wikitext-2-raw" / f"wiki.{s}.raw"
        rows = root / "wikitext-2-raw" / f"{s}.hf_rows.jsonl"
        if rows.is_file():
            return _read_jsonl(rows)
        if raw.is_file():
            return [read_text(raw, "data file")]
        candidates = [rows, raw]
    elif source == "c4":
        hf_split = "validation" if s == "valid" else s
        files = sorted(glob.glob(str(root / "c4" / f"c4-{hf_split}.*.json*")))
        if files:
            return [d for f in files for d in _read_jsonl(Path(f))]
        candidates = [root / "c4" / f"c4-{hf_split}.*.jsonl"]
    else:  # ptb
        p = root / "ptb" / f"ptb.{s}.txt"
        if p.is_file():
            return [line.strip() for line in read_text(p, "data file").splitlines()]
        candidates = [p]
    raise CompressError(
        f"{source} split '{split}' not found in data directory '{root}' (looked for {', '.join(map(str, candidates))}); "
        "add the file, or use another source or split"
    )


def _hub_named(source: str, split: str) -> list[str]:
    from ..hub import hub_reachable

    if not hub_reachable():
        raise CompressError(
            f"no local data directory for {source} and the Hugging Face hub is unreachable: "
            f"pass --data-dir DIR or set {DATA_DIR_ENV} to a folder holding wikitext-2-raw/, c4/, ptb/"
        )
    try:
        import datasets
    except ImportError:
        raise CompressError(
            f"no local data directory and the 'datasets' package is missing: pass --data-dir or set {DATA_DIR_ENV}, "
            "or pip install 'compress[hub]'"
        ) from None
    try:
        if source == "wikitext2":
            return list(datasets.load_dataset("wikitext", "wikitext-2-raw-v1", split=split)["text"])
        if source == "ptb":
            return list(datasets.load_dataset("ptb_text_only", "penn_treebank", split=split)["sentence"])
        shard = "en/c4-train.00000-of-01024.json.gz" if split == "train" else "en/c4-validation.00000-of-00008.json.gz"
        hf_split = "train" if split == "train" else "validation"
        return list(datasets.load_dataset("allenai/c4", data_files={hf_split: shard}, split=hf_split)["text"])
    except Exception as e:  # network, missing dataset, ...
        raise CompressError(
            f"could not load {source} ({split}) from the hub ({type(e).__name__}); offline? "
            f"pass --data-dir or set {DATA_DIR_ENV} to a local data folder"
        ) from None


def load_documents(source: str, split: str = "train", data_dir: str | Path | None = None) -> list[str]:
    """Documents of a named source (wikitext2, c4, ptb) or of a local file."""
    if source not in NAMED_SOURCES:
        p = Path(source).expanduser()
        if not p.is_file():
            raise CompressError(
                f"unknown data source '{source}': use one of {', '.join(NAMED_SOURCES)} or a path to a .txt/.jsonl/.parquet file"
            )
        return _read_file(p)
    root = resolve_data_dir(data_dir)
    if root is not None:
        return _local_named(source, split, root)
    return _hub_named(source, split)


def join_documents(source: str, docs: list[str]) -> str:
    """The evaluation/calibration text: PTB sentences joined by spaces, other sources by blank lines
    (the convention of the GPTQ/SparseGPT evaluation code)."""
    return (" " if source == "ptb" else "\n\n").join(docs)


def calibration_ids(tokenizer: Any, cfg: CalibConfig, data_dir: str | Path | None = None, docs: list[str] | None = None) -> torch.Tensor:
    """``cfg.samples`` sequences of ``cfg.seqlen`` tokens, shape (samples, seqlen), reproducible;
    ``docs``: the source's documents when the caller has read them already."""
    docs = load_documents(cfg.source, cfg.split, data_dir) if docs is None else docs
    text = join_documents(cfg.source, docs)
    ids = tokenizer(text, return_tensors="pt", add_special_tokens=False).input_ids[0]
    n_chunks = ids.numel() // cfg.seqlen
    if n_chunks < cfg.samples:
        raise CompressError(
            f"calibration source '{cfg.source}' has {ids.numel()} tokens, fewer than samples x seqlen = "
            f"{cfg.samples} x {cfg.seqlen}; lower --calib-samples/--calib-seqlen or use a larger source"
        )
    g = torch.Generator().manual_seed(cfg.seed)
    picks = torch.randperm(n_chunks, generator=g)[: cfg.samples]
    chunks = ids[: n_chunks * cfg.seqlen].view(n_chunks, cfg.seqlen)
    return chunks[picks].clone()
