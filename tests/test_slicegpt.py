"""SliceGPT: computational invariance, slicing, tied embeddings, checkpoints, composition."""

from __future__ import annotations

import copy
from pathlib import Path

import pytest
import torch

from compress import compress, load
from compress.checkpoint import export_dense, save_checkpoint
from compress.errors import CompressError, ConfigError
from compress.models import count_parameters
from compress.modules.sliced import MixedHead, make_sliced

from .conftest import DATA_DIR, STORIES, make_tiny, needs


def _model(family: str, tied: bool) -> torch.nn.Module:
    m = make_tiny(family)
    if tied:
        m.lm_head.weight = m.model.embed_tokens.weight
        m.config.tie_word_embeddings = True
    with torch.no_grad():  # non-trivial norm scales, so that fusion matters
        for n, p in m.named_parameters():
            if "norm" in n:
                p.mul_(torch.rand(p.shape, generator=torch.Generator().manual_seed(len(n))) + 0.5)
    return m


def _logits(m: torch.nn.Module, ids: torch.Tensor) -> torch.Tensor:
    with torch.no_grad():
        return m(input_ids=ids).logits


@pytest.mark.parametrize("tied", [False, True])
def test_fusion_and_rotation_without_slicing_is_exact(tiny_family: str, tied: bool, calib_ids: torch.Tensor) -> None:
    m = _model(tiny_family, tied)
    ref = _logits(m, calib_ids)
    compress(m, ["slicegpt:sparsity=0"], calib_ids)
    assert torch.allclose(_logits(m, calib_ids), ref, atol=1e-5, rtol=1e-4)
    assert isinstance(m.lm_head, MixedHead) == tied


@pytest.mark.parametrize("tied", [False, True])
@pytest.mark.parametrize("basis", ["joint", "embedding"])
def test_slicing_a_residual_stream_of_lower_rank_is_exact(tiny_family: str, tied: bool, basis: str) -> None:
    """When every write to the residual stream (embedding, o_proj, down_proj) lies in a 24-dim
    subspace of the 32-dim stream, slicing to 24 loses nothing: the logits are unchanged, RMSNorm's
    epsilon included."""
    m = _model(tiny_family, tied)
    P = torch.linalg.qr(torch.randn(32, 32, generator=torch.Generator().manual_seed(1)))[0][:, :24]
    proj = P @ P.T
    with torch.no_grad():
        m.model.embed_tokens.weight.copy_(m.model.embed_tokens.weight @ proj)
        for layer in m.model.layers:
            layer.self_attn.o_proj.weight.copy_(proj @ layer.self_attn.o_proj.weight)
            layer.mlp.down_proj.weight.copy_(proj @ layer.mlp.down_proj.weight)
    ids = torch.randint(0, 128, (4, 16), generator=torch.Generator().manual_seed(2))
    ref = _logits(m, ids)
    compress(m, [f"slicegpt:sparsity=0.25,tied_basis={basis}"], ids)
    assert m.model.embed_tokens.weight.shape[1] == 24
    assert torch.allclose(_logits(m, ids), ref, atol=2e-6, rtol=1e-5), (_logits(m, ids) - ref).abs().max()


def test_joint_basis_with_zero_head_weight_is_the_papers_basis(calib_ids: torch.Tensor) -> None:
    outs = {}
    for opts in ("tied_basis=embedding", "head_weight=0", "head_weight=10"):
        m = _model("llama", True)
        compress(m, [f"slicegpt:sparsity=0.25,{opts}"], calib_ids)
        outs[opts] = _logits(m, calib_ids)
    assert torch.allclose(outs["head_weight=0"], outs["tied_basis=embedding"], atol=1e-5)
    assert not torch.allclose(outs["head_weight=10"], outs["tied_basis=embedding"], atol=1e-3)


@pytest.mark.parametrize("family", ["qwen2", "phi3"])
def test_sliced_forward_with_identity_shortcuts_matches_upstream(family: str, calib_ids: torch.Tensor) -> None:
    """The sliced forward runs the pieces the family's adapter names: with identity shortcuts it is the
    upstream forward (Llama layout, and Phi-3's fused projections with their residual dropouts)."""
    from compress.adapters import get_adapter
    from compress.modules.sliced import SlicedLayout

    m = make_tiny(family)
    ref = _logits(m, calib_ids)
    a = get_adapter(m)
    for layer in m.model.layers:
        make_sliced(layer, torch.eye(32), torch.eye(32), SlicedLayout(a.attn_norm, a.attention, a.mlp_norm, a.mlp))
    assert torch.allclose(_logits(m, calib_ids), ref, atol=1e-6)


