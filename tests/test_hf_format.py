"""The checkpoint format as a transformers quantization method: plain ``from_pretrained`` opens a
compress checkpoint (after ``import compress``), ``save_pretrained`` of the loaded model writes an
equivalent one, and bad entries are refused in one line. The contract table
(tests/test_pass_contract.py) opens every kind of checkpoint with plain ``from_pretrained``."""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest
import torch

from compress import compress, load
from compress.checkpoint import save_checkpoint
from compress.errors import CompressError
from compress.version import FORMAT_VERSION

from .conftest import make_tiny

PROBE = torch.randint(0, 128, (2, 16), generator=torch.Generator().manual_seed(3))


def _logits(model: torch.nn.Module) -> torch.Tensor:
    with torch.no_grad():
        return model(input_ids=PROBE).logits


def _checkpoint(tmp_path: Path, recipe: list[str], family: str = "llama", tied: bool = False) -> tuple[Path, torch.Tensor]:
    model = make_tiny(family, tied=tied)
    compress(model, recipe, torch.randint(0, 128, (4, 32), generator=torch.Generator().manual_seed(0)))
    out = tmp_path / "ckpt"
    out.mkdir()
    save_checkpoint(model, None, out, {"recipe": recipe})
    return out, _logits(model)


def _edit_entry(directory: Path, edit: object) -> None:
    p = directory / "config.json"
    cfg = json.loads(p.read_text())
    edit(cfg["quantization_config"])  # type: ignore[operator]
    p.write_text(json.dumps(cfg))


def test_config_names_the_method_and_version(tmp_path: Path) -> None:
    out, _ = _checkpoint(tmp_path, ["rtn:bits=4,group=16"])
    entry = json.loads((out / "config.json").read_text())["quantization_config"]
    assert entry["quant_method"] == "compress" and entry["format_version"] == FORMAT_VERSION
    assert entry["modules"]["model.layers.0.mlp.down_proj"]["type"] == "QuantLinear"


@pytest.mark.parametrize("recipe", [
    ["cospadi:ratio=0.3,solver=ksvd,iters=2,share=2"],  # one dictionary buffer written once for two layers
    ["slicegpt:sparsity=0.25", "lq-lora:bits=4,group=8,rank=4"],  # added structure, resized shapes, nested modules
], ids=["shared-dictionary", "slicegpt+lq-lora"])
def test_save_pretrained_of_a_loaded_model_is_an_equivalent_checkpoint(recipe: list[str], tmp_path: Path) -> None:
    from transformers import AutoModelForCausalLM

    out, ref = _checkpoint(tmp_path, recipe, tied=True)
    m = AutoModelForCausalLM.from_pretrained(out)
    assert torch.equal(_logits(m), ref)
    again = tmp_path / "again"
    m.save_pretrained(again)
    assert not (again / "manifest.json").exists()
    for opened in (AutoModelForCausalLM.from_pretrained(again), load(again)[0]):
        assert torch.equal(_logits(opened), ref)
    if "share" in recipe[0]:
        m2 = AutoModelForCausalLM.from_pretrained(again)
        assert m2.model.layers[0].mlp.up_proj.atoms is m2.model.layers[1].mlp.up_proj.atoms


def test_checkpoint_without_the_config_entry_opens_from_its_manifest(tmp_path: Path) -> None:
    """Checkpoints written before config.json carried the entry."""
    out, ref = _checkpoint(tmp_path, ["slicegpt:sparsity=0.25", "gptq:bits=4,group=8"])
    p = out / "config.json"
    cfg = json.loads(p.read_text())
    del cfg["quantization_config"]
    p.write_text(json.dumps(cfg))
    assert torch.equal(_logits(load(out)[0]), ref)


