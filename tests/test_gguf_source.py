"""GGUFSource streams the same tensors that transformers' from_pretrained(gguf_file=...) loads:
bit-identical values and shapes on SmolLM2-135M Q4_1 (Llama, GQA 9/3, tied embeddings) and on a tiny
untied Llama written here (Q8_0, F16 and F32 tensors), and one-line errors for unknown names and for
architectures it does not stream."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch

from compress.errors import CompressError

from .conftest import SMOLLM, needs

gguf = pytest.importorskip("gguf")

from compress.sources_gguf import GGUFSource  # noqa: E402

SMOLLM_FILE = "SmolLM2-135M-Instruct.Q4_1.gguf"
TINY_FILE = "tiny-llama.gguf"


def _load(directory: Path, name: str) -> tuple[GGUFSource, dict[str, torch.Tensor]]:
    """The source, and the state dict of the reference model transformers loads from the same file."""
    from transformers import AutoConfig, AutoModelForCausalLM

    config = AutoConfig.from_pretrained(directory, gguf_file=name)
    model = AutoModelForCausalLM.from_pretrained(directory, gguf_file=name, config=config, dtype=torch.float32)
    return GGUFSource(directory / name, config), model.state_dict()


def _write_tiny_llama(path: Path) -> None:
    """Two layers, GQA 4/2, a separate output tensor; q/k/mlp/embeddings Q8_0, v F16, the rest F32."""
    hidden, ffn, vocab, heads, kv_heads = 64, 128, 96, 4, 2
    q8 = gguf.GGMLQuantizationType.Q8_0
    rng = np.random.default_rng(0)
    writer = gguf.GGUFWriter(str(path), "llama")
    writer.add_context_length(64)
    writer.add_embedding_length(hidden)
    writer.add_block_count(2)
    writer.add_feed_forward_length(ffn)
    writer.add_head_count(heads)
    writer.add_head_count_kv(kv_heads)
    writer.add_rope_dimension_count(hidden // heads)
    writer.add_rope_freq_base(10000.0)
    writer.add_layer_norm_rms_eps(1e-5)
    writer.add_vocab_size(vocab)

    def add(name: str, shape: tuple[int, ...], kind: str = "f32") -> None:
        values = rng.standard_normal(shape).astype(np.float32)
        if kind == "q8":
            writer.add_tensor(name, gguf.quants.quantize(values, q8), raw_dtype=q8)
        else:
            writer.add_tensor(name, values.astype(np.float16 if kind == "f16" else np.float32))

    kv = hidden // heads * kv_heads
    add("token_embd.weight", (vocab, hidden), "q8")
    for i in range(2):
        add(f"blk.{i}.attn_norm.weight", (hidden,))
        add(f"blk.{i}.attn_q.weight", (hidden, hidden), "q8")
        add(f"blk.{i}.attn_k.weight", (kv, hidden), "q8")
        add(f"blk.{i}.attn_v.weight", (kv, hidden), "f16")
        add(f"blk.{i}.attn_output.weight", (hidden, hidden))
        add(f"blk.{i}.ffn_norm.weight", (hidden,))
        add(f"blk.{i}.ffn_gate.weight", (ffn, hidden), "q8")
        add(f"blk.{i}.ffn_up.weight", (ffn, hidden), "q8")
        add(f"blk.{i}.ffn_down.weight", (hidden, ffn), "q8")
    add("output_norm.weight", (hidden,))
    add("output.weight", (vocab, hidden), "q8")
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()


@pytest.fixture(scope="module")
def smollm() -> tuple[GGUFSource, dict[str, torch.Tensor]]:
    source, reference = _load(SMOLLM, SMOLLM_FILE)
    yield source, reference
    source.close()


@pytest.fixture(scope="module")
def tiny_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    directory = tmp_path_factory.mktemp("gguf")
    _write_tiny_llama(directory / TINY_FILE)
    return directory


def _assert_matches(source: GGUFSource, reference: dict[str, torch.Tensor]) -> None:
    names = source.names()
    assert len(names) == len(set(names)) and set(names) <= set(reference)
    for name in names:
        got = source.get(name)
        assert source.shape(name) == tuple(got.shape) == tuple(reference[name].shape), name
        assert source.dtype(name) == got.dtype == torch.float32, name
        assert torch.equal(got, reference[name]), name


@needs(SMOLLM)
def test_smollm_matches_from_pretrained(smollm: tuple[GGUFSource, dict[str, torch.Tensor]]) -> None:
    source, reference = smollm
    assert source.files == [SMOLLM / SMOLLM_FILE]
    # tied embeddings: the file has no output.weight, so lm_head is the one key the model fills itself
    assert set(reference) - set(source.names()) == {"lm_head.weight"}
    assert source.names()[0] == "model.embed_tokens.weight"
    _assert_matches(source, reference)


def test_untied_llama_matches_from_pretrained(tiny_dir: Path) -> None:
    source, reference = _load(tiny_dir, TINY_FILE)
    with source:
        assert set(source.names()) == set(reference) and "lm_head.weight" in reference
        _assert_matches(source, reference)


def test_get_returns_own_memory_and_close_stops_it(tiny_dir: Path) -> None:
    from transformers import AutoConfig

    with GGUFSource(tiny_dir / TINY_FILE, AutoConfig.from_pretrained(tiny_dir, gguf_file=TINY_FILE)) as source:
        name = "model.norm.weight"  # F32 in the file: dequantizing alone would give a view of the memmap
        first = source.get(name)
        first.zero_()
        assert source.get(name).abs().sum() > 0
        for bad in ("model.layers.9.mlp.up_proj.weight", "model.rotary_emb.inv_freq"):
            with pytest.raises(KeyError):
                source.get(bad)
            with pytest.raises(KeyError):
                source.shape(bad)
    assert source.shape(name) == (64,)
    with pytest.raises(ValueError, match="closed"):
        source.get(name)


@pytest.mark.parametrize(
    "arch, message", [("lfm2", "packed-GGUF path"), ("qwen2moe", "expert tensors"), ("rwkv6", "not supported")]
)
def test_unstreamable_architectures_are_refused(tmp_path: Path, arch: str, message: str) -> None:
    path = tmp_path / f"{arch}.gguf"
    writer = gguf.GGUFWriter(str(path), arch)
    writer.add_block_count(1)
    writer.add_tensor("token_embd.weight", np.zeros((4, 8), dtype=np.float32))
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    with pytest.raises(CompressError, match=message) as err:
        GGUFSource(path, config=None)
    assert "\n" not in str(err.value) and arch in str(err.value)
