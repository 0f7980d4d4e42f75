"""The low-rank solvers on synthetic matrices."""

from __future__ import annotations

import logging

import pytest
import torch

from compress.solvers.allocate import allocate_ranks
from compress.solvers.linalg import cholesky_psd
from compress.solvers.lowrank import factorize, rank_for_ratio, saves_parameters
from compress.solvers.metrics import relative_output_error


def _correlated_inputs(n: int, d: int, seed: int = 0) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    mix = torch.randn(d, d, generator=g, dtype=torch.float64)
    scales = torch.logspace(0, -3, d, dtype=torch.float64)
    X = torch.randn(n, d, generator=g, dtype=torch.float64) @ (mix * scales[:, None])
    X[:, 3] *= 30.0  # an outlier channel, as in LLM activations
    return X


def test_whitened_truncation_loss_is_dropped_singular_values() -> None:
    g = torch.Generator().manual_seed(0)
    W = torch.randn(24, 40, generator=g, dtype=torch.float64)
    X = _correlated_inputs(400, 40)
    H = X.T @ X
    L, added = cholesky_psd(H)
    assert added == 0.0
    f = factorize(W, 7, chol=L)
    W_hat = f.B @ f.A
    err_whitened = float(((W - W_hat) @ L).square().sum())
    err_output = float((X @ (W - W_hat).T).square().sum())
    dropped = float(f.sigma[7:].square().sum())
    assert f.rank == 7
    assert err_whitened == pytest.approx(dropped, rel=1e-8)
    assert err_output == pytest.approx(dropped, rel=1e-6)


def test_whitening_beats_plain_and_diagonal_scaling_on_output_error() -> None:
    g = torch.Generator().manual_seed(1)
    W = torch.randn(32, 48, generator=g, dtype=torch.float64)
    X = _correlated_inputs(600, 48, seed=2)
    H = X.T @ X
    L, _ = cholesky_psd(H)
    r = 8
    e_svdllm = relative_output_error(W, (lambda f: f.B @ f.A)(factorize(W, r, chol=L)), H)
    e_svd = relative_output_error(W, (lambda f: f.B @ f.A)(factorize(W, r)), H)
    s = X.abs().mean(0).sqrt()
    e_asvd = relative_output_error(W, (lambda f: f.B @ f.A)(factorize(W, r, diag=s)), H)
    assert e_svdllm < e_asvd < e_svd


def test_cholesky_repairs_singular_gram_with_warning(caplog: pytest.LogCaptureFixture) -> None:
    X = _correlated_inputs(100, 16)
    X[:, 5] = 0.0  # a dead input channel makes H singular
    H = X.T @ X
    with caplog.at_level(logging.WARNING):
        L, added = cholesky_psd(H, "layers.0.mlp.down_proj")
    assert added > 0
    assert "layers.0.mlp.down_proj" in caplog.text
    assert torch.isfinite(L).all()
    # the repair is minimal: the factor reproduces H up to the added diagonal
    assert torch.allclose(L @ L.T, H + added * torch.eye(16, dtype=H.dtype), atol=1e-6 * float(H.diagonal().mean()))


def test_cholesky_of_zero_gram_is_finite() -> None:
    L, added = cholesky_psd(torch.zeros(8, 8))
    assert added > 0 and torch.isfinite(L).all()


@pytest.mark.parametrize("m,n", [(64, 64), (576, 1536), (192, 576), (7, 300)])
@pytest.mark.parametrize("ratio", [0.01, 0.2, 0.5, 0.9])
def test_rank_for_ratio_removes_at_least_ratio(m: int, n: int, ratio: float) -> None:
    r = rank_for_ratio(m, n, ratio)
    assert r >= 1
    if r > 1:
        assert r * (m + n) <= (1 - ratio) * m * n + 1e-9
        assert (r + 1) * (m + n) > (1 - ratio) * m * n
    assert saves_parameters(m, n, r) or r == 1


def test_allocate_ranks_meets_budget_and_prefers_low_rank_layers() -> None:
    g = torch.Generator().manual_seed(0)
    low = torch.randn(64, 4, generator=g) @ torch.randn(4, 64, generator=g)  # rank 4
    full = torch.randn(64, 64, generator=g)
    spectra = [torch.linalg.svdvals(low), torch.linalg.svdvals(full)]
    shapes = [(64, 64), (64, 64)]
    budget = 0.5 * 2 * 64 * 64
    ranks = allocate_ranks(spectra, shapes, budget)
    used = sum(64 * 64 if r is None else r * 128 for r in ranks)
    assert used <= budget + 128
    assert ranks[0] is not None and ranks[0] <= 6  # the rank-4 matrix needs few directions
    assert ranks[1] is None or ranks[1] > ranks[0]
