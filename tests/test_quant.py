"""Quantizers, GPTQ, per-IC, packing, BCQ and the GPTQ-format export."""

from __future__ import annotations

import json
import logging
from pathlib import Path

import pytest
import torch

from compress import compress
from compress.errors import CompressError, ConfigError
from compress.modules import BCQLinear, QuantLinear
from compress.recipe import parse_shorthand
from compress.solvers.bcq import bcq_from_uniform, bcq_quantize
from compress.solvers.gptq import gptq_quantize
from compress.solvers.packing import pack_bits, packed_nbytes, unpack_bits
from compress.solvers.quant import QuantSpec, quantize_rtn

from .conftest import make_tiny


def _ill_conditioned_inputs(n: int, d: int, seed: int = 0) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    mix = torch.randn(d, d, generator=g) * torch.logspace(0, -3, d)[:, None]
    return torch.randn(n, d, generator=g) @ mix


def _out_err(W: torch.Tensor, W_hat: torch.Tensor, H: torch.Tensor) -> float:
    D = (W - W_hat).double()
    return float(((D @ H.double()) * D).sum())


@pytest.mark.parametrize("bits", [2, 3, 4, 8])
@pytest.mark.parametrize("dim", ["oc", "ic"])
def test_values_on_the_grid_quantize_exactly(bits: int, dim: str) -> None:
    g, maxq = 16, 2**bits - 1
    gen = torch.Generator().manual_seed(bits)
    codes = torch.randint(0, maxq + 1, (32 * 4, g), generator=gen)  # rows = groups
    codes[:, 0], codes[:, 1] = 0, maxq  # each group spans the full grid
    zero = torch.randint(0, maxq + 1, (32 * 4, 1), generator=gen)
    scale = (torch.rand(32 * 4, 1, generator=gen) + 0.1).half().float()
    G = (codes - zero) * scale
    W = G.reshape(32, 64) if dim == "oc" else G.reshape(64, 32).T
    qz = quantize_rtn(W, QuantSpec(bits=bits, group_size=g, dim=dim))
    assert torch.equal(qz.dequantize(), W)


@pytest.mark.parametrize("bits", [2, 3, 4, 8])
@pytest.mark.parametrize("dim", ["oc", "ic"])
@pytest.mark.parametrize("sym", [False, True])
def test_quantizer_error_within_half_step(bits: int, dim: str, sym: bool) -> None:
    W = torch.randn(32, 64, generator=torch.Generator().manual_seed(bits))
    qz = quantize_rtn(W, QuantSpec(bits=bits, group_size=16, sym=sym, dim=dim))
    W_hat = qz.dequantize()
    scale = qz.scales.float().repeat_interleave(16, dim=1)
    if dim == "ic":
        scale = scale.T
    # at most half a step, up to the float16 rounding of the scale at the range ends
    assert ((W - W_hat).abs() <= 0.5 * scale + 1e-3 * scale * 2**bits).all()
    assert int(qz.q.max()) <= 2**bits - 1


def test_gptq_beats_rtn_on_ill_conditioned_hessian() -> None:
    W = torch.randn(64, 96, generator=torch.Generator().manual_seed(0))
    X = _ill_conditioned_inputs(1000, 96)
    H = X.T @ X
    for dim in ("oc", "ic"):
        spec = QuantSpec(bits=3, group_size=32, dim=dim)
        rtn = quantize_rtn(W, spec).dequantize()
        gq, loss = gptq_quantize(W, H, spec)
        assert _out_err(W, gq.dequantize(), H) < 0.5 * _out_err(W, rtn, H)
        act, _ = gptq_quantize(W, H, spec, actorder=True)
        assert _out_err(W, act.dequantize(), H) < _out_err(W, rtn, H)


def test_per_ic_isolates_an_outlier_input_channel() -> None:
    """An activation-outlier input channel j (large x_j) whose weights sit in a narrow band: per-OC
    groups quantize column j with the coarse step of whole rows, and the large x_j amplifies that
    error; per-IC gives column j groups of its own, with a step fitted to its band."""
    gen = torch.Generator().manual_seed(1)
    W = torch.randn(64, 64, generator=gen)
    X = torch.randn(512, 64, generator=gen)
    W[:, 7] = 0.3 + 0.01 * torch.randn(64, generator=gen)
    X[:, 7] *= 40.0
    H = X.T @ X
    errs = {dim: _out_err(W, quantize_rtn(W, QuantSpec(bits=3, group_size=16, dim=dim)).dequantize(), H) for dim in ("oc", "ic")}
    assert errs["ic"] < 0.25 * errs["oc"], errs


