"""Low-rank factorizations of a linear layer W (d_out × d_in), optionally in a scaled space.

All share one identity: for a scaling S of the input space (W S is factorized, the result is
mapped back with S⁻¹), truncating the SVD of W S to rank r costs exactly Σ_{i>r} σ_i² in
‖(W − Ŵ) S‖²_F. With S the Cholesky factor of H = XᵀX this is the output error ‖X(W − Ŵ)ᵀ‖²_F on
the calibration inputs (SVD-LLM); with S diagonal it is ASVD's activation-aware scaling; with
S = I it is plain truncated SVD.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from .linalg import SOLVE_DTYPE


@dataclass
class LowRankFactors:
    """Ŵ = B @ A with B (d_out × r) and A (r × d_in); ``sigma`` holds every singular value of W S."""

    B: torch.Tensor
    A: torch.Tensor
    sigma: torch.Tensor

    @property
    def rank(self) -> int:
        return int(self.A.shape[0])

    def truncation_loss(self) -> float:
        """Σ_{i>r} σ_i²: the squared error in the scaled space."""
        return float(self.sigma[self.rank :].square().sum())


def rank_for_ratio(d_out: int, d_in: int, ratio: float) -> int:
    """Rank r that removes a fraction ``ratio`` of the layer's d_out·d_in weights:
    r = floor((1 − ratio)·d_out·d_in / (d_out + d_in)), at least 1."""
    return max(1, int((1.0 - ratio) * d_out * d_in // (d_out + d_in)))


def saves_parameters(d_out: int, d_in: int, rank: int) -> bool:
    """Whether the factors (d_out + d_in)·r are fewer than the dense d_out·d_in weights."""
    return rank * (d_out + d_in) < d_out * d_in


def factorize(
    W: torch.Tensor,
    rank: int,
    *,
    chol: torch.Tensor | None = None,
    diag: torch.Tensor | None = None,
) -> LowRankFactors:
    """Rank-``rank`` factorization of W in the space scaled by ``chol`` (lower-triangular, d_in × d_in)
    or ``diag`` (d_in,) or neither. Computed in float64 with a full SVD (randomized SVD breaks the
    whitened truncation at high ratios). Factors are split √Σ to each side:
    B = U_r √Σ_r, A = √Σ_r V_rᵀ S⁻¹."""
    if chol is not None and diag is not None:
        raise ValueError("give chol or diag, not both")
    W = W.to(SOLVE_DTYPE)  # (d_out, d_in)
    if chol is not None:
        M = W @ chol.to(SOLVE_DTYPE)
    elif diag is not None:
        M = W * diag.to(SOLVE_DTYPE)[None, :]
    else:
        M = W
    U, sigma, Vh = torch.linalg.svd(M, full_matrices=False)  # U: (d_out, k), Vh: (k, d_in)
    r = min(rank, sigma.shape[0])
    root = sigma[:r].sqrt()
    B = U[:, :r] * root[None, :]  # (d_out, r)
    A = root[:, None] * Vh[:r]  # (r, d_in), still in the scaled space
    if chol is not None:
        # A S⁻¹: solve X·L = A for X with L lower-triangular
        A = torch.linalg.solve_triangular(chol.to(SOLVE_DTYPE), A, upper=False, left=False)
    elif diag is not None:
        A = A / diag.to(SOLVE_DTYPE)[None, :]
    return LowRankFactors(B=B, A=A, sigma=sigma)
