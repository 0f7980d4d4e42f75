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


def relative_output_error(W: torch.Tensor, W_hat: torch.Tensor, H: torch.Tensor | None) -> float:
    """‖X(W − Ŵ)ᵀ‖²_F / ‖XWᵀ‖²_F = tr(Δ H Δᵀ) / tr(W H Wᵀ) with H = XᵀX, or the relative squared
    weight error when ``H`` is None."""
    W = W.to(SOLVE_DTYPE)
    D = W - W_hat.to(SOLVE_DTYPE)
    if H is None:
        return float(D.square().sum() / W.square().sum().clamp_min(1e-300))
    H = H.to(SOLVE_DTYPE)
    num = ((D @ H) * D).sum()
    den = ((W @ H) * W).sum().clamp_min(1e-300)
    return float(num / den)


def allocate_ranks(
    spectra: list[torch.Tensor], shapes: list[tuple[int, int]], budget: float
) -> list[int | None]:
    """Global rank allocation under a parameter budget (LoRD's one-shot budgeted ranks).

    Each layer l with singular values σ (descending) and shape (m, n) gains σ_i²/‖W_l‖²_F of
    relative energy per kept direction at a cost of m + n parameters. Directions are taken
    greedily by gain per parameter until the total parameter count reaches ``budget``; a layer
    whose rank reaches the break-even point (factors no smaller than the dense matrix) is kept
    dense. Returns a rank per layer, or None for layers kept dense.
    """
    import heapq

    dense = [False] * len(spectra)
    energy = [float(s.double().square().sum().clamp_min(1e-300)) for s in spectra]
    # every layer keeps at least rank 1
    ranks = [1] * len(spectra)
    used = float(sum(m + n for m, n in shapes))
    heap: list[tuple[float, int]] = []
    for li, (s, (m, n)) in enumerate(zip(spectra, shapes)):
        if len(s) > 1:
            heapq.heappush(heap, (-float(s[1]) ** 2 / energy[li] / (m + n), li))
    while heap:
        _, li = heapq.heappop(heap)
        m, n = shapes[li]
        if used + (m + n) > budget:
            continue
        ranks[li] += 1
        used += m + n
        if not saves_parameters(m, n, ranks[li]):
            # break-even: the dense matrix costs no more than these factors
            used += m * n - ranks[li] * (m + n)
            dense[li] = True
            continue
        nxt = ranks[li]
        if nxt < len(spectra[li]):
            heapq.heappush(heap, (-float(spectra[li][nxt]) ** 2 / energy[li] / (m + n), li))
    return [None if d else r for r, d in zip(ranks, dense)]
