"""CoSpaDi: the dictionary solvers on synthetic matrices, the stored form, the budget, the global
allocator and the pass's options and refusals on tiny models."""

from __future__ import annotations

import itertools
import random
from pathlib import Path

import pytest
import torch

from compress import compress, load
from compress.checkpoint import save_checkpoint
from compress.errors import ConfigError
from compress.modules import DictLinear
from compress.solvers.allocate import knapsack
from compress.solvers.dictionary import (
    decode_coefficients,
    dict_shape,
    encode_coefficients,
    factorize_dict,
    ksvd,
    omp,
    stored_bits,
    support_format,
)
from compress.solvers.lowrank import factorize, rank_for_ratio

from .conftest import make_tiny

F64 = torch.float64


def _union_of_subspaces(d: int = 32, k: int = 8, s: int = 2, n: int = 300, seed: int = 0) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    D = torch.randn(k, d, generator=g, dtype=F64)
    D /= D.norm(dim=1, keepdim=True)
    C = torch.zeros(n, k, dtype=F64)
    for i in range(n):
        idx = torch.randperm(k, generator=g)[:s]
        C[i, idx] = torch.randn(s, generator=g, dtype=F64)
    return C @ D, D, C


def test_omp_recovers_the_codes_of_a_known_dictionary() -> None:
    Y, D, C = _union_of_subspaces()
    C_hat, mask = omp(D, Y, 2)
    assert torch.allclose(C_hat, C, atol=1e-10)
    assert int(mask.sum(1).max()) == 2


def test_ksvd_recovers_a_union_of_subspaces_to_float_tolerance() -> None:
    Y, _, _ = _union_of_subspaces()
    _, C, mask, history, converged = ksvd(Y, 8, 2, iters=200, seed=0)
    assert history[-1] / float(Y.square().sum()) < 1e-20
    assert int(mask.sum(1).max()) <= 2 and converged


@pytest.mark.parametrize("init", ["svd", "data"])
def test_ksvd_objective_never_increases(init: str) -> None:
    g = torch.Generator().manual_seed(3)
    Y = torch.randn(120, 24, generator=g, dtype=F64) @ torch.randn(24, 24, generator=g, dtype=F64)
    _, _, _, history, _ = ksvd(Y, 16, 4, iters=15, seed=1, init=init, tol=0.0)
    assert len(history) == 15
    for a, b in zip(history, history[1:]):
        assert b <= a * (1 + 1e-12), (a, b)


def _calibration(d_in: int, n: int = 400, seed: int = 0) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    return torch.randn(n, d_in, generator=g, dtype=F64) * torch.rand(d_in, generator=g, dtype=F64).mul(3).add(0.1)


@pytest.mark.parametrize("solver", ["ksvd", "closed-form"])
def test_the_whitened_objective_is_the_output_error(solver: str) -> None:
    g = torch.Generator().manual_seed(0)
    W = torch.randn(40, 24, generator=g, dtype=F64)
    X = _calibration(24)
    L = torch.linalg.cholesky(X.T @ X)
    f = factorize_dict(W, 12, 6, L, solver=solver, iters=5)
    out_err = float((X @ (W - f.C @ f.A).T).square().sum())
    assert f.error == pytest.approx(out_err, rel=1e-8)
    assert f.energy == pytest.approx(float((X @ W.T).square().sum()), rel=1e-10)


def test_closed_form_with_every_coefficient_kept_is_svd_llm() -> None:
    """rho = 1 (s = k) is plain whitened low rank: the same error as SVD-LLM's truncation at rank k."""
    g = torch.Generator().manual_seed(1)
    W = torch.randn(48, 32, generator=g, dtype=F64)
    X = _calibration(32)
    L = torch.linalg.cholesky(X.T @ X)
    f = factorize_dict(W, 10, 10, L, solver="closed-form")
    lr = factorize(W, 10, chol=L)
    assert f.error == pytest.approx(lr.truncation_loss(), rel=1e-8)


def test_sparse_codes_beat_low_rank_at_equal_stored_bits_on_a_union_of_subspaces() -> None:
    Y, _, _ = _union_of_subspaces(d=64, k=60, s=3, n=600, seed=2)  # full rank: no low rank of this size fits it
    d_out, d_in = Y.shape
    ratio = 0.5
    k, s = dict_shape(d_out, d_in, ratio, 2.0, 32)  # type: ignore[misc]
    r = rank_for_ratio(d_out, d_in, ratio)
    assert stored_bits(d_out, d_in, k, d_out * s, 32) <= (d_out + d_in) * r * 32 + 32 * d_out  # within one rank's size
    lr = factorize(Y, r)
    for solver in ("closed-form", "ksvd"):
        f = factorize_dict(Y, k, s, None, solver=solver, iters=20)
        assert f.error < 0.5 * lr.truncation_loss(), solver