def test_gptq_singular_hessian_is_repaired_with_warning(caplog: pytest.LogCaptureFixture) -> None:
    W = torch.randn(16, 32, generator=torch.Generator().manual_seed(2))
    X = _ill_conditioned_inputs(8, 32)  # 8 samples: rank-deficient H
    H = X.T @ X
    H[3, 3] = 0.0  # a dead input too
    with caplog.at_level(logging.WARNING):
        qz, _ = gptq_quantize(W, H, QuantSpec(bits=4, group_size=16), damp=0.0, name="layers.0.mlp.up_proj")
    assert "layers.0.mlp.up_proj" in caplog.text
    assert torch.isfinite(qz.dequantize()).all()


@pytest.mark.parametrize("bits", range(1, 9))
@pytest.mark.parametrize("n", [1, 8, 13, 1000])
def test_packing_round_trips(bits: int, n: int) -> None:
    v = torch.randint(0, 2**bits, (n,), generator=torch.Generator().manual_seed(n))
    p = pack_bits(v, bits)
    assert p.dtype == torch.uint8 and p.numel() == packed_nbytes(n, bits)
    assert torch.equal(unpack_bits(p, bits, n).long(), v)


def test_three_bit_packing_is_dense() -> None:
    assert packed_nbytes(576 * 576, 3) * 8 == 576 * 576 * 3


def test_quantlinear_bits_accounting_is_exact() -> None:
    W = torch.randn(576, 576)
    qz = quantize_rtn(W, QuantSpec(bits=3, group_size=64))
    m = QuantLinear.from_quantized(qz, None, like=W)
    n_groups = 576 * 9
    assert m.storage_bits() == 576 * 576 * 3 + 16 * n_groups + 8 * packed_nbytes(n_groups, 3)
    assert m.storage_bits() / m.num_weights() == pytest.approx(3 + 16 / 64 + 3 / 64)
    assert torch.equal(m.dense_weight(), qz.dequantize())


@pytest.mark.parametrize("bits", [2, 3, 4])
def test_bcq_from_uniform_is_exact(bits: int) -> None:
    W = torch.randn(32, 128, generator=torch.Generator().manual_seed(bits))
    for qz in (quantize_rtn(W, QuantSpec(bits=bits, group_size=32)), quantize_rtn(W, QuantSpec(bits=bits, group_size=32, sym=True))):
        b = bcq_from_uniform(qz)
        assert torch.equal(b.dequantize(), qz.dequantize())
        m = BCQLinear.from_bcq(b, None, like=W)
        assert torch.equal(m.dense_weight(), qz.dequantize())
    with pytest.raises(ValueError, match="per-OC"):
        bcq_from_uniform(quantize_rtn(W, QuantSpec(bits=bits, group_size=32, dim="ic")))


def test_bcq_refinement_improves_on_greedy() -> None:
    W = torch.randn(64, 128, generator=torch.Generator().manual_seed(3))
    greedy = float((bcq_quantize(W, 3, 64, rounds=0, init="greedy").dequantize() - W).square().sum())
    refined = float((bcq_quantize(W, 3, 64, rounds=15, init="greedy").dequantize() - W).square().sum())
    assert refined < greedy


@pytest.mark.parametrize("seed", range(6))
@pytest.mark.parametrize("bits", [2, 3, 4])
def test_bcq_from_a_uniform_start_is_never_worse_than_rtn_in_the_weighted_error(bits: int, seed: int) -> None:
    """The property BCQ must keep: a uniform grid is a special case of BCQ, so starting from RTN's codes
    and keeping only the rounds that lower each group's weighted error can only match or beat RTN."""
    g = torch.Generator().manual_seed(seed)
    W = torch.randn(48, 128, generator=g) * torch.rand(1, 128, generator=g) * 3  # uneven input scales
    W[0, 5] = 25.0  # an outlier
    h = torch.rand(128, generator=g) ** 4 * 100  # a few inputs carry most of the calibration energy
    spec = QuantSpec(bits=bits, group_size=32)
    rtn = quantize_rtn(W, spec, h).dequantize()
    bcq = bcq_quantize(W, bits, 32, rounds=10, hdiag=h).dequantize()
    werr = lambda A: ((A - W).square() * h).reshape(48, 4, 32).sum(-1)  # noqa: E731  per group
    assert bool((werr(bcq) <= werr(rtn) * (1 + 1e-6) + 1e-9).all())
    assert float(werr(bcq).sum()) < float(werr(rtn).sum())  # and the refinement does find something


