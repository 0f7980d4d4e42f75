"""The engine's promises: configs built in Python are the same call as shorthand text and validate
themselves; every bad input is one line before any layer is compressed (and nothing is written);
the checkpoint is written before exports and evaluation, which can fail without costing it; a
model-level pass takes its statistics from the engine in sweeps too; the summary speaks in bytes."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest
import torch

from compress import CalibConfig, EvalSpec, compress
from compress.errors import CompressError, ConfigError

from .conftest import DATA_DIR, STORIES, make_tiny, needs


def _state(model: torch.nn.Module) -> dict[str, torch.Tensor]:
    return {k: v.clone() for k, v in model.state_dict().items()}


def _unchanged(model: torch.nn.Module, before: dict[str, torch.Tensor]) -> bool:
    after = model.state_dict()
    return set(after) == set(before) and all(torch.equal(before[k], after[k]) for k in before)


def test_config_objects_are_the_same_call_as_shorthand(calib_ids: torch.Tensor) -> None:
    from compress.passes.quant import GPTQConfig

    a, b = make_tiny("llama"), make_tiny("llama")
    ra = compress(a, [GPTQConfig(bits=3, group=16)], calib_ids)
    rb = compress(b, ["gptq:bits=3,group=16"], calib_ids)
    assert ra.recipe == rb.recipe
    assert all(torch.equal(x, y) for x, y in zip(a.state_dict().values(), b.state_dict().values()))


@pytest.mark.parametrize("build, match", [
    (lambda: __import__("compress.passes.quant", fromlist=["x"]).GPTQConfig(bits=5), "pass 'gptq' option 'bits' must be one of 2, 3, 4, 8, got 5"),
    (lambda: __import__("compress.passes.quant", fromlist=["x"]).GPTQConfig(bits="3"), "pass 'gptq' option 'bits': expected an integer"),
    (lambda: __import__("compress.passes.lowrank", fromlist=["x"]).SVDLLMConfig(ratio=1.5), r"pass 'svd-llm' option 'ratio' must be in \(0.0, 1.0\)"),
    (lambda: __import__("compress.passes.sparse", fromlist=["x"]).MagnitudeConfig(pattern="3:2"), "pass .magnitude.: pattern .3:2. is not N:M"),
    (lambda: __import__("compress.passes.sparse", fromlist=["x"]).WandaConfig(pattern="2:4", sparsity=0.5), "pass 'wanda': give pattern=N:M or sparsity=S"),
    (lambda: __import__("compress.passes.eora", fromlist=["x"]).EoRAConfig(rank=0), "pass 'eora' option 'rank'"),
])
def test_configs_validate_when_built(build: Any, match: str) -> None:
    from compress.registry import all_passes

    all_passes()  # configs learn their pass name at registration
    with pytest.raises(ConfigError, match=match):
        build()


def test_one_config_class_per_pass_and_capabilities_from_the_instance() -> None:
    from compress.passes.quant import RTNConfig, RTNPass
    from compress.registry import all_passes

    passes = all_passes()
    assert len({cls.config_cls for cls in passes.values()}) == len(passes)
    ada = RTNPass(RTNConfig(dim="ada"))
    assert ada.caps.requires_calibration and ada.caps.uses_layer_inputs
    assert RTNPass(RTNConfig()).caps.requires_calibration is False  # an instance never changes the class
    assert not isinstance(getattr(RTNPass, "requires_calibration", None), bool)
    from compress.passes.quant import GPTQConfig

    with pytest.raises(ConfigError, match="pass 'rtn' takes a RTNConfig, got GPTQConfig"):
        RTNPass(GPTQConfig())  # a subclass is another pass's config: the registry checks exact types


def test_a_config_that_is_not_a_pass_is_refused() -> None:
    from compress.config import PassConfig

    class Mine(PassConfig):
        pass

    with pytest.raises(ConfigError, match="Mine is not the config of a registered pass"):
        compress(make_tiny("llama"), [Mine()], None)


@pytest.mark.parametrize("recipe, match", [
    (["gptq:bits=4", "slicegpt:sparsity=0.25"], "slicegpt must come before gptq: it rotates dense weights"),
    (["svd:ratio=0.3", "slicegpt:sparsity=0.25"], "slicegpt must come before svd"),
    (["sparsegpt:pattern=2:4", "rtn:bits=4,group=16"], "rtn cannot follow sparsegpt"),
    (["eora:rank=4"], "put a compressing pass before it"),
    (["svd:ratio=0.3,targets=foo.*"], "targets=foo.* matches no linear of this model"),
    (["gptq:bits=4,group=48"], r"model.layers.0.self_attn.q_proj \(32x32\).*choose another group size"),
    (["bcq:bits=3,group=12"], r"BCQ group size 12 must divide the input dimension 32 and be a multiple of 8 \(sizes that work: 8, 16, 32; group=0"),
    (["armor:block=12"], "block size 12 must be a multiple of 4"),
    (["lq-lora:rank=40,group=16"], "lq-lora rank 40 must be below 32"),
    (["svd:ratio=0.3", "eora:rank=40"], "eora rank 40 must be below 32"),
    (["slicegpt:sparsity=0.25", "gptq:bits=4,group=32"], r"gptq: model.layers.0.self_attn.q_proj \(32x24 after slicegpt\).*group size"),
])
def test_bad_recipes_are_refused_before_any_layer(recipe: list[str], match: str, calib_ids: torch.Tensor) -> None:
    model = make_tiny("llama")
    before = _state(model)
    with pytest.raises(ConfigError, match=match) as e:
        compress(model, recipe, calib_ids)
    assert "\n" not in str(e.value)
    assert _unchanged(model, before)


def test_non_finite_source_weights_are_named(calib_ids: torch.Tensor) -> None:
    model = make_tiny("llama")
    with torch.no_grad():
        model.model.layers[1].mlp.up_proj.weight[3, 5] = float("nan")
    before = _state(model)
    with pytest.raises(CompressError, match=r"source weight 'model.layers.1.mlp.up_proj.weight' has 1 non-finite values"):
        compress(model, ["svd-llm:ratio=0.2"], calib_ids)
    assert all(torch.equal(before[k], v) or torch.isnan(v).any() for k, v in model.state_dict().items())


def test_model_level_pass_in_a_sweep_gets_its_inputs(tmp_path: Path) -> None:
    """A sweep mixing slicegpt with a Gram-using pass: every point runs (slicegpt observes the
    stream of the model being sliced; svd-llm uses the cached dense profile)."""
    from compress.sweeps import make_grid, sweep

    model = make_tiny("llama")

    class Tok:
        def __call__(self, text: str, return_tensors: str = "pt", **k: Any) -> Any:
            ids = torch.tensor([[ord(c) % 128 for c in text[:4000]]])
            return type("E", (), {"input_ids": ids})()

    grid = make_grid([("slicegpt", {}, "sparsity", [0.25]), ("svd-llm", {}, "ratio", [0.2])])
    calib = CalibConfig(samples=4, seqlen=32)
    res = sweep((model, Tok()), grid, tmp_path / "sw", eval_spec=EvalSpec(ppl=("wikitext2",), ppl_seqlen=64, max_windows=2),
                calib=calib, data_dir=DATA_DIR, cache_root=tmp_path / "cache")
    assert [r["status"] for r in res.rows] == ["ok", "ok"], [r.get("error") for r in res.rows]


def test_summary_speaks_in_bytes(calib_ids: torch.Tensor) -> None:
    from compress.report import summary_lines

    report = compress(make_tiny("llama", tied=True), ["gptq:bits=4,group=16", "eora:rank=4"], calib_ids)
    lines = summary_lines(report.summary())
    assert "bytes" in lines[0] and "bits per original weight" in lines[0] and "bytes" in lines[1]
    s = report.summary()
    assert s["model_bytes_after"] < s["model_bytes_before"]
    rows = report.layer_rows()
    assert [r["layer"] for r in rows] == [0, 1] and all(r["modules"] == 7 and r["passes"] == ["gptq", "eora"] for r in rows)
    md = report.to_markdown()
    assert "## Per decoder layer" in md and "## Per-module table" in md


@needs(STORIES)
@needs(DATA_DIR)
class TestRun:
    """api.run on stories260k (max_position_embeddings 512)."""

    def test_evaluation_options_are_checked_before_compression(self, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
        import compress.api as api

        called = []
        monkeypatch.setattr(api, "compress", lambda *a, **k: called.append(1))
        out = tmp_path / "o"
        with pytest.raises(CompressError, match="--ppl-seqlen 2048 exceeds the model's max_position_embeddings 512; pass --ppl-seqlen 512"):
            api.run(STORIES, ["gptq:bits=4,group=0", "eora:rank=8"], out, eval_spec=EvalSpec(ppl=("wikitext2",), max_windows=4),
                    data_dir=DATA_DIR)
        with pytest.raises(CompressError, match="unknown perplexity dataset 'wikitext3'"):
            api.run(STORIES, ["svd:ratio=0.2"], out, eval_spec=EvalSpec(ppl=("wikitext3",)), data_dir=DATA_DIR)
        assert not called and not out.exists()

    @pytest.mark.parametrize("recipe, export, match", [
        (["svd:ratio=0.2"], ("gptq",), "--export gptq needs every decoder linear quantized"),
        (["gptq:bits=4,group=0,dim=ic"], ("gptq",), "per-output-channel groups only"),
        (["slicegpt:sparsity=0.25"], ("dense",), "--export dense is not possible after slicegpt"),
        (["gptq:bits=4,group=0"], ("peft",), "--export peft needs low-rank branches"),
        (["svd:ratio=0.2"], ("onnx",), "unknown export format 'onnx'; available: dense, gptq, compressed-tensors, peft"),
    ])
    def test_exports_the_recipe_cannot_produce_are_refused_before_loading(
        self, recipe: list[str], export: tuple[str, ...], match: str, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
    ) -> None:
        import compress.api as api

        monkeypatch.setattr(api, "load_model", lambda *a, **k: pytest.fail("the model was loaded"))
        with pytest.raises(CompressError, match=match):
            api.run(STORIES, recipe, tmp_path / "o", export=export, data_dir=DATA_DIR)
        assert not (tmp_path / "o").exists()

    def test_output_that_is_a_file_is_refused(self, tmp_path: Path) -> None:
        import compress.api as api

        f = tmp_path / "file"
        f.write_text("x")
        with pytest.raises(CompressError, match="is a file; choose another --out"):
            api.run(STORIES, ["svd:ratio=0.2"], f)

    def test_missing_calibration_source_is_refused_before_loading(self, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
        import compress.api as api

        monkeypatch.setattr(api, "load_model", lambda *a, **k: pytest.fail("the model was loaded"))
        with pytest.raises(CompressError, match="unknown data source 'nowhere.txt'"):
            api.run(STORIES, ["svd-llm:ratio=0.2"], tmp_path / "o", calib=CalibConfig(source="nowhere.txt"), data_dir=DATA_DIR)

    def test_failed_evaluation_keeps_the_checkpoint_and_says_how_to_rerun(self, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
        import compress.api as api
        import compress.drivers.finish as finish

        def broken(*a: Any, **k: Any) -> Any:
            raise RuntimeError("CUDA out of memory")

        monkeypatch.setattr(finish, "evaluate", broken)
        out = tmp_path / "o"
        spec = EvalSpec(ppl=("wikitext2",), ppl_seqlen=512, max_windows=2)
        with pytest.raises(CompressError) as e:
            api.run(STORIES, ["gptq:bits=4,group=0", "eora:rank=8"], out, calib=CalibConfig(samples=4, seqlen=64),
                    eval_spec=spec, data_dir=DATA_DIR, export=("peft",))
        msg = str(e.value)
        assert "evaluation failed (RuntimeError: CUDA out of memory)" in msg
        assert f"rerun only this step with: compress eval {out} --ppl wikitext2 --ppl-seqlen 512 --max-windows 2" in msg
        for f in ("manifest.json", "model.safetensors", "report.json", "peft/adapter_config.json"):
            assert (out / f).is_file(), f
        from compress import load

        m, _ = load(out)
        assert type(m.model.layers[0].mlp.down_proj).__name__ == "LoRALinear"


def test_data_driven_pass_before_a_model_level_pass_sees_the_unsliced_stream(calib_ids: torch.Tensor) -> None:
    """wanda observes every layer before slicegpt rotates the embeddings and the stream (its own layer loop)."""
    model = make_tiny("llama")
    report = compress(model, ["wanda:sparsity=0.5", "slicegpt:sparsity=0.25"], calib_ids)
    assert {r.pass_name for r in report.records} == {"wanda", "slicegpt"}
    assert torch.isfinite(model(input_ids=calib_ids[:2]).logits).all()


def test_original_weights_after_a_second_layer_loop_are_refused_up_front(calib_ids: torch.Tensor) -> None:
    model = make_tiny("llama")
    before = _state(model)
    with pytest.raises(ConfigError, match="eora needs each layer's weights from before the recipe, but it runs after lord"):
        compress(model, ["gptq:bits=4,group=16,targets=mlp.*", "lord:ratio=0.3,targets=self_attn.*", "eora:rank=2"], calib_ids)
    assert _unchanged(model, before)


def test_layers_only_a_model_level_pass_changed_are_not_refused_by_eora(calib_ids: torch.Tensor) -> None:
    """After slicegpt rotates every layer, eora compensates what svd did to the MLP and leaves the
    attention linears (rotated, not compressed) alone instead of refusing them up front."""
    model = make_tiny("llama")
    report = compress(model, ["slicegpt:sparsity=0.25", "svd:ratio=0.3,targets=mlp.*", "eora:rank=2"], calib_ids)
    wrapped = {r.name.split(".", 3)[-1] for r in report.records if r.pass_name == "eora" and r.module_type == "LoRALinear"}
    assert wrapped and all(n.startswith("mlp.") for n in wrapped), wrapped