def test_closed_form_refinements_never_raise_the_error() -> None:
    g = torch.Generator().manual_seed(5)
    W = torch.randn(96, 48, generator=g, dtype=F64) @ torch.randn(48, 48, generator=g, dtype=F64)
    X = _calibration(48)
    L = torch.linalg.cholesky(X.T @ X)
    errors = [factorize_dict(W, 20, 10, L, solver="closed-form", refits=r, reselect=p).error for r, p in ((0, 0), (2, 0), (2, 2), (4, 4))]
    assert all(b <= a * (1 + 1e-12) for a, b in zip(errors, errors[1:])), errors
    assert errors[-1] < 0.9 * errors[0]


@pytest.mark.parametrize("method", ["omp", "pursuit"])
def test_coding_on_a_fixed_dictionary(method: str) -> None:
    from compress.solvers.dictionary import code_with_dictionary

    Y, D, C = _union_of_subspaces(d=32, k=8, s=2, n=200, seed=4)
    f = code_with_dictionary(Y, D, 2, None, method=method)
    assert f.error / f.energy < (1e-20 if method == "omp" else 0.2)
    assert int(f.mask.sum()) == 2 * 200


@pytest.mark.parametrize("d_out,d_in,ratio,rho,elt", [(1536, 576, 0.2, 2.0, 32), (576, 1536, 0.4, 2.0, 16), (64, 64, 0.3, 1.0, 32),
                                                         (96, 64, 0.5, 16.0, 16), (8, 8, 0.9, 2.0, 32)])
def test_dict_shape_is_the_largest_that_fits_the_budget(d_out: int, d_in: int, ratio: float, rho: float, elt: int) -> None:
    budget = (1 - ratio) * d_out * d_in * elt
    shape = dict_shape(d_out, d_in, ratio, rho, elt)
    if shape is None:
        assert stored_bits(d_out, d_in, 1, d_out, elt) > budget
        return
    k, s = shape
    assert 1 <= s <= k and stored_bits(d_out, d_in, k, d_out * s, elt) <= budget
    s1 = min(k + 1, max(1, round((k + 1) / rho)))
    assert stored_bits(d_out, d_in, k + 1, d_out * s1, elt) > budget


@pytest.mark.parametrize("fmt", ["full", "mask", "index"])
def test_coefficients_round_trip_in_every_support_format(fmt: str) -> None:
    g = torch.Generator().manual_seed(0)
    d_out, k = 37, 21
    C = torch.randn(d_out, k, generator=g)
    mask = torch.ones(d_out, k, dtype=torch.bool) if fmt == "full" else torch.rand(d_out, k, generator=g) < 0.3
    C = C * mask
    values, support, crow = encode_coefficients(C, mask, fmt)
    assert torch.equal(decode_coefficients(values, support, crow, k, d_out), C)


def test_support_format_is_the_smaller_one() -> None:
    assert support_format(100, 64, 100 * 64) == "full"
    assert support_format(100, 64, 100 * 32) == "mask"  # 64 bits per row vs 32 indices of 6 bits
    assert support_format(100, 1024, 100 * 4) == "index"  # 1024 bits per row vs 4 indices of 10 bits


@pytest.mark.parametrize("fmt", ["full", "mask", "index"])
def test_dict_linear_stores_exactly_what_it_counts_and_computes_c_a_x(fmt: str, tmp_path: Path) -> None:
    g = torch.Generator().manual_seed(0)
    d_out, d_in, k = 24, 16, 12
    A = torch.randn(k, d_in, generator=g)
    mask = torch.ones(d_out, k, dtype=torch.bool) if fmt == "full" else torch.rand(d_out, k, generator=g) < 0.4
    C = torch.randn(d_out, k, generator=g) * mask
    bias = torch.randn(d_out, generator=g)
    mod = DictLinear.from_factors(A, C, mask, bias, like=A, fmt=fmt)
    assert mod.fmt == fmt
    x = torch.randn(5, d_in, generator=g)
    assert torch.allclose(mod(x), x @ (C @ A).T + bias, atol=1e-5)
    nnz = int(mask.sum())
    assert mod.storage_bits() == stored_bits(d_out, d_in, k, nnz, 32) if support_format(d_out, k, nnz) == fmt else True
    twin = DictLinear.from_spec(mod.spec(), dtype=torch.float32)
    twin.load_state_dict(mod.state_dict())
    assert torch.equal(twin(x), mod(x))


