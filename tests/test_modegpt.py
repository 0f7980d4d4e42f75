"""MoDeGPT: each module solver is exact where the model has the structure it removes (so the rotary
frequencies, the GQA grouping and the refit are the right ones), the reduced attention equals the
upstream one when nothing is removed (prefill and cached decode), the allocation keeps its budget and
cap, the checkpoint rebuilds the heterogeneous shapes bit-exactly, and bad inputs are refused with one
line before the model is touched."""

from __future__ import annotations

import copy
import logging
from pathlib import Path

import pytest
import torch

from compress import compress, load
from compress.checkpoint import export_dense, read_manifest, save_checkpoint
from compress.errors import ConfigError
from compress.modules.modular import ModularAttentionMixin, full_rope_index, make_modular
from compress.solvers.allocate import allocate_sparsity
from compress.solvers.modular import nystrom_errors, nystrom_mlp

from .conftest import make_tiny

PROBE = torch.randint(0, 128, (2, 24), generator=torch.Generator().manual_seed(7))
# tiny llama: hidden 32, 4 query heads, 2 kv heads, head_dim 8, intermediate 64; per layer qk = vo = 1536, mlp = 6144 weights
PER_LAYER = {"qk": 1536, "vo": 1536, "mlp": 6144}


def _logits(m: torch.nn.Module, ids: torch.Tensor = PROBE) -> torch.Tensor:
    with torch.no_grad():
        return m(input_ids=ids).logits


def _ratio_for(part: str, part_sparsity: float) -> float:
    """The modegpt ratio (of all decoder linear weights) that removes ``part_sparsity`` of one part."""
    return part_sparsity * PER_LAYER[part] / sum(PER_LAYER.values())


@pytest.mark.parametrize("family", ["llama", "qwen2", "mistral"])
def test_unreduced_attention_is_the_upstream_one_in_prefill_and_cached_decode(family: str) -> None:
    model = make_tiny(family)
    ref = copy.deepcopy(model)
    cfg = model.config
    hd = cfg.hidden_size // cfg.num_attention_heads
    for layer in model.model.layers:
        make_modular(layer.self_attn, hd, hd, full_rope_index(cfg.num_key_value_heads, hd))
    assert torch.equal(_logits(model), _logits(ref))
    gen = dict(max_new_tokens=6, do_sample=False, pad_token_id=0)
    with torch.no_grad():
        assert torch.equal(model.generate(PROBE[:1, :10], **gen), ref.generate(PROBE[:1, :10], **gen))


