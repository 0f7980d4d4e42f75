"""EoRA and LQ-LoRA: optimality, monotonicity, the budget program, composition and exports."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch

from compress import compress, load
from compress.errors import ConfigError
from compress.modules import LoRALinear, QuantLinear
from compress.passes.base import PassPlan
from compress.solvers.allocate import integer_program as allocate
from compress.solvers.eora import compensate
from compress.solvers.lqlora import lq_decompose
from compress.solvers.quant import QuantSpec, quantize_rtn

from .conftest import make_tiny


def _setup(seed: int = 0) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    W = torch.randn(48, 96, generator=g, dtype=torch.float64)
    X = torch.randn(800, 96, generator=g, dtype=torch.float64) @ (torch.randn(96, 96, generator=g, dtype=torch.float64) * torch.logspace(0, -2, 96, dtype=torch.float64))
    X[:, 5] *= 25
    Wc = quantize_rtn(W.float(), QuantSpec(bits=3, group_size=32)).dequantize().double()
    return W, Wc, X


def _err(W: torch.Tensor, W_hat: torch.Tensor, X: torch.Tensor) -> float:
    return float((X @ (W - W_hat).T).square().sum())


@pytest.mark.parametrize("rank", [1, 4, 16])
def test_eora_is_the_output_error_optimum_and_beats_plain_svd(rank: int) -> None:
    W, Wc, X = _setup(rank)
    H = X.T @ X
    delta = W - Wc
    B, A, S = compensate(delta, rank, H=H, variant="eigen")
    e_eora = _err(W, Wc + B @ A, X)
    # the whitened-SVD identity: the remaining error is the sum of the dropped squared singular values
    assert e_eora == pytest.approx(float(S[rank:].square().sum()), rel=1e-6)
    Bs, As, _ = compensate(delta, rank, variant="svd")
    Ba, Aa, _ = compensate(delta, rank, H=H, variant="act", n_tokens=800)
    assert e_eora <= _err(W, Wc + Bs @ As, X) * (1 + 1e-9)
    assert e_eora <= _err(W, Wc + Ba @ Aa, X) * (1 + 1e-9)


def test_lqlora_error_is_non_increasing_until_it_stops() -> None:
    g = torch.Generator().manual_seed(1)
    W = torch.randn(64, 128, generator=g) + 2 * torch.randn(64, 4, generator=g) @ torch.randn(4, 128, generator=g)
    for levels in ("nf", "uniform"):
        res = lq_decompose(W, 8, QuantSpec(bits=3, group_size=64, levels=levels), iters=100)
        e = np.array(res.errors)
        assert (np.diff(e[:-1]) <= 0).all() and res.error == e.min()
        assert len(e) < 100 or (np.diff(e) <= 0).all()
        W_hat = res.q.dequantize() + res.L1 @ res.L2
        assert float((W - W_hat).norm()) == pytest.approx(res.error, rel=1e-4)


def test_budget_program_meets_the_budget_and_beats_uniform() -> None:
    g = torch.Generator().manual_seed(2)
    mats = [torch.randn(32, 64, generator=g) * s for s in (0.1, 1.0, 5.0, 1.0)]
    mats[1] = mats[1] @ torch.diag(torch.logspace(0, -3, 64))  # an easy matrix
    bits = (2, 3, 4)
    errors = [[float((W - quantize_rtn(W, QuantSpec(bits=b, group_size=32)).dequantize()).square().sum()) for b in bits] for W in mats]
    costs = [[float(b * W.numel()) for b in bits] for W in mats]
    budget = 3.0 * sum(W.numel() for W in mats)
    pick = allocate(errors, costs, budget)
    assert sum(costs[i][p] for i, p in enumerate(pick)) <= budget
    uniform = sum(e[1] for e in errors)
    assert sum(errors[i][p] for i, p in enumerate(pick)) < uniform
    with pytest.raises(ValueError, match="below the smallest reachable cost"):
        allocate(errors, costs, 1.0 * sum(W.numel() for W in mats))


def test_composition_round_trip_exports_and_bad_inputs(calib_ids: torch.Tensor, tmp_path: Path) -> None:
    from safetensors.torch import load_file

    from compress.checkpoint import save_checkpoint
    from compress.export_peft import export_peft

    model = make_tiny("llama")
    dense = model(input_ids=calib_ids).logits.detach()
    ref = make_tiny("llama")
    compress(ref, ["gptq:bits=3,group=16"], calib_ids)
    e_q = float((ref(input_ids=calib_ids).logits.detach() - dense).norm())
    report = compress(model, ["gptq:bits=3,group=16", "eora:rank=4"], calib_ids)
    out = model(input_ids=calib_ids).logits.detach()
    assert float((out - dense).norm()) < e_q
    assert isinstance(model.model.layers[0].self_attn.q_proj, LoRALinear)
    save_checkpoint(model, None, tmp_path / "c", {})
    m2, _ = load(tmp_path / "c")
    assert torch.equal(m2(input_ids=calib_ids).logits.detach(), out)
    names = json.loads((tmp_path / "c" / "manifest.json").read_text())["modules"]
    assert not any(n.endswith(".base") for n in names), "nested modules are described by their parent"
    export_peft(model, tmp_path / "peft")
    cfg = json.loads((tmp_path / "peft" / "adapter_config.json").read_text())
    assert cfg["r"] == 4 and "q_proj" in cfg["target_modules"]
    t = load_file(str(tmp_path / "peft" / "adapter_model.safetensors"))
    assert t["base_model.model.model.layers.0.self_attn.q_proj.lora_A.weight"].shape == (4, 32)
    assert {r.pass_name for r in report.records} == {"gptq", "eora"}
    with pytest.raises(ConfigError, match="put a compressing pass before it"):
        compress(make_tiny("llama"), ["eora:rank=4"], calib_ids)
    with pytest.raises(ConfigError, match="eora rank 40 must be below 32"):
        compress(make_tiny("llama"), ["gptq:bits=3,group=16", "eora:rank=40"], calib_ids)
    with pytest.raises(ConfigError, match=r"eora: model.layers.0.self_attn.k_proj \(16x32 after rtn\): an eora branch of rank 8 costs "
                                          r"12,288 bits, more than the 11,520 bits saved on this layer by rtn; use rank=7 or lower"):
        compress(make_tiny("llama"), ["rtn:bits=8,group=16", "eora:rank=8"], calib_ids)
    with pytest.raises(ConfigError, match="below the smallest reachable"):
        compress(make_tiny("llama"), ["lq-lora:rank=4,budget=2"], calib_ids)


@pytest.mark.parametrize("branch_bits", [0, 8])
def test_lqlora_budget_counts_what_is_stored(calib_ids, branch_bits):
    """The integer program's cost model equals the bits the compressed modules store, branch included."""
    from compress.modules import storage_bits

    model = make_tiny("llama")
    report = compress(model, [f"lq-lora:rank=4,budget=12,branch_bits={branch_bits}"], calib_ids)
    s = report.summary()
    assert s["target_bits_per_weight"] <= 12.0 + 1e-9
    mods = [model.get_submodule(r.name) for r in report.records if r.pass_name == "lq-lora"]
    assert mods and sum(storage_bits(m) for m in mods) / sum(m.num_weights() for m in mods) == pytest.approx(s["target_bits_per_weight"], rel=1e-6)
    if branch_bits:
        assert not isinstance(next(m for m in mods if isinstance(m, LoRALinear)).lora_A, torch.nn.Linear)