def test_bcq_layout_bits() -> None:
    W = torch.randn(8, 16)
    b = bcq_quantize(W, 2, 8)
    m = BCQLinear.from_bcq(b, None, like=W)
    # plane 0, row 0: byte 0 holds inputs 0..7, least significant bit first
    expected = sum(int(b.signs[0, 0, t]) << t for t in range(8))
    assert int(m.planes[0, 0, 0]) == expected


@pytest.mark.parametrize(
    "text,match",
    [("rtn:bits=5", "must be one of 2, 3, 4, 8"), ("gptq:dim=xy", "must be one of oc, ic, ada"), ("bcq:bits=0", "must be in")],
)
def test_bad_quant_options(text: str, match: str) -> None:
    with pytest.raises(ConfigError, match=match):
        parse_shorthand(text)


def test_group_that_does_not_divide_names_layer_and_sizes(calib_ids: torch.Tensor) -> None:
    model = make_tiny("llama")
    with pytest.raises(ConfigError, match=r"model.layers.0.self_attn.q_proj \(32x32\): group size 24 does not divide the input dimension 32 \(sizes that do: 32\)"):
        compress(model, ["rtn:bits=4,group=24"], None)


def _unpack_gptq_words(words: torch.Tensor, bits: int, n: int) -> torch.Tensor:
    """Independent reading of the GPTQ layout: value k of a column occupies stream bits
    [k·b, (k+1)·b) of its little-endian 32-bit words, possibly straddling two words."""
    w = words.to(torch.int64) & 0xFFFFFFFF  # (n_words, cols)
    out = torch.zeros(n, w.shape[1], dtype=torch.int64)
    for k in range(n):
        bit = k * bits
        word, off = divmod(bit, 32)
        v = w[word] >> off
        if off + bits > 32:
            v = v | (w[word + 1] << (32 - off))
        out[k] = v & (2**bits - 1)
    return out


