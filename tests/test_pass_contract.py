"""Every registered pass on every tiny architecture: the model runs, the promised property holds,
the output error is bounded, save -> load is bit-exact, and a fixed seed gives identical bytes."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from compress import compress, load
from compress.checkpoint import export_dense, save_checkpoint
from compress.modules import ArmorLinear, BCQLinear, LoRALinear, LowRankLinear, QuantLinear, Sparse24Linear
from compress.registry import all_passes
from compress.solvers.lowrank import rank_for_ratio
from compress.solvers.sparse import satisfies_nm
from compress.solvers.sparse24 import unpack_24

from .conftest import make_tiny

RATIO = 0.3
# per pass: its options on the tiny models and the relative logit error vs dense it must stay under
CASES = {
    "svd": (f"ratio={RATIO}", 0.6),
    "asvd": (f"ratio={RATIO}", 0.6),
    "svd-llm": (f"ratio={RATIO}", 0.5),
    "lord": (f"ratio={RATIO}", 0.6),
    "rtn": ("bits=4,group=16", 0.05),
    "gptq": ("bits=3,group=16,dim=ada", 0.08),
    "bcq": ("bits=3,group=16", 0.08),
    "magnitude": ("pattern=2:4", 0.6),
    "wanda": ("pattern=2:4", 0.6),
    "sparsegpt": ("pattern=2:4", 0.5),
    "armor": ("block=8,iters=20,lr=1e-3", 0.6),
    "lq-lora": ("bits=3,group=16,rank=4", 0.05),
    "slicegpt": ("sparsity=0.25", 0.6),
}
# passes that refine an earlier pass run after this one in the contract
CHAINED = {"eora": ("gptq:bits=3,group=16", "rank=4", 0.05)}


def test_every_registered_pass_has_a_contract_case() -> None:
    assert set(CASES) | set(CHAINED) == set(all_passes())


def _check_property(pass_name: str, name: str, mod: torch.nn.Module, m: int, n: int) -> None:
    """The promised property of each pass's output module."""
    if pass_name in ("svd", "asvd", "svd-llm", "lord"):
        if pass_name == "lord" and isinstance(mod, torch.nn.Linear):
            return  # lord may keep a layer dense by its budget allocation
        assert isinstance(mod, LowRankLinear), name
        assert mod.weight_in.shape == (mod.rank, n) and mod.weight_out.shape == (m, mod.rank)
        if pass_name != "lord":
            assert mod.rank == rank_for_ratio(m, n, RATIO)
    elif pass_name in ("rtn", "gptq"):
        assert isinstance(mod, QuantLinear), name
        codes = mod.codes()
        assert codes.shape == (m, n) and int(codes.max()) < 2**mod.qspec.bits
    elif pass_name == "slicegpt":
        assert isinstance(mod, torch.nn.Linear) and 24 in (mod.in_features, mod.out_features), name
    elif pass_name in ("lq-lora", "eora"):
        assert isinstance(mod, LoRALinear) and mod.rank == 4, name
    elif pass_name == "bcq":
        assert isinstance(mod, BCQLinear) and mod.bits == 3, name
    else:  # 2:4 pruning
        assert isinstance(mod, (Sparse24Linear, ArmorLinear)), name
        core = unpack_24(mod.values, mod.meta)
        assert core.shape == (m, n) and satisfies_nm(core, 2, 4)


def _logits(model: torch.nn.Module, ids: torch.Tensor) -> torch.Tensor:
    with torch.no_grad():
        return model(input_ids=ids).logits


def _rel(a: torch.Tensor, b: torch.Tensor) -> float:
    return float((a - b).norm() / b.norm())


@pytest.mark.parametrize("pass_name", sorted(set(all_passes()) - set(CHAINED)))
def test_pass_contract(pass_name: str, tiny_family: str, calib_ids: torch.Tensor, tmp_path: Path) -> None:
    model = make_tiny(tiny_family)
    probe = torch.randint(0, 128, (2, 24), generator=torch.Generator().manual_seed(7))
    dense_logits = _logits(model, probe)
    linears_before = {
        n: (m.out_features, m.in_features) for n, m in model.named_modules() if isinstance(m, torch.nn.Linear) and ".layers." in n
    }
    options, max_err = CASES[pass_name]
    report = compress(model, [f"{pass_name}:{options}"], calib_ids)

    # the model still runs and shapes are preserved
    logits = _logits(model, probe)
    assert logits.shape == dense_logits.shape and torch.isfinite(logits).all()
    err = _rel(logits, dense_logits)
    assert err < max_err, err

    # the promised property of every target; parameters removed as promised
    s = report.summary()
    assert s["modules_targeted"] == len(linears_before)
    for name, (m, n) in linears_before.items():
        _check_property(pass_name, name, model.get_submodule(name), m, n)
    if "ratio" in options:
        assert s["target_ratio"] >= RATIO - (0.02 if pass_name == "lord" else 1e-9)
    elif pass_name == "slicegpt":
        assert s["target_ratio"] > 0.2 and s["model_ratio"] > 0
    elif pass_name in ("armor", "lq-lora"):
        assert s["target_bits_per_weight"] < 32  # core + metadata + block-diagonal wrappers
    else:
        assert s["target_bits_per_weight"] <= 17  # quantized, or 2:4 (half the values + 1 bit of metadata)

    # save -> load round-trips bit-exactly
    manifest = {"recipe": report.recipe, "modules": {r.name: {"pass": r.pass_name, "info": r.info} for r in report.records}}
    save_checkpoint(model, None, tmp_path, manifest)
    reloaded, _ = load(tmp_path)
    assert torch.equal(_logits(reloaded, probe), logits)

    # the dense export multiplies out to the same function
    if not all_passes()[pass_name].dense_exportable:
        return
    export_dense(model, None, tmp_path / "dense")
    from transformers import AutoModelForCausalLM

    plain = AutoModelForCausalLM.from_pretrained(tmp_path / "dense", dtype=torch.float32)
    assert torch.allclose(_logits(plain, probe), logits, atol=1e-4, rtol=1e-4)


