"""2:4 and unstructured pruning: masks, SparseGPT, Wanda, magnitude, ARMOR, the 2:4 modules."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from compress import compress
from compress.errors import ConfigError
from compress.modules import ArmorLinear, Sparse24Linear
from compress.recipe import parse_shorthand
from compress.solvers.armor import armor
from compress.solvers.sparse import nm_mask, satisfies_nm, sparsegpt_prune, unstructured_mask
from compress.solvers.sparse24 import pack_24, unpack_24

from .conftest import make_tiny


def _inputs(n: int, d: int, seed: int) -> torch.Tensor:
    """Correlated inputs with a few outlier channels, like LLM activations."""
    g = torch.Generator().manual_seed(seed)
    X = torch.randn(n, d, generator=g) @ (torch.randn(d, d, generator=g) * 0.3 + torch.eye(d))
    X[:, :3] *= 20.0
    return X


def _out_err(W: torch.Tensor, W_hat: torch.Tensor, X: torch.Tensor) -> float:
    return float((X @ (W - W_hat).T).square().sum())


@pytest.mark.parametrize("seed", range(5))
@pytest.mark.parametrize("n,m", [(2, 4), (4, 8), (1, 4)])
def test_pruned_weights_satisfy_their_pattern(seed: int, n: int, m: int) -> None:
    g = torch.Generator().manual_seed(seed)
    rows, cols = int(torch.randint(1, 40, (1,), generator=g)), m * int(torch.randint(1, 20, (1,), generator=g))
    W = torch.randn(rows, cols, generator=g)
    keep = nm_mask(W.abs(), n, m)
    assert bool(((keep.reshape(rows, -1, m)).sum(dim=2) == n).all())
    assert satisfies_nm(W * keep, n, m)
    X = torch.randn(4 * cols, cols, generator=g)
    pruned, keep2, _ = sparsegpt_prune(W, X.T @ X, nm=(n, m), blocksize=2 * m)
    assert satisfies_nm(pruned, n, m) and bool((pruned[~keep2] == 0).all())


@pytest.mark.parametrize("sparsity", [0.3, 0.5, 0.7])
def test_unstructured_masks_remove_the_fraction(sparsity: float) -> None:
    W = torch.randn(24, 40)
    assert int((~unstructured_mask(W.abs(), sparsity, per_row=False)).sum()) == int(W.numel() * sparsity)
    per_row = unstructured_mask(W.abs(), sparsity, per_row=True)
    assert bool(((~per_row).sum(dim=1) == int(40 * sparsity)).all())
    X = torch.randn(200, 40)
    pruned, _, _ = sparsegpt_prune(W, X.T @ X, sparsity=sparsity, blocksize=16)
    assert abs(float((pruned == 0).float().mean()) - sparsity) < 0.03


def test_sparsegpt_beats_wanda_beats_magnitude_on_outlier_inputs() -> None:
    g = torch.Generator().manual_seed(0)
    W = torch.randn(64, 128, generator=g)
    X = _inputs(1024, 128, 1)
    norms = X.norm(dim=0)
    mag = W * nm_mask(W.abs(), 2, 4)
    wanda = W * nm_mask(W.abs() * norms[None, :], 2, 4)
    sgpt, _, _ = sparsegpt_prune(W, X.T @ X, nm=(2, 4))
    e = {k: _out_err(W, v, X) for k, v in (("magnitude", mag), ("wanda", wanda), ("sparsegpt", sgpt))}
    assert e["sparsegpt"] < e["wanda"] < e["magnitude"], e


def test_armor_proxy_loss_is_monotone_and_beats_nowag_p() -> None:
    g = torch.Generator().manual_seed(2)
    W = torch.randn(32, 64, generator=g)
    X = _inputs(512, 64, 3)
    res = armor(W, X.square().sum(0), block=16, iters=80, lr=1e-3, patience=200)
    L = np.array(res.losses)
    assert (np.diff(L) <= 0).all(), "the proxy loss rose"
    assert L[-1] < 0.8 * L[0], "no progress over the NoWag-P initialisation"
    assert res.iterations == 80 and satisfies_nm(res.core, 2, 4)
    assert torch.allclose(res.weight(), torch.block_diag(*res.A) @ res.core @ torch.block_diag(*res.B), atol=1e-5)


def test_packed_24_round_trip_and_modules_equal_dense_matmul() -> None:
    g = torch.Generator().manual_seed(4)
    W = torch.randn(16, 64, generator=g)
    Wp = W * nm_mask(W.abs(), 2, 4)
    Wp[0, :4] = 0.0  # a group with no survivor is still representable
    values, meta = pack_24(Wp)
    assert values.shape == (16, 32) and meta.shape == (16, 8) and meta.dtype == torch.uint8
    assert torch.equal(unpack_24(values, meta), Wp)
    with pytest.raises(ValueError, match="violates the 2:4 pattern"):
        pack_24(W)
    x = torch.randn(3, 5, 64, generator=g)
    mod = Sparse24Linear.from_dense(Wp, torch.ones(16))
    assert torch.allclose(mod(x), x @ Wp.T + 1, atol=1e-5)
    assert mod.storage_bits() == 16 * 32 * 32 + 16 * 8 * 8
    res = armor(W, torch.ones(64), block=8, iters=3)
    arm = ArmorLinear.from_factors(res.A, res.core, res.B, res.keep, None, like=W)
    assert torch.allclose(arm(x), x @ arm.dense_weight().T, atol=1e-4)
    assert arm.extra_params() == (16 + 64) * 8


@pytest.mark.parametrize(
    "text,match",
    [
        ("sparsegpt:pattern=4:2", "not N:M with 0 < N < M"),
        ("wanda:pattern=2-4", "not N:M"),
        ("magnitude:pattern=2:4,sparsity=0.5", "not both"),
        ("magnitude:pattern=unstructured", "needs sparsity"),
        ("sparsegpt:sparsity=1.0", "must be in"),
        ("armor:iters=0", "must be in"),
    ],
)
def test_bad_pruning_options(text: str, match: str) -> None:
    with pytest.raises(ConfigError, match=match):
        parse_shorthand(text)


def test_bad_shapes_name_the_layer_and_the_sizes(calib_ids: torch.Tensor) -> None:
    with pytest.raises(ConfigError, match=r"q_proj \(32x32\): input dimension 32 is not divisible by M = 6"):
        compress(make_tiny("llama"), ["magnitude:pattern=2:6"], None)
    with pytest.raises(ConfigError, match=r"block size 12 must be a multiple of 4 dividing both dimensions \(block sizes that work: 16, 32\)"):
        compress(make_tiny("llama"), ["armor:block=12,iters=1"], calib_ids)


def test_quantizing_a_24_layer_is_refused_and_pruned_zeros_survive_gptq(calib_ids: torch.Tensor) -> None:
    with pytest.raises(ConfigError, match="gptq cannot follow sparsegpt: sparsegpt makes the linears Sparse24Linear.*prune unstructured or 4:8"):
        compress(make_tiny("llama"), ["sparsegpt:pattern=2:4", "gptq:bits=4,group=16"], calib_ids)
    model = make_tiny("llama")
    compress(model, ["sparsegpt:pattern=4:8", "gptq:bits=4,group=16"], calib_ids)
    for layer in model.model.layers:
        W = layer.mlp.down_proj.dense_weight()
        assert satisfies_nm(W, 4, 8)


def test_ria_score_is_relative_importance_times_activation() -> None:
    """Each entry's share of its column and of its row ℓ1 norms, times ‖X_j‖₂^a; a = 0 drops the activation."""
    from compress.solvers.sparse import ria_score

    W = torch.tensor([[1.0, -2.0], [3.0, 4.0]])
    sq = torch.tensor([4.0, 16.0])  # ‖X_j‖₂ = 2, 4
    expected = torch.tensor([[1 / 4 + 1 / 3, 2 / 6 + 2 / 3], [3 / 4 + 3 / 7, 4 / 6 + 4 / 7]]) * torch.tensor([2.0, 4.0]) ** 0.5
    assert torch.allclose(ria_score(W, sq, 0.5), expected)
    assert torch.allclose(ria_score(W, sq, 0.0), expected / torch.tensor([2.0, 4.0]) ** 0.5)
    assert torch.isfinite(ria_score(torch.zeros(2, 2), sq, 0.5)).all()  # an all-zero row or column divides by nothing


@pytest.mark.parametrize("per_row", [False, True])
def test_ria_unstructured_per_layer_or_per_row(per_row: bool, calib_ids: torch.Tensor) -> None:
    """per_row=true removes exactly half of every output row; per layer (the paper's) half of the matrix,
    rows unevenly."""
    model = make_tiny("llama")
    compress(model, [f"ria:sparsity=0.5,per_row={str(per_row).lower()}"], calib_ids)
    W = model.model.layers[0].mlp.down_proj.weight
    zeros = (W == 0).sum(dim=1)
    assert int((W == 0).sum()) == W.numel() // 2
    assert bool((zeros == W.shape[1] // 2).all()) is per_row
    with pytest.raises(ConfigError, match=r"pass 'ria' option 'a' must be in \[0.0, inf\], got -1.0"):
        parse_shorthand("ria:a=-1")