def test_knapsack_matches_brute_force() -> None:
    rng = random.Random(0)
    for _ in range(40):
        opts = [[(rng.randint(1, 50), rng.random()) for _ in range(rng.randint(1, 4))] for _ in range(5)]
        budget = rng.randint(20, 150)
        best = None
        for combo in itertools.product(*[range(len(o)) for o in opts]):
            bits = sum(opts[i][c][0] for i, c in enumerate(combo))
            err = sum(opts[i][c][1] for i, c in enumerate(combo))
            if bits <= budget and (best is None or err < best - 1e-12):
                best = err
        if best is None:
            with pytest.raises(ValueError):
                knapsack(opts, budget, resolution=budget)
            continue
        pick = knapsack(opts, budget, resolution=budget)  # one unit per bit: the exact optimum
        assert sum(opts[i][c][0] for i, c in enumerate(pick)) <= budget
        assert sum(opts[i][c][1] for i, c in enumerate(pick)) == pytest.approx(best)


def test_knapsack_never_exceeds_a_coarse_budget() -> None:
    rng = random.Random(1)
    opts = [[(rng.randint(1000, 90000), rng.random()) for _ in range(6)] for _ in range(50)]
    budget = 0.5 * sum(max(b for b, _ in o) for o in opts)
    pick = knapsack(opts, budget, resolution=997)
    used = sum(opts[i][c][0] for i, c in enumerate(pick))
    assert used <= budget and used > 0.98 * budget - 50 * budget / 997


# ---------------------------------------------------------------------------------- the pass


def _dicts(model: torch.nn.Module) -> dict[str, DictLinear]:
    return {n: m for n, m in model.named_modules() if isinstance(m, DictLinear)}


def test_closed_form_global_allocation_meets_the_budget(calib_ids: torch.Tensor, tmp_path: Path) -> None:
    model = make_tiny("llama")
    report = compress(model, ["cospadi:ratio=0.4,solver=closed-form,allocate=global"], calib_ids)
    s = report.summary()
    assert s["target_bits_per_weight"] <= 32 * 0.6 + 1e-9
    assert s["target_bits_per_weight"] >= 32 * 0.6 * 0.97  # filled, not left far under the budget
    chosen = {r.info.get("allocated_ratio") for r in report.records if "allocated_ratio" in r.info}
    assert chosen, "no target got an allocated ratio"
    save_checkpoint(model, None, tmp_path, {"recipe": report.recipe})
    reloaded, _ = load(tmp_path)
    ids = calib_ids[:2]
    with torch.no_grad():
        assert torch.equal(reloaded(input_ids=ids).logits, model(input_ids=ids).logits)


def test_shared_dictionary_is_one_tensor_stored_once(calib_ids: torch.Tensor, tmp_path: Path) -> None:
    model = make_tiny("qwen2")
    report = compress(model, ["cospadi:ratio=0.3,solver=closed-form,share=2"], calib_ids)
    mods = _dicts(model)
    q0, q1 = mods["model.layers.0.self_attn.q_proj"], mods["model.layers.1.self_attn.q_proj"]
    assert q0.atoms is q1.atoms and q0.shared == 2
    s = report.summary()
    assert s["target_bits_per_weight"] <= 32 * 0.7 + 1e-9
    save_checkpoint(model, None, tmp_path, {"recipe": report.recipe})
    reloaded, _ = load(tmp_path)
    r = _dicts(reloaded)
    assert r["model.layers.0.self_attn.q_proj"].atoms is r["model.layers.1.self_attn.q_proj"].atoms
    ids = calib_ids[:2]
    with torch.no_grad():
        assert torch.equal(reloaded(input_ids=ids).logits, model(input_ids=ids).logits)
    from compress.models import storage_bytes

    assert storage_bytes(reloaded) == storage_bytes(model)


@pytest.mark.parametrize("options,message", [
    ("share=3", "share=3 does not divide the model's 2 layers; use share= one of 1, 2"),
    ("nonzeros=40", "fewer than nonzeros=40"),
    ("solver=omp", "solver"),
    ("rho=0.5", "rho"),
    ("share=2,allocate=global", "cannot be combined"),
])
def test_bad_options_are_refused_before_any_compute(options: str, message: str, calib_ids: torch.Tensor) -> None:
    model = make_tiny("llama")
    before = {k: v.clone() for k, v in model.state_dict().items()}
    with pytest.raises(ConfigError, match=message):
        compress(model, [f"cospadi:ratio=0.3,{options}"], calib_ids)
    assert all(torch.equal(before[k], v) for k, v in model.state_dict().items())