def test_lqlora_budget_drops_the_low_rank_term_where_codes_buy_more(calib_ids):
    """A budget below what 2-bit codes plus a rank-8 term cost on every matrix: with rank_choice
    (the default) the program gives some matrices no low-rank term and meets the budget; without
    it the budget is refused up front, naming the fix."""
    model = make_tiny("llama")
    report = compress(model, ["lq-lora:rank=8,budget=4"], calib_ids)
    ranks = [r.info["rank"] for r in report.records if r.pass_name == "lq-lora"]
    assert 0 in ranks and report.summary()["target_bits_per_weight"] <= 4.0 + 1e-9
    assert any(isinstance(m, QuantLinear) for n, m in model.named_modules() if "layers" in n)
    with pytest.raises(ConfigError, match="below the smallest reachable .*rank_choice=true"):
        compress(make_tiny("llama"), ["lq-lora:rank=8,budget=4,rank_choice=false"], calib_ids)


def test_lq_decompose_stops_when_improvement_stalls() -> None:
    from compress.solvers.lqlora import lq_decompose
    from compress.solvers.quant import QuantSpec

    W = torch.randn(64, 128, generator=torch.Generator().manual_seed(1))
    spec = QuantSpec(bits=3, group_size=32, levels="nf")
    full = lq_decompose(W, 4, spec, iters=50, tol=0.0)
    loose = lq_decompose(W, 4, spec, iters=50, tol=0.5)
    assert len(loose.errors) < len(full.errors)
    assert len(loose.errors) == 2  # the second alternation improves by less than half: stop there
    assert full.error <= loose.error


def test_lqlora_budget_at_a_uniform_cost_selects_that_configuration_when_it_is_optimal() -> None:
    """Identical matrices with identical input Grams, and a budget equal to one (bits, group)
    configuration's cost everywhere: where that configuration lies on the convex frontier of
    (cost, output error), the program must select it for every matrix."""
    from types import SimpleNamespace

    from compress.passes.lqlora import LQLoRAConfig, LQLoRAPass
    from compress.pipeline.stats import LayerStats

    g = torch.Generator().manual_seed(3)
    W = torch.randn(48, 64, generator=g)
    X = torch.randn(512, 64, generator=g) * torch.linspace(0.2, 3.0, 64)
    names = ["a", "b", "c", "d"]
    layer = torch.nn.Module()
    for n in names:
        lin = torch.nn.Linear(64, 48, bias=False)
        lin.weight.data.copy_(W)
        layer.add_module(n, lin)
    stats = LayerStats(frozenset({"gram"}))
    for n in names:
        stats.observe(n, X)
    adapter = SimpleNamespace(layers_path="m", groups=lambda _layer: [names])
    from compress.modules.lora import branch_bits as _branch_cost
    from compress.passes.lqlora import _q_bits

    cost = _q_bits(48, 64, 3, 64, "nf") + _branch_cost(48, 64, 2, 0, 32)
    p = LQLoRAPass(LQLoRAConfig(rank=2, budget=cost / (48 * 64), rank_choice=False))
    p.prepare(torch.nn.Module(), adapter, PassPlan())
    p.profile_layer(0, layer, stats)
    opts, errs, costs = p._options[0], p._errors[0], p._costs[0]
    k = opts.index((3, 64, 2))
    # (3, 64) is on the lower convex frontier: no pair of options mixes to a lower error at its cost
    for i in range(len(opts)):
        for j in range(len(opts)):
            if costs[i] < costs[k] < costs[j]:
                t = (costs[k] - costs[i]) / (costs[j] - costs[i])
                assert errs[k] < (1 - t) * errs[i] + t * errs[j]
    p.profile_done()
    assert set(p._choice.values()) == {(3, 64, 2)} and len(p._choice) == 4


