"""Numerically careful linear algebra shared by the solvers."""

from __future__ import annotations

import logging

import torch

logger = logging.getLogger(__name__)

#: dtype of decompositions and solves
SOLVE_DTYPE = torch.float64
#: relative damping steps tried (times mean(diag(H))) when a Gram matrix is not positive definite
DAMPING_RAMP = (1e-10, 1e-8, 1e-6, 1e-4, 1e-2, 1e-1, 1.0)


class NotPositiveDefiniteError(RuntimeError):
    """Raised when no damping in :data:`DAMPING_RAMP` makes a matrix positive definite."""


def symmetrize_(H: torch.Tensor, block: int = 1024) -> torch.Tensor:
    """H ← (H + Hᵀ)/2 in place, block by block (the same numbers as ``0.5 * (H + H.T)`` without
    two temporary n×n matrices: a 14336-wide float64 Gram matrix is 1.6 GB)."""
    n = H.shape[0]
    for i in range(0, n, block):
        for j in range(i, n, block):
            b = 0.5 * (H[i : i + block, j : j + block] + H[j : j + block, i : i + block].T)
            H[i : i + block, j : j + block] = b
            H[j : j + block, i : i + block] = b.T
    return H


def cholesky_psd(H: torch.Tensor, name: str = "", overwrite: bool = False) -> tuple[torch.Tensor, float]:
    """Lower Cholesky factor L of a symmetric PSD matrix (H ≈ L Lᵀ), in float64.

    A matrix that is not numerically positive definite (dead input channels, too few tokens) is
    repaired by adding the smallest damping δ·mean(diag H)·I from :data:`DAMPING_RAMP` that makes the
    factorization succeed, with a warning naming the layer. Returns (L, added diagonal).
    ``overwrite``: H (already float64) may be symmetrized in place instead of copied.
    """
    H = symmetrize_(H if overwrite and H.dtype == SOLVE_DTYPE else H.to(SOLVE_DTYPE, copy=True))  # H: (n, n)
    L, info = torch.linalg.cholesky_ex(H)
    if int(info) == 0:
        return L, 0.0
    scale = float(H.diagonal().mean().clamp_min(torch.finfo(SOLVE_DTYPE).tiny))
    if scale <= torch.finfo(SOLVE_DTYPE).tiny:
        scale = 1.0  # an all-zero Gram matrix: the layer's inputs were all zero
    eye = torch.eye(H.shape[0], dtype=SOLVE_DTYPE, device=H.device)
    for rel in DAMPING_RAMP:
        L, info = torch.linalg.cholesky_ex(H + (rel * scale) * eye)
        if int(info) == 0:
            logger.warning(
                "%s: Gram matrix not positive definite; repaired by adding %.3g x I (%.0e x mean diagonal)",
                name or "matrix",
                rel * scale,
                rel,
            )
            return L, rel * scale
    raise NotPositiveDefiniteError(f"{name or 'matrix'}: Gram matrix could not be made positive definite")


def inverse_diagonal_from_cholesky(L: torch.Tensor) -> torch.Tensor:
    """diag((L Lᵀ)⁻¹) = the squared column norms of L⁻¹ (one triangular solve)."""
    Linv = torch.linalg.solve_triangular(L, torch.eye(L.shape[0], dtype=L.dtype, device=L.device), upper=False)
    return Linv.square().sum(dim=0)