def test_newer_format_version_is_refused_naming_both_versions(tmp_path: Path) -> None:
    from transformers import AutoModelForCausalLM

    out, _ = _checkpoint(tmp_path, ["rtn:bits=4,group=16"])
    _edit_entry(out, lambda e: e.update(format_version=FORMAT_VERSION + 1))
    msg = f"format version {FORMAT_VERSION + 1}, newer than this library reads \\({FORMAT_VERSION}"
    with pytest.raises(CompressError, match=msg):
        AutoModelForCausalLM.from_pretrained(out)
    with pytest.raises(CompressError, match=msg):
        load(out)


def test_unknown_module_type_is_refused_naming_it(tmp_path: Path) -> None:
    from transformers import AutoModelForCausalLM

    out, _ = _checkpoint(tmp_path, ["rtn:bits=4,group=16"])
    _edit_entry(out, lambda e: e["modules"]["model.layers.1.mlp.up_proj"].update(type="HexLinear"))
    with pytest.raises(CompressError, match="module type 'HexLinear' \\(at model.layers.1.mlp.up_proj\\), unknown to compress"):
        AutoModelForCausalLM.from_pretrained(out)


def _drop(state: dict) -> str:
    del state["model.layers.1.mlp.up_proj.scales"]
    return "missing model.layers.1.mlp.up_proj.scales"


def _add(state: dict) -> str:
    state["model.layers.1.mlp.up_proj.extra"] = torch.zeros(3)
    return "unexpected model.layers.1.mlp.up_proj.extra"


def _reshape(state: dict) -> str:
    t = state["model.layers.1.mlp.up_proj.scales"]
    state["model.layers.1.mlp.up_proj.scales"] = torch.cat([t, t])
    return "wrong shape model.layers.1.mlp.up_proj.scales"


@pytest.mark.parametrize("edit", [_drop, _add, _reshape], ids=["missing", "unexpected", "wrong-shape"])
@pytest.mark.parametrize("opener", ["load", "from_pretrained"])
def test_a_checkpoint_unlike_its_description_never_loads(tmp_path: Path, edit: Any, opener: str) -> None:
    """Plain from_pretrained would initialize a missing weight at random and warn: the quantizer's
    check refuses it on every path, naming the tensors."""
    from safetensors.torch import load_file, save_file
    from transformers import AutoModelForCausalLM

    out, _ = _checkpoint(tmp_path, ["rtn:bits=4,group=16"])
    state = load_file(str(out / "model.safetensors"))
    named = edit(state)
    save_file(state, str(out / "model.safetensors"), metadata={"format": "pt"})
    with pytest.raises(CompressError, match="do not match the checkpoint's description \\(" + re.escape(named)):
        load(out) if opener == "load" else AutoModelForCausalLM.from_pretrained(out)


def test_a_truncated_weight_file_is_named(tmp_path: Path) -> None:
    from transformers import AutoModelForCausalLM

    out, _ = _checkpoint(tmp_path, ["rtn:bits=4,group=16"])
    f = out / "model.safetensors"
    os.truncate(f, f.stat().st_size // 2)
    for open_ in (load, AutoModelForCausalLM.from_pretrained):
        with pytest.raises(CompressError, match="model.safetensors' is truncated: tensor '.*' ends at byte"):
            open_(out)


def test_without_the_package_transformers_names_the_method(tmp_path: Path) -> None:
    """A python that never imports compress: transformers' own message names the method it lacks."""
    out, _ = _checkpoint(tmp_path, ["rtn:bits=4,group=16"])
    code = f"from transformers import AutoModelForCausalLM; AutoModelForCausalLM.from_pretrained({str(out)!r})"
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300)
    assert "Unknown quantization type, got compress" in r.stdout + r.stderr


def test_import_compress_registers_lazily() -> None:
    code = (
        "import sys, compress; assert 'transformers' not in sys.modules; "
        "from transformers.quantizers.auto import AUTO_QUANTIZER_MAPPING as M; assert 'compress' in M, sorted(M)"
    )
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, r.stderr[-2000:]
