"""Principal directions of a signal from its Gram matrix."""

from __future__ import annotations

import torch

from .linalg import SOLVE_DTYPE


def pca(gram: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Eigenvalues (descending) and eigenvectors (columns) of the symmetric matrix ``gram``, float64."""
    G = gram.to(SOLVE_DTYPE)
    lam, Q = torch.linalg.eigh(0.5 * (G + G.T))
    order = torch.argsort(lam, descending=True)
    return lam[order], Q[:, order]
