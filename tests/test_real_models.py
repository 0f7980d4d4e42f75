"""Real trained models from ../shared: quality orderings and loading paths."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from compress import compress, load
from compress.calib.data import CalibConfig, calibration_ids
from compress.eval.perplexity import perplexity
from compress.models import load_model

from .conftest import DATA_DIR, SMOLLM, STORIES, needs

pytestmark = [needs(STORIES), needs(DATA_DIR)]


@pytest.fixture(scope="module")
def stories():  # type: ignore[no-untyped-def]
    model, tok, _ = load_model(STORIES, dtype="float32")
    ids = calibration_ids(tok, CalibConfig(source="c4", samples=16, seqlen=256, seed=0), DATA_DIR)
    return model, tok, ids


def _ppl(model: torch.nn.Module, tok: object) -> float:
    return perplexity(model, tok, "wikitext2", seqlen=512, max_windows=4, data_dir=DATA_DIR)["value"]


def test_stories_low_rank_family_orderings(stories) -> None:  # type: ignore[no-untyped-def]
    import copy

    model, tok, ids = stories
    dense = _ppl(model, tok)
    ppl = {}
    for name in ("svd", "asvd", "svd-llm"):
        m = copy.deepcopy(model)
        compress(m, [f"{name}:ratio=0.2"], ids)
        ppl[name] = _ppl(m, tok)
    assert dense < ppl["svd-llm"] < ppl["asvd"] < ppl["svd"], (dense, ppl)
    # more compression, more loss
    m = copy.deepcopy(model)
    compress(m, ["svd-llm:ratio=0.4"], ids)
    assert _ppl(m, tok) > ppl["svd-llm"]


def test_stories_run_and_reload_bit_exact(stories, tmp_path: Path) -> None:  # type: ignore[no-untyped-def]
    from compress import run

    _, tok, _ = stories
    out = tmp_path / "o"
    run(STORIES, ["svd-llm:ratio=0.3"], out, calib=CalibConfig(samples=8, seqlen=128), data_dir=DATA_DIR, device="cpu")
    m, t = load(out)
    ids = tok("Once upon a time there was a little girl.", return_tensors="pt").input_ids
    with torch.no_grad():
        a = m(input_ids=ids).logits
    m2, _ = load(out)
    with torch.no_grad():
        b = m2(input_ids=ids).logits
    assert torch.equal(a, b)
    assert t is not None
    # tied embedding and head stay tied after reload
    assert m.lm_head.weight.data_ptr() == m.model.embed_tokens.weight.data_ptr()


@pytest.mark.slow
@needs(SMOLLM)
def test_gguf_directory_loads_as_llama_with_gqa() -> None:
    pytest.importorskip("gguf")
    model, tok, info = load_model(SMOLLM, device="cpu")
    assert info["gguf_file"].endswith(".gguf") and info["dtype"] == "float32"
    cfg = model.config
    assert cfg.model_type == "llama" and cfg.num_hidden_layers == 30
    assert (cfg.num_attention_heads, cfg.num_key_value_heads) == (9, 3)
    ids = tok("The capital of France is", return_tensors="pt").input_ids
    with torch.no_grad():
        nxt = model(input_ids=ids).logits[0, -1].argmax()
    assert tok.decode(nxt).strip() == "Paris"
