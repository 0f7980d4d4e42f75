"""The OBS column sweep shared by GPTQ (quantization) and SparseGPT (pruning).

With H = XᵀX (+ damping) and U the upper Cholesky factor of H⁻¹, columns of W are processed left
to right in blocks; each column is replaced by its compressed value, and the error, scaled by
1/U_jj, is propagated to the not-yet-processed columns through row j of U (Frantar et al., GPTQ
eqs. 2–4, "Lazy batch updates" + "Cholesky reformulation"). The compression of a column is a
callback, so the same sweep serves quantization and pruning.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable

import torch

from .linalg import SOLVE_DTYPE, cholesky_psd

#: dtype of the column sweep (the factorizations run in SOLVE_DTYPE)
SWEEP_DTYPE = torch.float32


def inverse_hessian_cholesky(H: torch.Tensor, damp: float, name: str = "") -> tuple[torch.Tensor, torch.Tensor]:
    """Upper Cholesky factor of (H + damp·mean(diag H)·I)⁻¹, in float64; dead inputs (H_jj = 0)
    get H_jj = 1. Returns (U, dead mask)."""
    H = H.to(SOLVE_DTYPE, copy=True)  # H: (n, n); at most three n×n float64 matrices live at once
    dead = H.diagonal() == 0
    H[dead, dead] = 1.0
    mean_diag = float(H.diagonal().mean())
    H.diagonal().add_(damp * mean_diag)
    # With J the order reversal, J·H·J = M·Mᵀ (M lower) gives H = R·Rᵀ with R = J·M·J upper, so
    # H⁻¹ = R⁻ᵀ·R⁻¹ and R⁻¹ (upper, positive diagonal) is the upper Cholesky factor of H⁻¹: one
    # factorization and one triangular inverse instead of factor, invert and factor again
    Hf = H.flip(0, 1)
    del H
    M, _ = cholesky_psd(Hf, name, overwrite=True)
    del Hf
    R = M.flip(0, 1)  # at most three n×n float64 matrices live at once, as before
    del M
    eye = torch.eye(R.shape[0], dtype=R.dtype, device=R.device)
    U = torch.linalg.solve_triangular(R, eye, upper=True)
    return U, dead


@dataclass
class Block:
    """The sweep's working block: columns [i1, i2) of the current weights W1 (updated in place as
    columns are compressed) and the matching block U1 of the inverse-Hessian factor."""

    i1: int
    i2: int
    W1: torch.Tensor  # (d_out, i2 - i1)
    U1: torch.Tensor  # (i2 - i1, i2 - i1)


def obs_sweep(
    W: torch.Tensor,
    U: torch.Tensor,
    compress_column: Callable[[int, torch.Tensor, Block], torch.Tensor],
    *,
    blocksize: int = 128,
    on_block: Callable[[Block], None] | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Sweep the columns of W (d_out, n) with error feedback.

    ``compress_column(j, w, block)`` returns the compressed value of column j given its current
    value w (d_out,); ``block`` gives the current values of the block's later columns.
    ``on_block(block)`` runs before each block (e.g. to choose a pruning mask from the current
    weights). Returns (compressed W, per-column loss Σ (w−ŵ)²/U_jj²).
    """
    W = W.to(SWEEP_DTYPE).clone()
    U = U.to(SWEEP_DTYPE)
    d_out, n = W.shape
    out = torch.zeros_like(W)
    losses = torch.zeros(n, dtype=SWEEP_DTYPE, device=W.device)
    for i1 in range(0, n, blocksize):
        i2 = min(i1 + blocksize, n)
        W1 = W[:, i1:i2].clone()  # (d_out, b)
        U1 = U[i1:i2, i1:i2]
        Err1 = torch.zeros_like(W1)
        block = Block(i1, i2, W1, U1)
        if on_block is not None:
            on_block(block)
        for i in range(i2 - i1):
            w = W1[:, i]
            d = U1[i, i]
            q = compress_column(i1 + i, w, block)
            out[:, i1 + i] = q
            losses[i1 + i] = ((w - q) ** 2).sum() / d**2
            err = (w - q) / d
            W1[:, i:] -= err[:, None] @ U1[i, i:][None, :]
            Err1[:, i] = err
        W[:, i2:] -= Err1 @ U[i1:i2, i2:]
    return out, losses
