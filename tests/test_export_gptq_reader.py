"""--export gptq read by a maintained GPTQ reader: transformers' GPTQ path with gptqmodel (pure-Python
torch kernels on the CPU). Skips where gptqmodel is not installed (its requirements pin a newer
torch than CI's; see the README for the verified versions). The layout itself is also checked
without any reader in tests/test_quant.py."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from compress import compress
from compress.errors import CompressError
from compress.export_gptq import check_gptq_exportable, export_gptq
from compress.modules.quant import QuantLinear

from .conftest import make_tiny


@pytest.mark.parametrize("options", ["bits=4,group=32", "bits=4,group=32,sym=true", "bits=8,group=32,sym=true"])
def test_transformers_gptq_path_reads_our_export(options: str, tmp_path: Path) -> None:
    pytest.importorskip("gptqmodel")
    pytest.importorskip("optimum")
    from transformers import AutoModelForCausalLM

    model = make_tiny("llama", hidden=128, intermediate=256)
    compress(model, [f"gptq:{options}"], torch.randint(0, 128, (8, 64), generator=torch.Generator().manual_seed(0)))
    ids = torch.randint(0, 128, (2, 24), generator=torch.Generator().manual_seed(7))
    with torch.no_grad():
        ref = model(input_ids=ids).logits
    export_gptq(model, None, tmp_path, "model.layers")
    opened = AutoModelForCausalLM.from_pretrained(tmp_path, dtype=torch.float32, device_map="cpu").eval()
    with torch.no_grad():
        out = opened(input_ids=ids).logits.float()
    # everything outside the quantized linears is stored in float16: that alone moves logits by ~3e-4
    assert float((out - ref).norm() / ref.norm()) < 1e-3
    for name, mod in model.named_modules():
        if isinstance(mod, QuantLinear):
            with torch.no_grad():
                W = opened.get_submodule(name)(torch.eye(mod.in_features)).T  # the reader's weight, (out, in)
            ours = mod.dense_weight()
            assert float((W - ours).abs().max()) <= 2**-10 * float(ours.abs().max()), name  # float16 rounding


def test_zero_point_of_zero_is_refused_naming_the_layer() -> None:
    model = make_tiny("llama", hidden=64, intermediate=128)
    compress(model, ["rtn:bits=4,group=32"])
    mod = model.model.layers[1].mlp.up_proj
    from compress.solvers.packing import pack_bits

    z = mod.zeros().clone()
    z[0, 0] = 0
    mod.qzeros.copy_(pack_bits(z.reshape(-1), 4))
    with pytest.raises(CompressError, match=r"model.layers.1.mlp.up_proj \(a zero-point of 0"):
        check_gptq_exportable(model, "model.layers")
