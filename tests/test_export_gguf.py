"""GGUF: llama.cpp's block grids as quantization targets, and the export.

Checked against the ``gguf`` package itself: its dequantizer gives our weights bit for bit for every
type we write; transformers' GGUF reader (which dequantizes with it and undoes llama.cpp's q/k row
order) gives our logits exactly once the embedding is the file's; llama.cpp itself (llama-cpp-python,
skipped without it) loads the file, tokenizes as the tokenizer does and gives our logits."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch

from compress import compress
from compress.errors import CompressError, ConfigError
from compress.export_gguf import export_gguf, opened_reason
from compress.exports import check_exports
from compress.gguf_vocab import tokenizer_reason
from compress.modules.base import use_kernels
from compress.modules.ggml import GGMLLinear
from compress.recipe import parse_shorthand
from compress.solvers import ggml
from compress.solvers.gptq import gptq_ggml

from .conftest import STORIES, make_tiny, needs

gguf = pytest.importorskip("gguf")

IDS = torch.randint(0, 128, (8, 32), generator=torch.Generator().manual_seed(0))


def _ref_dequant(blocks: torch.Tensor, t: ggml.GGMLType, rows: int, cols: int) -> np.ndarray:
    return gguf.quants.dequantize(blocks.numpy(), gguf.GGMLQuantizationType(t.ggml_id)).reshape(rows, cols)


def _same_bits(a: np.ndarray, b: np.ndarray) -> bool:
    return a.dtype == b.dtype == np.float32 and np.array_equal(a.view(np.uint32), b.view(np.uint32))


@pytest.mark.parametrize("name", sorted(ggml.TYPES))
def test_the_gguf_package_decodes_our_blocks_bit_for_bit(name: str) -> None:
    t = ggml.TYPES[name]
    g = torch.Generator().manual_seed(3)
    W = torch.randn(6, 512, generator=g) * torch.rand(6, 1, generator=g) * 0.1
    W[0, :64] = 0.0  # an all-zero block / sub-block
    W[1, 5] = 3.0  # an outlier
    imp = torch.rand(512, generator=g) + 0.1
    blocks = ggml.quantize(W, t, imp)
    assert blocks.shape == (6, t.row_bytes(512)) and blocks.dtype == torch.uint8
    ours = ggml.decode(blocks, t, 6, 512)
    assert _same_bits(ours.numpy(), _ref_dequant(blocks, t, 6, 512))
    # the stored codes and fields read back as written
    gr = ggml.grid(W, t, imp)
    codes = gr.codes(W).long()
    c, S, M = ggml.unpack(ggml.encode(codes, gr), t, 6, 512)
    assert torch.equal(c, codes) and torch.equal(S, gr.S) and torch.equal(M, gr.M)
    # the grid is a real quantizer: error well under the weights' size, shrinking with the bits
    rel = float((ours - W).norm() / W.norm())
    assert rel < {2: 0.45, 3: 0.25, 4: 0.15, 5: 0.08, 6: 0.04, 8: 0.01}[t.bits], (name, rel)


@pytest.mark.parametrize("name", ["q4_k", "q3_k", "q6_k", "q4_0", "q4_1", "iq4_nl"])
def test_gptq_on_a_block_grid_beats_rounding_and_decodes_bit_for_bit(name: str) -> None:
    t = ggml.TYPES[name]
    g = torch.Generator().manual_seed(0)
    X = torch.randn(2048, 256, generator=g) @ (torch.eye(256) + 0.2 * torch.randn(256, 256, generator=g)) * (torch.rand(256, generator=g) * 3)
    H = X.T @ X
    W = torch.randn(64, 256, generator=g) * 0.05
    blocks, _ = gptq_ggml(W, H, t, actorder=True)
    ours = ggml.decode(blocks, t, 64, 256)
    assert _same_bits(ours.numpy(), _ref_dequant(blocks, t, 64, 256))
    rtn = ggml.decode(ggml.quantize(W, t, H.diagonal()), t, 64, 256)

    def err(Wq: torch.Tensor) -> float:
        return float(((Wq - W) @ X.T).norm() / (W @ X.T).norm())

    assert err(ours) < 0.85 * err(rtn)


def test_k_quants_fall_back_as_llama_cpp_does() -> None:
    assert ggml.type_for("q4_k", 512).name == "q4_k"
    assert ggml.type_for("q4_k", 576).name == "q5_0"  # type: ignore[union-attr]
    assert ggml.type_for("q3_k", 896).name == "iq4_nl"  # type: ignore[union-attr]
    assert ggml.type_for("q6_k", 1536 + 32).name == "q8_0"  # type: ignore[union-attr]
    assert ggml.type_for("q4_0", 172) is None


def _emb_from_file(model: torch.nn.Module, path: Path) -> None:
    """Give ``model`` the embedding (and untied head) the file holds (quantized at export)."""
    r = gguf.GGUFReader(str(path))
    by = {t.name: t for t in r.tensors}
    with torch.no_grad():
        for name, p in (("token_embd.weight", model.get_input_embeddings().weight), ("output.weight", model.lm_head.weight)):
            if name in by:
                t = by[name]
                p.copy_(torch.from_numpy(np.array(gguf.quants.dequantize(t.data, t.tensor_type))).reshape(p.shape))


@needs(STORIES)
@pytest.mark.parametrize("family,recipe,ftype", [
    ("llama", "gptq:format=q4_k", "Q4_K"),
    ("llama", "rtn:bits=4,group=32,sym=true", "Q4_0"),
    ("qwen2", "rtn:format=q3_k", "Q3_K"),
    ("qwen2", "rtn:format=q4_1", "Q4_1"),
    ("llama", None, "F16"),
])
def test_export_reads_back_to_our_model(family: str, recipe: str | None, ftype: str, tmp_path: Path) -> None:
    from transformers import AutoModelForCausalLM, AutoTokenizer

    tok = AutoTokenizer.from_pretrained(STORIES)
    model = make_tiny(family, hidden=256, intermediate=512, tied=family == "llama", vocab=len(tok))
    if recipe:
        compress(model, [recipe], IDS)
    path = export_gguf(model, tok, tmp_path, "model.layers", "")
    assert path.name == f"model-{ftype}.gguf"
    r = gguf.GGUFReader(str(path))
    by = {t.name: t for t in r.tensors}
    # every linear dequantizes to the checkpoint's weight (q/k: up to llama.cpp's row order)
    for i, layer in enumerate(model.model.layers):
        for gname, mod in (("attn_v", layer.self_attn.v_proj), ("ffn_down", layer.mlp.down_proj), ("ffn_up", layer.mlp.up_proj)):
            t = by[f"blk.{i}.{gname}.weight"]
            W = mod.dense_weight() if isinstance(mod, GGMLLinear) or hasattr(mod, "qspec") else mod.weight.detach()
            got = np.array(gguf.quants.dequantize(t.data, t.tensor_type), dtype=np.float32).reshape(W.shape)
            want = W.numpy() if ftype != "F16" else W.to(torch.float16).float().numpy()
            assert _same_bits(got, want), (i, gname)
    assert ("output.weight" in by) == (family != "llama")
    assert ("blk.0.attn_q.bias" in by) == (family == "qwen2")
    opened = AutoModelForCausalLM.from_pretrained(tmp_path, gguf_file=path.name, dtype=torch.float32)
    _emb_from_file(model, path)
    use_kernels(model, "torch")  # the reference path: dequantized weights, as transformers computes
    with torch.no_grad():
        a, b = model(input_ids=IDS).logits, opened(input_ids=IDS).logits
    if ftype == "F16":
        assert torch.allclose(a, b, atol=1e-3, rtol=1e-3)
    else:
        assert torch.equal(a, b)


@needs(STORIES)
def test_a_bfloat16_model_is_written_exactly_as_bf16(tmp_path: Path) -> None:
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(STORIES)
    model = make_tiny("qwen2", hidden=256, intermediate=512, vocab=len(tok)).to(torch.bfloat16)
    path = export_gguf(model, tok, tmp_path, "model.layers", "")
    assert path.name == "model-BF16.gguf"
    by = {t.name: t for t in gguf.GGUFReader(str(path)).tensors}
    for name, p in (("blk.1.ffn_down.weight", model.model.layers[1].mlp.down_proj.weight), ("token_embd.weight", model.model.embed_tokens.weight)):
        t = by[name]
        assert t.tensor_type.name == "BF16"
        got = np.array(gguf.quants.dequantize(t.data, t.tensor_type), dtype=np.float32).reshape(p.shape)
        assert _same_bits(got, p.detach().float().numpy()), name


def test_recipes_without_a_gguf_form_are_refused_before_compressing() -> None:
    def why(*specs: str) -> str:
        with pytest.raises(CompressError) as e:
            check_exports(["gguf"], [parse_shorthand(s).build() for s in specs])
        return str(e.value)

    assert "bits=4,group=32,sym=true (→ Q4_0)" in why("gptq:bits=3,group=64")
    assert "format=q4_1" in why("gptq:bits=4,group=32")
    assert "gptq:format=q4_k" in why("svd-llm:ratio=0.2")
    assert "gptq:format=q4_k" in why("bcq:bits=3")
    check_exports(["gguf"], [parse_shorthand("awq").build(), parse_shorthand("gptq:format=q4_1").build()])
    check_exports(["gguf"], [parse_shorthand("gptq:bits=8,group=32,sym=true").build()])


def test_architectures_and_tokenizers_llama_cpp_cannot_take_are_refused() -> None:
    from tokenizers import Tokenizer, models
    from transformers import PreTrainedTokenizerFast

    opt = make_tiny("opt")
    assert "this model is 'opt'" in (opened_reason(opt, None, "") or "")
    wordlevel = PreTrainedTokenizerFast(tokenizer_object=Tokenizer(models.WordLevel({"a": 0, "[UNK]": 1}, unk_token="[UNK]")))
    assert "not BPE" in (tokenizer_reason(wordlevel) or "")
    assert "no tokenizer" in (tokenizer_reason(None) or "")
    if STORIES.is_dir():
        from transformers import AutoTokenizer

        assert "512 tokens but the model embeds 128" in (tokenizer_reason(AutoTokenizer.from_pretrained(STORIES), 128) or "")


def test_format_options_are_checked() -> None:
    with pytest.raises(ConfigError, match="dim=oc or format=int"):
        parse_shorthand("gptq:format=q4_k,dim=ic").build()
    model = make_tiny("llama", hidden=256, intermediate=512)
    with torch.no_grad():
        model.model.layers[0].mlp.down_proj.weight[:, ::2] = 0.0
    with pytest.raises(ConfigError, match="use format=int after pruning"):
        compress(model, ["gptq:format=q4_k"], IDS)


@needs(STORIES)
def test_cli_runs_exports_and_refuses(tmp_path: Path) -> None:
    from .test_bad_inputs import SMALL, cli, error_line

    # stories260k's MLP is 172 wide: no block of 32 divides it, refused before anything is compressed
    p = cli("run", str(STORIES), "--pass", "gptq:format=q4_0", *SMALL, "--out", str(tmp_path / "w"), "--export", "gguf", cwd=tmp_path)
    error_line(p, r"format=q4_0 needs an input width divisible by 32; this linear's is 172", only=False)
    assert not (tmp_path / "w").exists()
    p = cli("run", str(STORIES), "--pass", "gptq:bits=3,group=32", *SMALL, "--out", str(tmp_path / "w"), "--export", "gguf", cwd=tmp_path)
    error_line(p, r"bits=4,group=32,sym=true \(→ Q4_0\)")
    # the attention quantized on Q8_0's grid, the MLP left in F16
    out = tmp_path / "c"
    p = cli("run", str(STORIES), "--pass", "gptq:format=q8_0,targets=self_attn.*", *SMALL, "--out", str(out), "--export", "gguf", "-q",
            cwd=tmp_path)
    assert p.returncode == 0, p.stderr[-3000:]
    (file,) = (out / "gguf").glob("*.gguf")
    assert file.name == "model-Q8_0.gguf"
    types = {t.name: t.tensor_type.name for t in gguf.GGUFReader(str(file)).tensors}
    assert types["blk.0.attn_q.weight"] == "Q8_0" and types["blk.0.ffn_down.weight"] == "F16"
    # compress export to a file; then refused over it without --overwrite
    p = cli("export", str(out), "--format", "gguf", "--out", str(tmp_path / "m.gguf"), cwd=tmp_path)
    assert p.returncode == 0, p.stderr[-3000:]
    assert (tmp_path / "m.gguf").read_bytes() == file.read_bytes() and not list(tmp_path.glob(".m.gguf*"))
    p = cli("export", str(out), "--format", "gguf", "--out", str(tmp_path / "m.gguf"), cwd=tmp_path)
    error_line(p, r"output file .*m.gguf' exists; choose another --out or pass --overwrite")
    # an architecture the exporter does not map, before compressing
    opt = tmp_path / "opt"
    make_tiny("opt").save_pretrained(opt)
    AutoTokenizer = __import__("transformers").AutoTokenizer
    AutoTokenizer.from_pretrained(STORIES).save_pretrained(opt)
    p = cli("run", str(opt), "--pass", "rtn:format=q8_0", "--out", str(tmp_path / "o"), "--export", "gguf", cwd=tmp_path)
    error_line(p, r"this model is 'opt': use --export dense", only=False)
    assert not (tmp_path / "o").exists()


@needs(STORIES)
def test_llama_cpp_runs_the_export(tmp_path: Path) -> None:
    llama_cpp = pytest.importorskip("llama_cpp")
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(STORIES)
    for family, recipe in (("llama", "gptq:format=q4_k"), ("qwen2", "gptq:format=q6_k"), ("llama", None)):
        model = make_tiny(family, hidden=256, intermediate=512, tied=family == "llama", vocab=len(tok))
        model.config.max_position_embeddings = 64
        if recipe:
            compress(model, [recipe], IDS)
        path = export_gguf(model, tok, tmp_path / f"{family}{recipe}", "model.layers", "")
        _emb_from_file(model, path)
        ids = IDS[0].tolist()
        llm = llama_cpp.Llama(model_path=str(path), n_ctx=64, logits_all=True, n_threads=1, verbose=False)
        try:
            text = "Once upon a time, there was a little cat."
            assert llm.tokenize(text.encode(), add_bos=False) == tok(text, add_special_tokens=False)["input_ids"]
            llm.eval(ids)
            got = np.asarray(llm.scores[: len(ids)], dtype=np.float32)
        finally:
            llm.close()
        with torch.no_grad():
            want = model(input_ids=IDS[:1]).logits[0].numpy()
        # llama.cpp multiplies quantized weights by 8-bit-quantized activations (F16: float16 weights)
        tol = 0.02 if recipe is None else 0.05
        assert np.abs(got - want).max() <= tol * np.abs(want).max(), (family, recipe, np.abs(got - want).max())


def test_cpu_int4_and_int8_paths_are_taken_and_stay_close_to_the_exact_one() -> None:
    from compress.kernels import cpu

    for recipe, kind in (("rtn:bits=4,group=64", "int4"), ("rtn:bits=8,group=0,sym=true", "int8"), ("rtn:format=q4_k", "int4"),
                         ("rtn:bits=3,group=64", None)):
        model = make_tiny("llama", hidden=256, intermediate=512)
        compress(model, [recipe], IDS)
        layer = model.model.layers[0].mlp.up_proj
        assert layer.cpu_kernel() == kind, recipe
        x = torch.randn(3, 256, generator=torch.Generator().manual_seed(1))
        with torch.no_grad():
            fast = layer(x)
            exact = x @ layer.dense_weight().T
        assert cpu.applies(x, False, layer.kernels()) and fast.dtype == x.dtype
        tol = 0.0 if kind is None else 1e-2  # bfloat16 activations and scales
        assert float((fast - exact).norm() / exact.norm()) <= tol + 1e-6, recipe
