"""Low-rank compensation of a compression error Δ = W − W_c (EoRA, arXiv 2410.21271).

With H = XᵀX = QΛQᵀ (float64, eigenvalues clamped to the smallest positive one), the output
error of a branch B·A is ‖X(Δ − BA)ᵀ‖_F = ‖(Δ − BA)·QΛ^½‖_F, minimized by the truncated SVD of
Δ·QΛ^½ mapped back with Λ^-½Qᵀ (the same identity as SVD-LLM's whitening; the dropped singular values
are exactly the remaining error). Ablations: ``svd`` (plain SVD of Δ, ZeroQuant-V2's LoRC) and
``act`` (diagonal activation scaling, √mean(x²) per input channel).
"""

from __future__ import annotations

import torch

from .linalg import SOLVE_DTYPE


def eigen_projection(H: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(P, P⁻¹) with P = QΛ^½ from H = QΛQᵀ; negative/zero eigenvalues clamped to the smallest positive."""
    H = H.to(SOLVE_DTYPE)
    lam, Q = torch.linalg.eigh(0.5 * (H + H.T))
    pos = lam[lam > 0]
    floor = float(pos.min()) if pos.numel() else 1.0
    lam = lam.clamp_min(floor)
    root = lam.sqrt()
    return Q * root[None, :], (Q / root[None, :]).T


def compensate(
    delta: torch.Tensor, rank: int, *, H: torch.Tensor | None = None, variant: str = "eigen", n_tokens: int = 1
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Rank-``rank`` branch for Δ (d_out, d_in): returns (B (d_out × r), A (r × d_in), singular values)."""
    D = delta.to(SOLVE_DTYPE)
    if variant == "svd":
        P = Pinv = None
    elif variant == "act":
        assert H is not None
        s = (H.diagonal().to(SOLVE_DTYPE) / max(n_tokens, 1)).sqrt()
        s = s.clamp_min(float(s.max()) * 1e-6 + 1e-12)
        P, Pinv = torch.diag(s), torch.diag(1.0 / s)
    elif variant == "eigen":
        assert H is not None
        P, Pinv = eigen_projection(H)
    else:
        raise ValueError(f"unknown variant {variant}")
    M = D if P is None else D @ P
    U, S, Vh = torch.linalg.svd(M, full_matrices=False)
    r = min(rank, S.numel())
    root = S[:r].sqrt()
    B = U[:, :r] * root[None, :]
    A = root[:, None] * Vh[:r]
    if Pinv is not None:
        A = A @ Pinv
    return B, A, S