def test_fixed_seed_gives_identical_checkpoint_bytes(calib_ids: torch.Tensor, tmp_path: Path) -> None:
    outs = []
    for k in range(2):
        model = make_tiny("qwen2")
        report = compress(model, ["svd-llm:ratio=0.25"], calib_ids)
        d = tmp_path / f"run{k}"
        d.mkdir()
        save_checkpoint(model, None, d, {"recipe": report.recipe})
        outs.append(((d / "model.safetensors").read_bytes(), json.loads((d / "manifest.json").read_text())))
    assert outs[0][0] == outs[1][0]
    assert outs[0][1] == outs[1][1]


def test_svdllm_beats_svd_on_calibration_output(calib_ids: torch.Tensor) -> None:
    errs = {}
    for name in ("svd", "svd-llm"):
        model = make_tiny("llama")
        dense = _logits(model, calib_ids)
        compress(model, [f"{name}:ratio=0.4"], calib_ids)
        errs[name] = _rel(_logits(model, calib_ids), dense)
    assert errs["svd-llm"] < errs["svd"]


def test_sequential_groups_see_compressed_inputs(calib_ids: torch.Tensor) -> None:
    """o_proj is calibrated after q/k/v were compressed: its Gram matrix must differ from the dense one."""
    from compress.adapters import get_adapter
    from compress.pipeline.sequential import _observe, capture_layer0_inputs

    model = make_tiny("llama")
    adapter = get_adapter(model)
    inputs = capture_layer0_inputs(model, adapter, calib_ids, 4, torch.device("cpu"))
    layer = adapter.layers(model)[0]
    dense = _observe(layer, ["self_attn.o_proj"], frozenset({"gram"}), inputs, torch.device("cpu"))
    model2 = make_tiny("llama")
    compress(model2, ["svd:ratio=0.5,targets=self_attn.[qkv]_proj"], None)
    layer2 = adapter.layers(model2)[0]
    after = _observe(layer2, ["self_attn.o_proj"], frozenset({"gram"}), inputs, torch.device("cpu"))
    g1, g2 = dense.linears["self_attn.o_proj"].gram, after.linears["self_attn.o_proj"].gram
    assert g1 is not None and g2 is not None and not torch.allclose(g1, g2)


def test_targets_option_limits_compression(calib_ids: torch.Tensor) -> None:
    model = make_tiny("mistral")
    report = compress(model, ["svd:ratio=0.3,targets=mlp.*"], None)
    names = {r.name.split(".", 3)[-1] for r in report.records}
    assert names == {"mlp.gate_proj", "mlp.up_proj", "mlp.down_proj"}
    assert isinstance(model.model.layers[0].self_attn.q_proj, torch.nn.Linear)


def test_generic_adapter_on_unlisted_family(calib_ids: torch.Tensor) -> None:
    from transformers import AutoConfig, AutoModelForCausalLM

    from compress.adapters import get_adapter

    cfg = AutoConfig.for_model(
        "opt", vocab_size=128, hidden_size=32, ffn_dim=64, num_hidden_layers=2, num_attention_heads=4,
        max_position_embeddings=128, word_embed_proj_dim=32,
    )
    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_config(cfg).eval()
    adapter = get_adapter(model)
    assert adapter.name == "generic" and adapter.layers_path == "model.decoder.layers"
    report = compress(model, ["svd-llm:ratio=0.2"], calib_ids)
    assert report.summary()["modules_targeted"] == 2 * 6  # q, k, v, out_proj, fc1, fc2
    assert torch.isfinite(_logits(model, calib_ids)).all()


def test_unsupported_architecture_is_a_clear_error() -> None:
    from compress.adapters import get_adapter
    from compress.errors import CompressError

    class Odd(torch.nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.config = type("C", (), {"model_type": "odd"})()
            self.conv = torch.nn.Conv1d(2, 2, 1)

    with pytest.raises(CompressError, match="unsupported architecture 'odd'.*llama"):
        get_adapter(Odd())


@pytest.mark.parametrize("pass_name", sorted(CHAINED))
def test_chained_pass_contract(pass_name: str, tiny_family: str, calib_ids: torch.Tensor, tmp_path: Path) -> None:
    first, options, max_err = CHAINED[pass_name]
    model = make_tiny(tiny_family)
    probe = torch.randint(0, 128, (2, 24), generator=torch.Generator().manual_seed(7))
    dense_logits = _logits(model, probe)
    compress(model, [first, f"{pass_name}:{options}"], calib_ids)
    logits = _logits(model, probe)
    assert _rel(logits, dense_logits) < max_err
    for name, mod in model.named_modules():
        if name.endswith(("q_proj", "down_proj")):
            _check_property(pass_name, name, mod, 0, 0)
    save_checkpoint(model, None, tmp_path, {})
    reloaded, _ = load(tmp_path)
    assert torch.equal(_logits(reloaded, probe), logits)
