"""--export compressed-tensors: verified with the compressed-tensors package itself (its decompressor
gives our dequantized weights bit for bit; transformers' compressed-tensors path gives our logits),
and refused up front for what the format cannot hold."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from compress import compress
from compress.errors import CompressError
from compress.export_ct import check_ct_exportable, export_compressed_tensors
from compress.exports import check_exports
from compress.modules.base import use_kernels
from compress.modules.quant import QuantLinear
from compress.recipe import parse_shorthand

from .conftest import make_tiny

PROBE = torch.randint(0, 128, (2, 20), generator=torch.Generator().manual_seed(5))
IDS = torch.randint(0, 128, (4, 32), generator=torch.Generator().manual_seed(0))


def _logits(model: torch.nn.Module) -> torch.Tensor:
    with torch.no_grad():
        return model(input_ids=PROBE).logits


@pytest.mark.parametrize("options", ["bits=4,group=16", "bits=4,group=0,sym=true", "bits=3,group=16,sym=true", "bits=8,group=8"],
                         ids=["w4-g16-asym", "w4-channel-sym", "w3-g16-sym", "w8-g8-asym"])
def test_the_package_decompresses_our_export_bit_exactly(options: str, tmp_path: Path) -> None:
    pytest.importorskip("compressed_tensors")
    from compressed_tensors.compressors.pack_quantized import PackedQuantizationCompressor
    from compressed_tensors.quantization import QuantizationConfig
    from safetensors.torch import load_file
    from transformers import AutoModelForCausalLM, CompressedTensorsConfig

    model = make_tiny("llama", tied=True)
    compress(model, [f"gptq:{options}"], IDS)
    use_kernels(model, "torch")  # the exact dequantizing path (the CPU int4 path computes in bfloat16)
    ref = _logits(model)
    export_compressed_tensors(model, None, tmp_path)
    qc = QuantizationConfig.model_validate(json.loads((tmp_path / "config.json").read_text())["quantization_config"])
    scheme = next(iter(qc.config_groups.values()))
    state = load_file(str(tmp_path / "model.safetensors"))
    checked = 0
    for name, mod in model.named_modules():
        if isinstance(mod, QuantLinear):
            own = {k[len(name) + 1:]: v for k, v in state.items() if k.startswith(name + ".")}
            W = PackedQuantizationCompressor.decompress(own, scheme)["weight"]
            assert torch.equal(W.to(torch.float32), mod.dense_weight()), name
            checked += 1
    assert checked == 14 and qc.ignore == ["lm_head"]
    # transformers' compressed-tensors path: symmetric layers load compressed; asymmetric ones need
    # dequantize=True (its compressed mode allocates zero-points unpacked while the format packs them)
    kwargs = {} if "sym=true" in options else {"quantization_config": CompressedTensorsConfig(dequantize=True)}
    opened = AutoModelForCausalLM.from_pretrained(tmp_path, **kwargs)
    assert torch.equal(_logits(opened), ref)


def test_several_settings_become_several_config_groups(tmp_path: Path) -> None:
    model = make_tiny("qwen2")
    compress(model, ["gptq:bits=4,group=16,targets=*mlp*", "rtn:bits=8,group=0,sym=true,targets=*attn*"], IDS)
    export_compressed_tensors(model, None, tmp_path)
    qc = json.loads((tmp_path / "config.json").read_text())["quantization_config"]
    assert len(qc["config_groups"]) == 2
    assert "sparsity_config" not in qc  # vLLM 0.24-0.26 refuses a checkpoint carrying the key, even empty (vLLM #51188)
    targets = sorted(t for g in qc["config_groups"].values() for t in g["targets"])
    assert len(targets) == 14 and all(t.startswith("model.layers.") for t in targets)


@pytest.mark.parametrize(("recipe", "why"), [
    (["gptq:bits=4,group=16,dim=ic"], "per-output-channel groups only; gptq:dim=ic"),
    (["gptq:bits=4,group=16,dim=ada"], "per-output-channel groups only; gptq:dim=ada"),
    (["lq-lora:bits=4,group=16,rank=4"], "leaves LoRALinear modules"),
    (["svd:ratio=0.3"], "leaves LowRankLinear modules"),
    (["slicegpt:sparsity=0.25", "gptq:bits=4,group=8"], "slicegpt changes it"),
    (["bcq:bits=3,group=16"], "leaves BCQLinear modules"),
])
def test_what_the_format_cannot_hold_is_refused_before_compressing(recipe: list[str], why: str) -> None:
    with pytest.raises(CompressError, match=why):
        check_exports(["compressed-tensors"], [parse_shorthand(r).build() for r in recipe])


def test_model_check_names_the_modules(tmp_path: Path) -> None:
    model = make_tiny("llama")
    compress(model, ["gptq:bits=4,group=16", "eora:rank=2"], IDS)
    with pytest.raises(CompressError, match=r"cannot export model.layers.0.self_attn.q_proj \(LoRALinear\)"):
        check_ct_exportable(model)
