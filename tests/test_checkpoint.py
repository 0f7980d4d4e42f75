"""Checkpoint details: sharding, atomic writes, CLI listings that need no model."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from typer.testing import CliRunner

import compress.checkpoint as ckpt
from compress import compress, load
from compress.errors import CompressError

from .conftest import make_tiny


def test_sharded_checkpoint_and_dense_export_round_trip(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    from transformers import AutoModelForCausalLM

    monkeypatch.setattr(ckpt, "SHARD_BYTES", 20_000)
    model = make_tiny("qwen2")
    compress(model, ["svd:ratio=0.3"])
    ids = torch.randint(0, 128, (1, 12))
    with torch.no_grad():
        ref = model(input_ids=ids).logits
    ckpt.save_checkpoint(model, None, tmp_path / "c", {})
    files = json.loads((tmp_path / "c" / "manifest.json").read_text())["weights"]["files"]
    assert len(files) > 1 and (tmp_path / "c" / "model.safetensors.index.json").is_file()
    m, _ = load(tmp_path / "c")
    with torch.no_grad():
        assert torch.equal(m(input_ids=ids).logits, ref)
    ckpt.export_dense(model, None, tmp_path / "d")
    plain = AutoModelForCausalLM.from_pretrained(tmp_path / "d", dtype=torch.float32)
    with torch.no_grad():
        assert torch.allclose(plain(input_ids=ids).logits, ref, atol=1e-4)


def test_atomic_directory_leaves_nothing_on_failure(tmp_path: Path) -> None:
    out = tmp_path / "out"
    with pytest.raises(RuntimeError):
        with ckpt.atomic_directory(out) as tmp:
            (tmp / "half.bin").write_bytes(b"x")
            raise RuntimeError("crash while writing")
    assert not out.exists() and list(tmp_path.iterdir()) == []
    out.mkdir()
    with pytest.raises(CompressError, match="exists"):
        with ckpt.atomic_directory(out):
            pass
    (out / "old").write_text("old")
    with ckpt.atomic_directory(out, overwrite=True) as tmp:
        (tmp / "new").write_text("new")
    assert sorted(p.name for p in out.iterdir()) == ["new"]
    assert sorted(p.name for p in tmp_path.iterdir()) == ["out"]


def test_cli_listings_and_validate(tmp_path: Path) -> None:
    from compress.cli.main import app

    runner = CliRunner()
    r = runner.invoke(app, ["ls", "adapters"])
    assert r.exit_code == 0 and "llama" in r.stdout and "qwen3" in r.stdout and "generic" in r.stdout
    p = tmp_path / "r.yaml"
    p.write_text("passes:\n  - pass: gptq\n    bits: 3\n    group: 64\n    dim: ada\n")
    r = runner.invoke(app, ["validate", str(p)])
    assert r.exit_code == 0 and "recipe is valid" in r.stdout and "dim: ada" in r.stdout