@pytest.mark.parametrize("objective", ["relative", "output"])
def test_lqlora_budget_relative_objective_ignores_the_scale_of_a_layers_activations(objective: str) -> None:
    """Multiplying one matrix's inputs by 30 (an outlier-heavy layer) leaves the relative objective's
    allocation unchanged; the absolute output error moves bits to that matrix."""
    from types import SimpleNamespace

    from compress.passes.lqlora import LQLoRAConfig, LQLoRAPass
    from compress.pipeline.stats import LayerStats

    names = ["a", "b", "c", "d"]

    def allocation(scale: float) -> dict[str, tuple[int, int, int]]:
        g = torch.Generator().manual_seed(5)
        layer = torch.nn.Module()
        stats = LayerStats(frozenset({"gram"}))
        for n in names:
            lin = torch.nn.Linear(64, 48, bias=False)
            lin.weight.data.copy_(torch.randn(48, 64, generator=g))
            layer.add_module(n, lin)
            X = torch.randn(256, 64, generator=g) * torch.linspace(0.2, 3.0, 64)
            stats.observe(n, X * (scale if n == "a" else 1.0))
            stats.reset_sharing()
        p = LQLoRAPass(LQLoRAConfig(rank=2, budget=6.5, objective=objective))
        p.prepare(torch.nn.Module(), SimpleNamespace(layers_path="m", groups=lambda _layer: [names]), PassPlan())
        p.profile_layer(0, layer, stats)
        p.profile_done()
        return {k.split(".")[-1]: v for k, v in p._choice.items()}

    base, scaled = allocation(1.0), allocation(30.0)
    if objective == "relative":
        assert scaled == base
    else:
        assert scaled["a"][0] > base["a"][0]


@pytest.mark.parametrize("levels", ["nf", "uniform"])
def test_lqlora_feedback_estimate_is_each_options_own_sweep(levels: str) -> None:
    """The budget's estimate with feedback sweeps every option at once (rows stacked); each option's
    error equals a GPTQ run of that option alone (static groups, activation order), and 8-bit codes
    are rounded to nearest."""
    from compress.solvers.gptq import gptq_quantize
    from compress.solvers.lqlora import feedback_errors, one_alternation_errors
    from compress.solvers.metrics import output_error

    W, _, X = _setup(3)
    W, H = W.float(), (X.T @ X).float()
    opts = [(2, 32), (3, 32), (4, 96), (8, 32)]
    got = dict(feedback_errors(W, H, (4, 0), opts, levels, True))
    rtn = dict(one_alternation_errors(W, H, (4, 0), opts, levels, True))
    U, S, Vh = torch.linalg.svd(W.double(), full_matrices=False)
    for (b, g, r), e in got.items():
        R = W - ((U[:, :r] * S[:r]) @ Vh[:r]).float() if r else W
        if b == 8:
            assert e == pytest.approx(rtn[(b, g, r)], rel=1e-6)
            continue
        q, _ = gptq_quantize(R, H, QuantSpec(bits=b, group_size=g, levels=levels), actorder=True, static_groups=True)
        assert e == pytest.approx(output_error(R - q.dequantize(), H) / output_error(W, H), rel=1e-4)
        assert e < rtn[(b, g, r)]


def test_lqlora_feedback_needs_calibration_and_is_reported(calib_ids) -> None:
    with pytest.raises(Exception, match="calibration"):
        compress(make_tiny("llama"), ["lq-lora:bits=3,group=16,rank=4"])
    compress(make_tiny("llama"), ["lq-lora:bits=3,group=16,rank=4,feedback=false"])  # data-free, as the paper
    errs = {}
    for fb in ("true", "false"):
        report = compress(make_tiny("llama"), [f"lq-lora:bits=3,group=16,rank=4,feedback={fb}"], calib_ids)
        errs[fb] = [r.info for r in report.records if r.pass_name == "lq-lora"]
    assert all(i["feedback"] and i["error_metric"] == "rel_output_err" for i in errs["true"])
    assert not any(i["feedback"] for i in errs["false"])
