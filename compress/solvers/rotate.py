"""Rotation and slicing of the residual stream (SliceGPT's math), on plain tensors.

Shapes: W is (d_out, d_in); a basis Q is (d, d′) with orthonormal columns; Gram matrices are (d, d)
and float64.
"""

from __future__ import annotations

import torch

from .linalg import SOLVE_DTYPE
from .pca import pca


def kept_dim(d: int, sparsity: float, round_to: int) -> int:
    """The sliced hidden size: (1 − sparsity)·d rounded to a multiple of ``round_to`` (at least one multiple)."""
    if sparsity == 0:
        return d
    k = int(round((1 - sparsity) * d / round_to)) * round_to
    return min(d, max(round_to, k))


def principal_basis(gram: torch.Tensor, k: int) -> torch.Tensor:
    """The k leading eigenvectors (d, k) of a Gram matrix, float64."""
    _, Q = pca(gram)
    return Q[:, :k]


def scale_inputs(W: torch.Tensor, gamma: torch.Tensor) -> torch.Tensor:
    """W·diag(γ): a norm's scale folded into a linear that reads the norm's output (float64)."""
    return W.to(SOLVE_DTYPE) * gamma.to(SOLVE_DTYPE)[None, :]


def rotate_inputs(W: torch.Tensor, Q: torch.Tensor) -> torch.Tensor:
    """W·Q: a linear reading the stream in basis Q (d_out, d′)."""
    return W.to(SOLVE_DTYPE) @ Q.to(W.device, SOLVE_DTYPE)


def rotate_outputs(W: torch.Tensor, Q: torch.Tensor) -> torch.Tensor:
    """Qᵀ·W: a linear writing the stream in basis Q (d′, d_in)."""
    return Q.to(W.device, SOLVE_DTYPE).T @ W.to(SOLVE_DTYPE)


def onto_row_space(G: torch.Tensor, E: torch.Tensor) -> torch.Tensor:
    """P·G·P with P the projector onto the row space of ``E`` (vocab, d): a tied head's logits see
    only the part of its input that the vocabulary matrix can read."""
    K = E.detach().to(SOLVE_DTYPE).T @ E.detach().to(SOLVE_DTYPE)
    lam, V = torch.linalg.eigh(K.to(G.device))
    V = V[:, lam > lam.max() * 1e-10]
    P = V @ V.T
    return P @ G.to(SOLVE_DTYPE) @ P


def joint_gram(G_embed: torch.Tensor, G_head: torch.Tensor, head_weight: float) -> torch.Tensor:
    """Trace-normalized sum of the layer-0 input's Gram and ``head_weight`` times the head input's:
    the subspace kept for a matrix that both the embedding lookup and the tied head read."""
    return G_embed / G_embed.trace() + head_weight * G_head / G_head.trace()


def net_removed(d: int, k: int, per_dim: int, n_matrices: int) -> int:
    """Parameters removed by slicing d → k when every hidden dimension costs ``per_dim`` parameters
    and ``n_matrices`` k × k shortcut/mixing matrices are added."""
    return (d - k) * per_dim - n_matrices * k * k