def _zero_pairs(model: torch.nn.Module, keep: dict[int, list[int]]) -> None:
    """Zero the q/k rows of every rotary pair not in ``keep[group]`` (pairs j, j + hd/2)."""
    cfg = model.config
    h, kv = cfg.num_attention_heads, cfg.num_key_value_heads
    hd = cfg.hidden_size // h
    with torch.no_grad():
        for layer in model.model.layers:
            a = layer.self_attn
            for g in range(kv):
                drop = [j for j in range(hd // 2) if j not in keep[g]]
                dims = drop + [j + hd // 2 for j in drop]
                a.k_proj.weight[[g * hd + d for d in dims]] = 0
                for q in range(g * (h // kv), (g + 1) * (h // kv)):
                    a.q_proj.weight[[q * hd + d for d in dims]] = 0


@pytest.mark.parametrize("family", ["llama", "qwen2"])
def test_query_key_slicing_keeps_the_original_rotary_frequencies(family: str, calib_ids: torch.Tensor) -> None:
    """Where the dropped rotary pairs carry nothing, CR slicing is exact: the kept dimensions rotate with
    their own frequencies, each group keeps its own pairs, and the softmax scale is the original one."""
    model = make_tiny(family)
    _zero_pairs(model, {0: [0, 3], 1: [1, 2]})  # different pairs per key-value group, low and high frequencies
    if family == "qwen2":  # a q/k bias on the dropped rows would be a non-zero signal there
        with torch.no_grad():
            for layer in model.model.layers:
                layer.self_attn.q_proj.bias.zero_()
                layer.self_attn.k_proj.bias.zero_()
    ref = _logits(model)
    compress(model, [f"modegpt:ratio={_ratio_for('qk', 0.5)},parts=qk,allocate=uniform"], calib_ids)
    for layer in model.model.layers:
        a = layer.self_attn
        assert isinstance(a, ModularAttentionMixin) and a.qk_dim == 4 and a.q_proj.out_features == 16 and a.k_proj.out_features == 8
        assert a.rope_index.tolist() == [[0, 3, 4, 7], [1, 2, 5, 6]]
    torch.testing.assert_close(_logits(model), ref, atol=1e-5, rtol=1e-5)


def test_value_output_svd_is_exact_on_a_low_rank_value_path(calib_ids: torch.Tensor) -> None:
    model = make_tiny("llama")
    g = torch.Generator().manual_seed(3)
    with torch.no_grad():
        for layer in model.model.layers:
            v = layer.self_attn.v_proj.weight  # (2 groups × 8, 32): each group's rows span 4 dimensions
            for grp in range(2):
                v[grp * 8 : (grp + 1) * 8] = torch.randn(8, 4, generator=g) @ torch.randn(4, 32, generator=g) * 0.2
    ref = _logits(model)
    compress(model, [f"modegpt:ratio={_ratio_for('vo', 0.5)},parts=vo,allocate=uniform"], calib_ids)
    for layer in model.model.layers:
        a = layer.self_attn
        assert a.v_dim == 4 and a.v_proj.weight.shape == (8, 32) and a.o_proj.weight.shape == (32, 16)
    torch.testing.assert_close(_logits(model), ref, atol=1e-4, rtol=1e-4)


def test_nystrom_drops_dead_channels_and_refits_exactly(calib_ids: torch.Tensor) -> None:
    model = make_tiny("llama")
    dead = torch.randperm(64, generator=torch.Generator().manual_seed(5))[:32]
    with torch.no_grad():
        for layer in model.model.layers:
            layer.mlp.gate_proj.weight[dead] = 0
            layer.mlp.up_proj.weight[dead] = 0
    ref = _logits(model)
    compress(model, [f"modegpt:ratio={_ratio_for('mlp', 0.5)},parts=mlp,allocate=uniform"], calib_ids)
    alive = sorted(set(range(64)) - set(dead.tolist()))
    for layer in model.model.layers:
        assert layer.mlp.down_proj.weight.shape == (32, 32)
        assert not isinstance(layer.self_attn, ModularAttentionMixin)
    assert model.config.intermediate_size == 32 and len(alive) == 32
    torch.testing.assert_close(_logits(model), ref, atol=1e-4, rtol=1e-4)


def _spiky_activations(seed: int, n: int = 512, d: int = 48) -> torch.Tensor:
    """Intermediate activations with a massive-activation channel (0) that is nonzero on the first token
    only, where eleven other channels spike too (the pattern of Qwen2.5's layer 3)."""
    g = torch.Generator().manual_seed(seed)
    X = torch.randn(n, d, generator=g, dtype=torch.float64)
    X[:, 0] = 0
    X[0] = 0
    X[0, 0] = 300.0
    X[0, 1:12] = 300.0 * torch.rand(11, generator=g, dtype=torch.float64)
    return X


def test_mlp_selection_keeps_the_channel_that_writes_a_massive_activation() -> None:
    X, held_out = _spiky_activations(0), _spiky_activations(1)
    W = 0.05 * torch.randn(16, 48, generator=torch.Generator().manual_seed(2), dtype=torch.float64)
    W[:, 0] = 0
    W[3, 0] = 2.0  # the one weight that carries channel 0 to the output

    def held_out_error(kept: torch.Tensor, W_new: torch.Tensor) -> float:
        W_hat = torch.zeros_like(W)
        W_hat[:, kept] = W_new
        return float((held_out @ (W - W_hat).T).norm() / (held_out @ W.T).norm())

    kept, W_new = nystrom_mlp(X.T @ X, W, 36)  # the default ranking
    lev_kept, lev_W = nystrom_mlp(X.T @ X, W, 36, select="leverage")
    assert 0 in kept.tolist() and 0 not in lev_kept.tolist()  # leverage sees channel 0 as spanned by the spiking ones
    assert held_out_error(kept, W_new) < 0.6 * held_out_error(lev_kept, lev_W)
    W_hat = torch.zeros_like(W).index_copy(1, kept, W_new)
    calib_error = float(((X @ (W - W_hat).T).norm() / (X @ W.T).norm()) ** 2)
    assert nystrom_errors(X.T @ X, W, [36])[0] == pytest.approx(calib_error, rel=1e-3)  # the knapsack sees the same channels


def test_allocation_keeps_the_budget_and_the_cap() -> None:
    s = [0.05, 0.3, 0.1, 0.02, 0.5, 0.2]
    for ratio, temp in ((0.25, 0.1), (0.4, 0.015), (0.1, 1.0)):
        phi = allocate_sparsity(s, ratio, temp, 0.8)
        assert abs(sum(phi) / len(phi) - ratio) < 1e-9 and max(phi) <= 0.8 + 1e-12
        order = sorted(range(len(s)), key=lambda i: s[i])
        assert all(phi[order[i]] >= phi[order[i + 1]] - 1e-12 for i in range(len(s) - 1))  # less influence, more removed
    assert allocate_sparsity(s, 0.9, 0.1, 0.8) == [0.8] * len(s)


def test_global_allocation_and_checkpoint_round_trip(calib_ids: torch.Tensor, tmp_path: Path) -> None:
    model = make_tiny("llama")
    with torch.no_grad():  # layer 1 barely changes the residual stream: it gets the larger share of the sparsity
        for n in ("self_attn.o_proj", "mlp.down_proj"):
            model.model.layers[1].get_submodule(n).weight.mul_(0.05)
    dense = _logits(model)
    report = compress(model, ["modegpt:ratio=0.3,temperature=0.02"], calib_ids)
    logits = _logits(model)
    assert torch.isfinite(logits).all() and float((logits - dense).norm() / dense.norm()) < 0.5
    widths = [layer.mlp.down_proj.in_features for layer in model.model.layers]
    assert widths[0] > widths[1], widths
    s = report.summary()
    assert 0.2 < s["target_ratio"] < 0.4 and s["model_params_after"] < s["model_params_before"]
    assert any("MoDeGPT: ratio 0.3" in n for n in report.notes)
    save_checkpoint(model, None, tmp_path, {"recipe": report.recipe})
    layers = read_manifest(tmp_path)["structure"]["modegpt"]["layers"]
    assert {int(k) for k in layers} == {0, 1} and all(set(v) == {"qk_dim", "v_dim", "intermediate"} for v in layers.values())
    reloaded, _ = load(tmp_path)
    assert torch.equal(_logits(reloaded), logits)
    with pytest.raises(Exception, match="MoDeGPT's attention"):
        export_dense(model, None, tmp_path / "dense")


def test_mlp_only_uniform_exports_a_plain_checkpoint(calib_ids: torch.Tensor, tmp_path: Path) -> None:
    from transformers import AutoModelForCausalLM

    model = make_tiny("qwen3")  # per-head q/k norms: the MLP alone is reduced
    compress(model, ["modegpt:ratio=0.2,parts=mlp,allocate=uniform"], calib_ids)
    export_dense(model, None, tmp_path)
    plain = AutoModelForCausalLM.from_pretrained(tmp_path, dtype=torch.float32)
    torch.testing.assert_close(_logits(plain), _logits(model))


def test_a_later_pass_gets_only_widths_it_can_take(calib_ids: torch.Tensor) -> None:
    """With a global allocation the widths are chosen at run time: validation checks the later pass on
    every width a layer may get, and the allocation avoids the refused ones."""
    model = make_tiny("llama")
    compress(model, ["modegpt:ratio=0.3,temperature=0.02", "gptq:bits=4,group=16"], calib_ids)
    for layer in model.model.layers:
        assert layer.self_attn.o_proj.in_features % 16 == 0 and layer.mlp.down_proj.in_features % 16 == 0


@pytest.mark.parametrize("recipe, message", [
    (["modegpt:parts=mlp+ffn"], r"parts='mlp\+ffn': each part must be one of mlp, qk, vo"),
    (["gptq:bits=4,group=8", "modegpt:ratio=0.2"], r"modegpt must come before gptq"),
    (["magnitude:sparsity=0.5", "modegpt:ratio=0.2"], r"modegpt must come first: magnitude already changed model\.layers\.0\."),
    (["modegpt:ratio=1.5"], r"ratio"),
    (["modegpt:select=greedy"], r"select.*obs.*leverage"),
])
def test_bad_options_are_refused_before_the_model_is_touched(recipe: list[str], message: str, calib_ids: torch.Tensor) -> None:
    model = make_tiny("llama")
    before = {k: v.clone() for k, v in model.state_dict().items()}
    with pytest.raises(ConfigError, match=message):
        compress(model, recipe, calib_ids)
    assert all(torch.equal(before[k], v) for k, v in model.state_dict().items())


def test_qwen3_query_key_slicing_is_refused_with_the_fix(calib_ids: torch.Tensor) -> None:
    with pytest.raises(ConfigError, match=r"q_norm/k_norm.*use modegpt:parts=mlp\+vo"):
        compress(make_tiny("qwen3"), ["modegpt:ratio=0.2"], calib_ids)
    model = make_tiny("qwen3")
    compress(model, ["modegpt:ratio=0.2,parts=mlp+vo"], calib_ids)
    assert torch.isfinite(_logits(model)).all()


def test_a_ratio_above_the_cap_is_capped_and_said(calib_ids: torch.Tensor, caplog: pytest.LogCaptureFixture) -> None:
    model = make_tiny("llama")
    with caplog.at_level(logging.WARNING, logger="compress.passes.modegpt"):
        report = compress(model, ["modegpt:ratio=0.9,allocate=uniform"], calib_ids)
    assert "above max_sparsity" in caplog.text
    assert report.summary()["target_ratio"] < 0.85 and torch.isfinite(_logits(model)).all()
    for layer in model.model.layers:
        a = layer.self_attn
        assert a.qk_dim >= 2 and a.v_dim >= 1 and layer.mlp.down_proj.in_features >= 8


@pytest.mark.parametrize("structural", ["modegpt:ratio=0.2", "slicegpt:sparsity=0.25"])
def test_compensation_with_nothing_to_compensate_is_refused(structural: str, calib_ids: torch.Tensor) -> None:
    with pytest.raises(ConfigError, match=rf"eora has nothing to work on after {structural.split(':')[0]}: .*put a quantization or pruning pass before eora"):
        compress(make_tiny("llama"), [structural, "eora:rank=2"], calib_ids)


def test_knapsack_allocation_spends_the_budget_where_the_measured_error_is_lowest(calib_ids: torch.Tensor) -> None:
    """Layer 0's MLP has half its channels dead (removing them costs nothing): the knapsack over the
    measured errors removes more from layer 0 than from layer 1, within the parameter budget."""
    model = make_tiny("llama")
    dead = torch.arange(0, 64, 2)
    with torch.no_grad():
        model.model.layers[0].mlp.gate_proj.weight[dead] = 0
        model.model.layers[0].mlp.up_proj.weight[dead] = 0
    report = compress(model, ["modegpt:ratio=0.24,allocate=knapsack,parts=mlp"], calib_ids)
    w0, w1 = (layer.mlp.down_proj.in_features for layer in model.model.layers)
    assert w0 < w1 and w0 >= 32, (w0, w1)
    removed = sum(r.params_before - r.params_after for r in report.records)
    assert 0.24 * 2 * sum(PER_LAYER.values()) <= removed <= 0.3 * 2 * sum(PER_LAYER.values())
    assert any("knapsack over measured relative errors" in n for n in report.notes)



def test_round_to_sets_the_mlp_width_granularity(calib_ids: torch.Tensor) -> None:
    model = make_tiny("llama")
    compress(model, ["modegpt:ratio=0.3,parts=mlp,allocate=uniform,round_to=16"], calib_ids)
    widths = {layer.mlp.down_proj.in_features for layer in model.model.layers}
    assert widths == {32}, widths  # 64 × (1 − 0.45) = 35.2 → 32 with round_to 16 (40 with the default 8)


def test_qwen_shaped_attention_reaches_the_exact_optimum_with_its_biases(calib_ids: torch.Tensor) -> None:
    """Qwen2.5's shape (14 query heads on 2 key-value heads, large q/k/v biases): the query–key pairs
    kept are the ones an exact count on the projections' outputs (bias included) ranks first, and the
    value–output error equals the Eckart–Young optimum of the stacked value path, bias included.
    A solver that scores W alone keeps other pairs and misses that optimum."""
    model = make_tiny("qwen2-gqa7")
    cfg = model.config
    h, kv, hd, d = cfg.num_attention_heads, cfg.num_key_value_heads, cfg.head_dim, cfg.hidden_size
    a = model.model.layers[0].self_attn
    seen: list[torch.Tensor] = []
    hook = a.q_proj.register_forward_pre_hook(lambda _m, args: seen.append(args[0].reshape(-1, d).double()))
    with torch.no_grad():
        model(input_ids=calib_ids)
    hook.remove()
    X = torch.cat(seen)  # layer 0's attention input: the same in the compressed model

    def out(lin: torch.nn.Module) -> torch.Tensor:
        return X @ lin.weight.double().T + lin.bias.double()

    rep, half = h // kv, hd // 2
    eq = out(a.q_proj).square().sum(0).view(kv, rep, hd)
    ek = out(a.k_proj).square().sum(0).view(kv, 1, hd)
    score = (eq * ek).sum(1)
    top = torch.sort(torch.topk(score[:, :half] + score[:, half:], 2, dim=1).indices, dim=1).values
    want_rope = torch.cat([top, top + half], 1)
    V = out(a.v_proj).view(-1, kv, hd)
    W_o = a.o_proj.weight.double()
    Y = [torch.cat([W_o[:, j * hd : (j + 1) * hd] for j in range(g * rep, (g + 1) * rep)]) @ V[:, g].T for g in range(kv)]
    optimum = sum(float((torch.linalg.svdvals(y)[4:] ** 2).sum()) for y in Y)

    per_layer = {"qk": (h + kv) * hd * d, "vo": (h + kv) * hd * d, "mlp": 3 * d * cfg.intermediate_size}
    ratio = 0.5 * (per_layer["qk"] + per_layer["vo"]) / sum(per_layer.values())
    compress(model, [f"modegpt:ratio={ratio},parts=qk+vo,allocate=uniform"], calib_ids)
    assert isinstance(a, ModularAttentionMixin) and a.qk_dim == 4 and a.v_dim == 4
    assert a.rope_index.tolist() == want_rope.tolist()
    V2 = out(a.v_proj).view(-1, kv, 4)
    O2 = a.o_proj.weight.double()
    err = sum(float((Y[g] - torch.cat([O2[:, j * 4 : (j + 1) * 4] for j in range(g * rep, (g + 1) * rep)]) @ V2[:, g].T).square().sum())
              for g in range(kv))
    assert err <= optimum * (1 + 1e-4) + 1e-9, (err, optimum)


def test_the_mean_statistic_survives_the_cache_and_gives_the_affine_maps_energies(tmp_path: Path) -> None:
    """Σx is cached like the Gram, and [[C, Σx], [Σxᵀ, n]] with [W | b] gives Σ(Wx + b)² exactly."""
    from compress.pipeline.stats import LayerStats
    from compress.solvers.modular import affine_system, qk_energy
    from compress.statscache import StatsCache

    g = torch.Generator().manual_seed(4)
    X = torch.randn(3, 50, 6, generator=g) + 2.0
    W, b = torch.randn(5, 6, generator=g, dtype=torch.float64), torch.randn(5, generator=g, dtype=torch.float64)
    stats = LayerStats(frozenset({"gram", "mean"}))
    for x in X:
        stats.observe("q", x)
    cache = StatsCache(tmp_path, "k")
    cache.save_layer(0, stats)
    st = StatsCache(tmp_path, "k").load_layer(0).linears["q"]
    assert st.n_tokens == 150 and torch.allclose(st.x_sum, X.reshape(-1, 6).double().sum(0))
    C, (Wa, Wn) = affine_system(st.gram, st.x_sum, st.n_tokens, [W, W], [b, None])
    direct = (X.reshape(-1, 6).double() @ W.T + b).square().sum(0)
    torch.testing.assert_close(qk_energy(Wa, C), direct, rtol=1e-6, atol=1e-6)  # batch products in float32
    torch.testing.assert_close(qk_energy(Wn, C), (X.reshape(-1, 6).double() @ W.T).square().sum(0), rtol=1e-6, atol=1e-6)
    assert affine_system(st.gram, None, 0, [W], [None]) == (st.gram, [W])
