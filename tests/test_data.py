"""Calibration sampling and text sources."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from compress.calib.data import CalibConfig, calibration_ids, load_documents
from compress.errors import CompressError

from .conftest import DATA_DIR, STORIES, needs


@pytest.fixture(scope="module")
def tokenizer():  # type: ignore[no-untyped-def]
    from transformers import AutoTokenizer

    if not STORIES.exists():
        pytest.skip("stories260k not present")
    return AutoTokenizer.from_pretrained(STORIES)


def test_local_files(tmp_path: Path, tokenizer) -> None:  # type: ignore[no-untyped-def]
    txt = tmp_path / "a.txt"
    txt.write_text("Once upon a time there was a cat. " * 200)
    jl = tmp_path / "b.jsonl"
    jl.write_text("\n".join(json.dumps({"text": f"The dog number {i} ran home."}) for i in range(300)))
    for path in (txt, jl):
        ids = calibration_ids(tokenizer, CalibConfig(source=str(path), samples=4, seqlen=64, seed=0))
        assert ids.shape == (4, 64)
        again = calibration_ids(tokenizer, CalibConfig(source=str(path), samples=4, seqlen=64, seed=0))
        assert torch.equal(ids, again)
        other = calibration_ids(tokenizer, CalibConfig(source=str(path), samples=4, seqlen=64, seed=1))
        assert not torch.equal(ids, other)
    # sequences are distinct chunks
    ids = calibration_ids(tokenizer, CalibConfig(source=str(jl), samples=8, seqlen=32, seed=3))
    assert len({tuple(r.tolist()) for r in ids}) == 8


def test_too_few_tokens_is_an_error(tmp_path: Path, tokenizer) -> None:  # type: ignore[no-untyped-def]
    p = tmp_path / "small.txt"
    p.write_text("a tiny file")
    with pytest.raises(CompressError, match="fewer than samples x seqlen"):
        calibration_ids(tokenizer, CalibConfig(source=str(p), samples=4, seqlen=64))


def test_bad_sources(tmp_path: Path) -> None:
    with pytest.raises(CompressError, match="unknown data source"):
        load_documents("nosuchset")
    bad = tmp_path / "x.csv"
    bad.write_text("a,b")
    with pytest.raises(CompressError, match="unsupported data file"):
        load_documents(str(bad))
    with pytest.raises(CompressError, match="data directory .* does not exist"):
        load_documents("c4", data_dir=tmp_path / "missing")
    with pytest.raises(CompressError, match="wikitext2 split 'train' not found"):
        load_documents("wikitext2", "train", data_dir=tmp_path)
    with pytest.raises(CompressError):
        CalibConfig(samples=0)


@needs(DATA_DIR)
def test_shared_sources_load() -> None:
    wt = load_documents("wikitext2", "test", DATA_DIR)
    assert len(wt) == 4358
    c4 = load_documents("c4", "train", DATA_DIR)
    assert len(c4) == 1000
    ptb = load_documents("ptb", "test", DATA_DIR)
    assert len(ptb) > 3000
