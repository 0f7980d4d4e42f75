"""AWQ: the scale fold is exact, the search never does worse than plain rounding on what it measures,
it composes with rtn and gptq (and streams), and bad recipes are refused before any compute."""

from __future__ import annotations

import pytest
import torch

from compress import compress
from compress.adapters import get_adapter
from compress.errors import ConfigError
from compress.passes.awq import _fold
from compress.solvers.awq import kv_expand

from .conftest import make_tiny


def _logits(model: torch.nn.Module, ids: torch.Tensor) -> torch.Tensor:
    with torch.no_grad():
        return model(input_ids=ids).logits


@pytest.mark.parametrize("family", ["llama", "qwen2", "qwen3"])
def test_fold_leaves_the_function_unchanged(family: str, calib_ids: torch.Tensor) -> None:
    """Random scales folded into every pair (norm → q/k/v, v → o with grouped-query heads, norm →
    gate/up, up → down): the model's outputs stay the same to float tolerance, the weights change."""
    model = make_tiny(family)
    a = get_adapter(model)
    ids = calib_ids[:2]
    ref = _logits(model, ids)
    cfg = model.config
    hd = cfg.head_dim if getattr(cfg, "head_dim", None) else cfg.hidden_size // cfg.num_attention_heads
    g = torch.Generator().manual_seed(0)
    before = a.layers(model)[0].get_submodule(a.mlp_output).weight.clone()
    for layer in a.layers(model):
        def scale(n: int) -> torch.Tensor:
            return torch.exp(torch.randn(n, generator=g))

        get = layer.get_submodule
        _fold(get(a.attn_norm), [get(n) for n in a.attn_inputs], scale(cfg.hidden_size), None)
        v, o = get(a.v_proj), get(a.attn_output)
        expand = None if v.out_features == o.in_features else kv_expand(cfg.num_attention_heads, cfg.num_key_value_heads, hd)
        _fold(v, [o], scale(v.out_features), expand)
        _fold(get(a.mlp_norm), [get(n) for n in a.mlp_inputs], scale(cfg.hidden_size), None)
        _fold(get(a.up_proj), [get(a.mlp_output)], scale(cfg.intermediate_size), None)
    assert not torch.allclose(a.layers(model)[0].get_submodule(a.mlp_output).weight, before)
    torch.testing.assert_close(_logits(model, ids), ref, rtol=1e-4, atol=1e-4)


def test_kv_expand_maps_each_query_head_to_its_value_head() -> None:
    e = kv_expand(heads=4, kv_heads=2, head_dim=3)
    assert e.tolist() == [0, 1, 2, 0, 1, 2, 3, 4, 5, 3, 4, 5]


@pytest.mark.parametrize("quantizer", ["rtn:bits=3,group=16", "gptq:bits=3,group=16"])
def test_awq_search_never_loses_to_plain_rounding(quantizer: str, calib_ids: torch.Tensor) -> None:
    model = make_tiny("llama")
    report = compress(model, ["awq:grid=5", quantizer], calib_ids)
    awq = [r for r in report.records if r.pass_name == "awq"]
    assert len(awq) == 14  # 2 layers × (q, k, v, o, gate, up, down)
    for r in awq:
        assert r.info["awq_error_vs_plain"] <= 1.0 + 1e-12
        assert r.info["awq_for"] == quantizer
    assert any(r.info["awq_alpha"] is not None for r in awq)
    # the quantizer ran on the scaled weights
    assert {r.pass_name for r in report.records} == {"awq", quantizer.split(":")[0]}


def test_awq_only_rescales_the_groups_the_quantizer_targets(calib_ids: torch.Tensor) -> None:
    model = make_tiny("llama")
    report = compress(model, ["awq:grid=3", "rtn:bits=4,group=16,targets=mlp.*"], calib_ids)
    names = {r.name.split(".", 3)[-1] for r in report.records if r.pass_name == "awq"}
    assert names == {"mlp.gate_proj", "mlp.up_proj", "mlp.down_proj"}


@pytest.mark.parametrize(("recipe", "message"), [
    (["awq"], "awq only rescales weights for the rtn or gptq pass that follows it, and nothing follows it here"),
    (["awq", "svd:ratio=0.3"], "and svd follows it here"),
    (["rtn:bits=4,group=16", "awq", "gptq:bits=4,group=16"], "awq must come before rtn"),
    (["magnitude:sparsity=0.5", "awq", "gptq:bits=4,group=16"], "but magnitude runs before it here: put awq first"),
    (["awq", "gptq:bits=4,group=16,dim=ic"], "cancel out under gptq:dim=ic"),
])
def test_bad_awq_recipes_are_refused_before_any_compute(recipe: list[str], message: str, calib_ids: torch.Tensor) -> None:
    model = make_tiny("llama")
    before = {k: v.clone() for k, v in model.state_dict().items()}
    with pytest.raises(ConfigError, match=message):
        compress(model, recipe, calib_ids)
    assert all(torch.equal(before[k], v) for k, v in model.state_dict().items())


def test_awq_streams() -> None:
    from compress.passes.awq import AWQConfig, AWQPass
    from compress.passes.quant import RTNConfig, RTNPass
    from compress.planning import stream_blocker

    assert stream_blocker([AWQPass(AWQConfig()), RTNPass(RTNConfig())]) is None


def test_awq_streamed_writes_the_bytes_of_a_whole_model_run(tmp_path) -> None:  # type: ignore[no-untyped-def]
    from compress.api import run
    from compress.calib.data import CalibConfig

    from .conftest import STORIES
    from .test_stream import TEXT, make_model

    if not STORIES.is_dir():
        pytest.skip("needs ../shared/models/stories260k (its tokenizer)")
    src = make_model(tmp_path / "m", layers=2)
    (tmp_path / "calib.txt").write_text(TEXT)
    calib = CalibConfig(source=str(tmp_path / "calib.txt"), samples=4, seqlen=32, batch_size=2)
    recipe = ["awq:grid=4", "rtn:bits=4,group=16"]
    a = run(src, recipe, tmp_path / "a", calib=calib, stream="on")
    run(src, recipe, tmp_path / "b", calib=calib, stream="off")
    assert a.model["streamed"]
    assert (tmp_path / "a" / "model.safetensors").read_bytes() == (tmp_path / "b" / "model.safetensors").read_bytes()


def test_awq_samples_limits_the_block_search_to_the_first_batches(calib_ids: torch.Tensor) -> None:
    """samples=k measures the candidates on the calibration batches holding the first k sequences."""
    from compress.pipeline.capture import capture_layer0_inputs
    from compress.pipeline.layer import LayerState

    model = make_tiny("llama")
    a = get_adapter(model)
    inputs = capture_layer0_inputs(model, a, calib_ids, 2, torch.device("cpu"))
    st = LayerState(a.layers(model)[0], 0, inputs, torch.device("cpu"), a)
    assert st._batches_for(None) is None and st._batches_for(3) == 2 and st._batches_for(10**6) is None
    other = torch.nn.Linear(32, 64, bias=False)
    full = st.block_error("mlp", {"mlp.up_proj": other})
    part = st.block_error("mlp", {"mlp.up_proj": other}, samples=2)
    assert 0 < part < full
    report = compress(make_tiny("llama"), ["awq:grid=2,samples=2", "rtn:bits=4,group=16"], calib_ids)
    assert all(r.info["awq_error_vs_plain"] <= 1.0 + 1e-12 for r in report.records if r.pass_name == "awq")