def test_a_layer_too_small_to_gain_is_kept_dense_and_said_so(calib_ids: torch.Tensor) -> None:
    model = make_tiny("llama", hidden=8, intermediate=8)
    report = compress(model, ["cospadi:ratio=0.95,solver=closed-form"], calib_ids)
    kept = [r for r in report.records if "kept_dense" in r.info]
    assert kept and all(r.module_type == "Linear" for r in kept)


def test_ksvd_iteration_limit_is_a_warning_with_the_reached_error(calib_ids: torch.Tensor, caplog: pytest.LogCaptureFixture) -> None:
    model = make_tiny("llama")
    with caplog.at_level("WARNING"):
        report = compress(model, ["cospadi:ratio=0.3,solver=ksvd,iters=1"], calib_ids)
    assert any("K-SVD stopped at its iteration limit (1)" in r.message and "relative whitened error" in r.message for r in caplog.records)
    assert all(r.module_type == "DictLinear" for r in report.records)  # the layer is kept, never replaced by a fresh one


def test_quantizing_a_dictionary_quantizes_its_atoms_and_values(calib_ids: torch.Tensor, tmp_path: Path) -> None:
    from compress.models import storage_bytes
    from compress.modules import QuantDictLinear

    model = make_tiny("llama")
    ids = calib_ids[:2]
    with torch.no_grad():
        dense = model(input_ids=ids).logits
    report = compress(model, ["cospadi:ratio=0.3,solver=closed-form", "gptq:bits=4,group=16"], calib_ids)
    q = model.get_submodule("model.layers.0.mlp.down_proj")
    assert isinstance(q, QuantDictLinear) and int(q.atoms.codes().max()) < 16
    s = report.summary()
    # 4-bit codes + fp16 scale and 4-bit zero per 16, on ~70 % of the weights' count, plus the row masks
    assert s["target_bits_per_weight"] < 0.7 * (4 + 20 / 16) + 1.0
    with torch.no_grad():
        logits = model(input_ids=ids).logits
    assert float((logits - dense).norm() / dense.norm()) < 0.3
    save_checkpoint(model, None, tmp_path, {"recipe": report.recipe})
    reloaded, _ = load(tmp_path)
    with torch.no_grad():
        assert torch.equal(reloaded(input_ids=ids).logits, logits)
    assert storage_bytes(reloaded) == storage_bytes(model) == s["model_bytes_after"]


def test_per_ic_groups_on_a_dictionary_are_refused_up_front(calib_ids: torch.Tensor) -> None:
    model = make_tiny("llama")
    with pytest.raises(ConfigError, match="gptq: .* after cospadi\\): a DictLinear's parts are quantized .* use dim=oc"):
        compress(model, ["cospadi:ratio=0.3,solver=closed-form", "gptq:bits=4,group=16,dim=ic"], calib_ids)


def test_slow_settings_are_announced_before_the_first_layer(caplog: pytest.LogCaptureFixture) -> None:
    """A pass estimated far above GPTQ's time on the model is announced at planning, with a faster
    option; K-SVD on a layer wider than its practical size names solver=closed-form; GPTQ and the
    closed form at its defaults are not announced."""
    import logging

    from compress.planning import plan

    with caplog.at_level(logging.WARNING):
        plan(make_tiny("llama", hidden=32, intermediate=1100), ["cospadi:solver=ksvd,iters=100"], calib=torch.zeros(2, 8, dtype=torch.long))
    lines = [r.getMessage() for r in caplog.records]
    assert any("GPTQ's time on this model; faster: solver=closed-form" in m for m in lines), lines
    assert any("K-SVD's OMP is impractical" in m and "mlp.gate_proj (1100x32)" in m for m in lines), lines
    caplog.clear()
    with caplog.at_level(logging.WARNING):
        plan(make_tiny("llama"), ["gptq:bits=4,group=16"], calib=torch.zeros(2, 8, dtype=torch.long))
        plan(make_tiny("llama"), ["cospadi:solver=closed-form"], calib=torch.zeros(2, 8, dtype=torch.long))
    assert not [r for r in caplog.records if "GPTQ's time" in r.getMessage()]


def test_cost_estimate_counts_each_pass_on_the_shapes_the_passes_before_leave() -> None:
    from compress.planning.cost import FORWARDS, estimate
    from compress.planning.targets import TargetPlan, TargetStep
    from compress.registry import get_pass
    from compress.solvers.gptq import gptq_work

    gptq = get_pass("gptq")(get_pass("gptq").config_cls())
    t = TargetPlan("a", (64, 128), 64 * 128 * 32, (TargetStep(0, (64, 100), None, frozenset()), TargetStep(1, (64, 100), None, frozenset())))
    ours, ref = estimate(gptq, 1, [t], 1000)
    assert ours == ref == gptq_work(64, 100, 1000) + FORWARDS * 64 * 100 * 1000