@pytest.mark.parametrize("bits", [2, 3, 4, 8])
def test_gptq_export_follows_the_published_layout(bits: int, calib_ids: torch.Tensor, tmp_path: Path) -> None:
    from safetensors.torch import load_file

    from compress.export_gptq import export_gptq

    model = make_tiny("llama", hidden=64, intermediate=128)  # k/v: 32 outputs, packable at 3 bits
    # 2-bit asymmetric groups often get a zero-point of 0, which v1 cannot store (refused, tested in
    # tests/test_export_gptq_reader.py): that width is checked symmetric
    compress(model, [f"gptq:bits={bits},group=16" + (",sym=true" if bits == 2 else "")], calib_ids)
    export_gptq(model, None, tmp_path)
    cfg = json.loads((tmp_path / "quantize_config.json").read_text())
    assert cfg["bits"] == bits and cfg["group_size"] == 16 and cfg["desc_act"] is False
    assert json.loads((tmp_path / "config.json").read_text())["quantization_config"]["quant_method"] == "gptq"
    state = load_file(str(tmp_path / "model.safetensors"))
    for name, m in model.named_modules():
        if not isinstance(m, QuantLinear):
            continue
        qweight, qzeros, scales, g_idx = (state[f"{name}.{k}"] for k in ("qweight", "qzeros", "scales", "g_idx"))
        assert qweight.dtype == torch.int32 and qweight.shape == (m.in_features * bits // 32, m.out_features)
        q = _unpack_gptq_words(qweight, bits, m.in_features)  # (d_in, d_out)
        z = _unpack_gptq_words(qzeros.T.contiguous(), bits, m.out_features).T  # (n_groups, d_out)
        zeros = z + 1  # v1 format stores zero − 1 (readers add 1 back without wrapping)
        W = (q - zeros[g_idx.long()]).float() * scales[g_idx.long()].float()
        assert torch.equal(W.T, m.dense_weight())


def test_gptq_export_refuses_other_layers(calib_ids: torch.Tensor, tmp_path: Path) -> None:
    from compress.export_gptq import export_gptq

    for recipe, match in (
        (["rtn:bits=4,group=16,dim=ic"], "per-IC"),
        (["bcq:bits=3,group=16"], "BCQLinear"),
        (["rtn:bits=4,group=16,targets=mlp.*"], "not quantized"),
    ):
        model = make_tiny("llama")
        compress(model, recipe, calib_ids)
        with pytest.raises(CompressError, match=match):
            export_gptq(model, None, tmp_path / "x")


def test_bcq_weighted_needs_calibration_and_unweighted_is_data_free() -> None:
    model = make_tiny("llama")
    compress(model, ["bcq:bits=3,group=16,weighted=false"])  # no calibration data: data-free
    assert isinstance(model.model.layers[0].mlp.down_proj, BCQLinear)
    with pytest.raises(Exception, match="calibration"):
        compress(make_tiny("llama"), ["bcq:bits=3,group=16"])


def test_static_group_sweep_matches_the_general_sweep_and_reuses_equal_factors(monkeypatch: pytest.MonkeyPatch) -> None:
    """The inlined sweep for fixed group parameters gives the general sweep's codes; an equal Gram
    (q/k/v read the same input) is factored once."""
    from compress.solvers import gptq as G

    torch.manual_seed(3)
    W = torch.randn(40, 96)
    X = torch.randn(500, 96) * torch.rand(96) * 3
    H = X.T @ X
    for spec in (QuantSpec(bits=3, group_size=32, clip=True), QuantSpec(bits=4, group_size=0, sym=True)):
        fast, lf = G.gptq_quantize(W, H, spec, actorder=True, blocksize=32)
        general, lg = G.gptq_quantize(W, H, spec, actorder=True, blocksize=32, keep=torch.ones_like(W, dtype=torch.bool))
        assert torch.equal(fast.q, general.q) and torch.equal(fast.scales, general.scales)
        assert lf == pytest.approx(lg, rel=1e-5)
    calls = []
    real = G.sweep_factor
    monkeypatch.setattr(G, "sweep_factor", lambda *a: calls.append(1) or real(*a))
    cache = G.FactorCache()
    a, _ = G.gptq_quantize(W, H, QuantSpec(bits=4, group_size=32), actorder=True, cache=cache)
    b, _ = G.gptq_quantize(W[:20], H.clone(), QuantSpec(bits=4, group_size=32), actorder=True, cache=cache)
    G.gptq_quantize(W, H * 2, QuantSpec(bits=4, group_size=32), actorder=True, cache=cache)
    assert len(calls) == 2 and torch.equal(a.q[:20], b.q)


@pytest.mark.parametrize("env", [None, "0", "1"])
def test_dense_weight_cache_lives_only_inside_compress_loops(env: str | None, calib_ids: torch.Tensor,
                                                              monkeypatch: pytest.MonkeyPatch) -> None:
    """A QuantLinear keeps its dequantized weight only inside compress's own loops (calibration,
    evaluation) and drops it when they return; COMPRESS_DENSE_CACHE=0 never keeps it, =1 always."""
    from compress.api import evaluate
    from compress.modules.base import dense_cache

    if env is None:
        monkeypatch.delenv("COMPRESS_DENSE_CACHE", raising=False)
    else:
        monkeypatch.setenv("COMPRESS_DENSE_CACHE", env)

    def cached(m: torch.nn.Module) -> int:
        return sum("_dense_cache" in q.__dict__ for q in m.modules() if isinstance(q, QuantLinear))

    model = make_tiny("llama")
    compress(model, ["rtn:bits=4,group=16"], calib_ids)
    ids = calib_ids[:1, :16]
    with torch.no_grad():
        assert env == "1" or cached(model) == 0  # whatever compress's loop built is gone
        with dense_cache(model):
            ref = model(input_ids=ids).logits
            assert cached(model) == (0 if env == "0" else 14)
        assert cached(model) == (14 if env == "1" else 0)
        assert torch.equal(model(input_ids=ids).logits, ref)  # with or without the cache, the same numbers
    evaluate(model, None, ppl=(), tasks=())
    assert cached(model) == (14 if env == "1" else 0)


def test_bcq_feedback_on_the_converted_uniform_grid_is_gptq() -> None:
    """With the uniform start unrefined (rounds=0) and no refit, BCQ's sweep sees exactly GPTQ's
    static grid: the same weights come out, and both beat the grid by itself."""
    from compress.solvers.bcq import bcq_gptq

    torch.manual_seed(5)
    W = torch.randn(24, 64)
    X = _ill_conditioned_inputs(400, 64, seed=5)
    H = X.T @ X
    b, err = bcq_gptq(W, H, 3, 16, rounds=0, refits=0, damp=0.01, actorder=True)
    q, _ = gptq_quantize(W, H, QuantSpec(bits=3, group_size=16), actorder=True, damp=0.01)
    assert torch.equal(b.dequantize(), q.dequantize())
    rtn = quantize_rtn(W, QuantSpec(bits=3, group_size=16), H.diagonal()).dequantize()
    assert err == pytest.approx(_out_err(W, q.dequantize(), H), rel=1e-6) and err < 0.8 * _out_err(W, rtn, H)


def test_bcq_full_gram_refit_is_the_least_squares_optimum() -> None:
    """refit_full_gram against a direct least-squares solve over the calibration inputs: per output
    row, the design matrix has one column per (group, plane) and per group offset."""
    from compress.solvers.bcq import BCQ, bcq_gptq, refit_full_gram

    torch.manual_seed(6)
    W = torch.randn(6, 48)
    X = _ill_conditioned_inputs(300, 48, seed=6)
    H = X.T @ X
    b, _ = bcq_gptq(W, H, 2, 16, refits=0)
    alpha, offset = refit_full_gram(W, H, b.signs, 16, chunk=4)
    Xd = X.double()
    for r in range(W.shape[0]):
        cols = []
        for k in range(3):
            for i in range(3):  # 2 planes and the offset
                v = torch.zeros(48, dtype=torch.float64)
                v[16 * k : 16 * (k + 1)] = (b.signs[i, r, 16 * k : 16 * (k + 1)].double() * 2 - 1) if i < 2 else 1.0
                cols.append(Xd @ v)
        theta = torch.linalg.lstsq(torch.stack(cols, 1), Xd @ W[r].double()[:, None]).solution[:, 0].reshape(3, 3)
        torch.testing.assert_close(alpha[:, r].float(), theta[:, :2].T.float().to(torch.float16).float(), rtol=2e-3, atol=1e-4)
        torch.testing.assert_close(offset[r].double(), theta[:, 2], rtol=1e-4, atol=1e-5)
    refit = BCQ(signs=b.signs, alpha=alpha, offset=offset, group_size=16)
    assert _out_err(W, refit.dequantize(), H) <= _out_err(W, b.dequantize(), H) * (1 + 1e-4)


def test_bcq_with_feedback_beats_the_diagonal_refinement_on_correlated_inputs() -> None:
    from compress.solvers.bcq import bcq_gptq

    torch.manual_seed(7)
    W = torch.randn(32, 128)
    X = _ill_conditioned_inputs(800, 128, seed=7)
    H = X.T @ X
    diag = bcq_quantize(W, 3, 32, hdiag=H.diagonal()).dequantize()
    b, err = bcq_gptq(W, H, 3, 32)
    assert err == pytest.approx(_out_err(W, b.dequantize(), H), rel=1e-6)
    assert err < 0.7 * _out_err(W, diag, H)


def test_gptq_on_normalfloat_levels() -> None:
    """NF codes through GPTQ's sweep: round to nearest exactly when the inputs are uncorrelated and
    undamped, a lower output error than it on correlated inputs, the same absmax scales either way."""
    torch.manual_seed(8)
    W = torch.randn(32, 128)
    spec = QuantSpec(bits=3, group_size=32, levels="nf")
    rtn = quantize_rtn(W, spec)
    q, _ = gptq_quantize(W, torch.eye(128) * 10, spec, actorder=False, damp=0.0)
    assert torch.equal(q.q, rtn.q) and torch.equal(q.scales, rtn.scales)
    X = _ill_conditioned_inputs(600, 128, seed=8)
    H = X.T @ X
    q, _ = gptq_quantize(W, H, spec, actorder=True)
    assert torch.equal(q.scales, rtn.scales)
    assert _out_err(W, q.dequantize(), H) < 0.8 * _out_err(W, rtn.dequantize(), H)