@pytest.mark.parametrize("tied", [False, True])
def test_slicing_removes_the_promised_dimensions_and_reloads(tied: bool, calib_ids: torch.Tensor, tmp_path: Path) -> None:
    m = _model("llama", tied)
    dense_params = count_parameters(m)
    report = compress(m, ["slicegpt:sparsity=0.3"], calib_ids)  # 32 * 0.7 = 22.4 -> 24 (multiple of 8)
    d_new = 24
    assert m.model.embed_tokens.weight.shape == (128, d_new)
    for layer in m.model.layers:
        assert layer.self_attn.q_proj.in_features == d_new and layer.self_attn.o_proj.out_features == d_new
        assert layer.mlp.gate_proj.in_features == d_new and layer.mlp.down_proj.out_features == d_new
        assert layer.attn_shortcut.shape == (d_new, d_new)
    # per unit of hidden size removed: embedding (and an untied head), per layer q 32 + k 16 + v 16 + o 32
    # + gate 64 + up 64 + down 64 = 288 and two norms, and the final norm; added: two shortcuts per layer
    per_unit = 128 * (1 if tied else 2) + 2 * (288 + 2) + 1
    expected = dense_params - (32 - d_new) * per_unit + 2 * 2 * d_new * d_new
    if tied:
        expected += d_new * d_new  # the head's mix matrix
    assert count_parameters(m) == expected
    assert report.summary()["model_params_after"] == expected
    assert "Slicing: hidden 32 -> 24; sparsity 0.3 requested, 0.2500 used" in report.to_markdown()
    out = _logits(m, calib_ids)
    save_checkpoint(m, None, tmp_path / "c", {})
    m2, _ = load(tmp_path / "c")
    assert torch.equal(_logits(m2, calib_ids), out)
    if tied:
        assert m2.lm_head.weight is m2.model.embed_tokens.weight
    with pytest.raises(CompressError, match="no dense export"):
        export_dense(m, None, tmp_path / "d")


def test_slicing_composes_with_later_passes(calib_ids: torch.Tensor) -> None:
    for second in ("svd-llm:ratio=0.2", "gptq:bits=4,group=8"):
        m = _model("mistral", False)
        report = compress(m, ["slicegpt:sparsity=0.25", second], calib_ids)
        assert {r.pass_name for r in report.records} == {"slicegpt", second.split(":")[0]}
        assert torch.isfinite(_logits(m, calib_ids)).all()


def test_bad_inputs(calib_ids: torch.Tensor) -> None:
    from transformers import AutoConfig, AutoModelForCausalLM

    with pytest.raises(ConfigError, match="must be in"):
        compress(make_tiny("llama"), ["slicegpt:sparsity=1.0"], calib_ids)
    # hidden 64, MLP 16: two 56x56 shortcuts per layer (12,544) outweigh what slicing 8 dimensions removes (8 x 741)
    wide = make_tiny("llama", hidden=64, intermediate=16)
    with pytest.raises(ConfigError, match=r"larger than the dense one.*add 12,544 .* removes only 5,928; use sparsity >= 0.250 \(hidden 48\)"):
        compress(wide, ["slicegpt:sparsity=0.125"], calib_ids)
    with pytest.raises(ConfigError, match="tied_basis"):
        compress(make_tiny("llama"), ["slicegpt:sparsity=0.25,tied_basis=nope"], calib_ids)
    cfg = AutoConfig.for_model("opt", vocab_size=128, hidden_size=32, ffn_dim=64, num_hidden_layers=2, num_attention_heads=4,
                               max_position_embeddings=128, word_embed_proj_dim=32)
    opt = AutoModelForCausalLM.from_config(cfg)
    with pytest.raises(ConfigError, match="adapter 'generic' does not describe.*missing: embed"):
        compress(opt, ["slicegpt:sparsity=0.2"], calib_ids)


@needs(STORIES)
@needs(DATA_DIR)
def test_stories_slicing_rises_smoothly() -> None:
    from compress.calib.data import CalibConfig, calibration_ids
    from compress.eval.perplexity import perplexity
    from compress.models import load_model

    model, tok, _ = load_model(STORIES, dtype="float32")
    ids = calibration_ids(tok, CalibConfig(samples=16, seqlen=256), DATA_DIR)

    def ppl(m: torch.nn.Module) -> float:
        return perplexity(m, tok, "wikitext2", seqlen=512, max_windows=4, data_dir=DATA_DIR)["value"]

    dense = ppl(model)
    values = []
    for sp in (0.0, 0.25, 0.375):  # hidden 64, 48, 40 (0.1 -> 56 would make the model larger: refused)
        m = copy.deepcopy(model)
        m.lm_head.weight = m.model.embed_tokens.weight
        compress(m, [f"slicegpt:sparsity={sp}"], ids)
        values.append(ppl(m))
    assert values[0] == pytest.approx(dense, rel=1e-3)
    # a smooth rise, not a cliff (on this out-of-domain text a light slice may even help)
    assert values[1] < values[2] < 2 * dense, (dense, values)
