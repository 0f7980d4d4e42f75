"""Pruning masks and SparseGPT.

Masks are boolean "keep" tensors shaped like W (d_out, d_in). Patterns:
- N:M (N < M): in every group of M consecutive inputs of a row, N weights are kept (2:4 keeps 2 of 4);
- unstructured: a fraction ``sparsity`` of weights is removed, per output row or per layer.

SparseGPT (Frantar & Alistarh, arXiv 2301.00774) runs on the OBS sweep shared with GPTQ: for each
block of columns the mask is chosen from w²/U_jj² of the current (already updated) weights
(unstructured), or for N:M at every M-th column from the next M columns; pruned weights become 0
and their error is fed to the later columns.
"""

from __future__ import annotations

import re

import torch

from ..errors import ConfigError
from .obs import Block, inverse_hessian_cholesky, obs_sweep


def parse_pattern(text: str) -> tuple[int, int]:
    """'2:4' → (2, 4): N kept of every M; N < M."""
    m = re.fullmatch(r"\s*(\d+)\s*:\s*(\d+)\s*", str(text))
    if not m or not 0 < int(m.group(1)) < int(m.group(2)):
        raise ConfigError(f"pattern '{text}' is not N:M with 0 < N < M (examples: 2:4, 4:8)")
    return int(m.group(1)), int(m.group(2))


def nm_mask(score: torch.Tensor, n: int, m: int) -> torch.Tensor:
    """Keep the n highest-scoring entries of every m consecutive entries along the last dimension."""
    rows, cols = score.shape
    if cols % m:
        raise ValueError(f"input dimension {cols} is not divisible by M = {m}")
    g = score.reshape(rows, cols // m, m)
    idx = torch.topk(g, n, dim=2).indices
    keep = torch.zeros_like(g, dtype=torch.bool).scatter_(2, idx, True)
    return keep.reshape(rows, cols)


def unstructured_mask(score: torch.Tensor, sparsity: float, per_row: bool) -> torch.Tensor:
    """Remove the ``sparsity`` fraction of lowest-scoring entries, per row or over the whole matrix."""
    if per_row:
        k = int(score.shape[1] * sparsity)
        if k == 0:
            return torch.ones_like(score, dtype=torch.bool)
        idx = torch.topk(score, k, dim=1, largest=False).indices
        return torch.ones_like(score, dtype=torch.bool).scatter_(1, idx, False)
    k = int(score.numel() * sparsity)
    if k == 0:
        return torch.ones_like(score, dtype=torch.bool)
    idx = torch.topk(score.reshape(-1), k, largest=False).indices
    return torch.ones(score.numel(), dtype=torch.bool, device=score.device).scatter_(0, idx, False).reshape(score.shape)


def ria_score(W: torch.Tensor, sq_sum: torch.Tensor, a: float) -> torch.Tensor:
    """RIA's score (Zhang et al., ICLR 2024, "Plug-and-Play"): relative importance times activation,
    (|W_ij| / Σ_k |W_kj| + |W_ij| / Σ_k |W_ik|) · ‖X_j‖₂^a. The two sums are W's column (over the
    outputs reading input j) and row (over the inputs of output i) ℓ1 norms; ‖X_j‖₂ = √(Σ x_j²) from
    the calibration inputs (the paper takes the mean, which scales every score alike). W: (d_out, d_in),
    sq_sum: (d_in,). Returns (d_out, d_in) float32."""
    A = W.abs().float()
    col = A.sum(dim=0, keepdim=True).clamp_min(torch.finfo(torch.float32).tiny)  # (1, d_in)
    row = A.sum(dim=1, keepdim=True).clamp_min(torch.finfo(torch.float32).tiny)  # (d_out, 1)
    act = sq_sum.to(device=W.device, dtype=torch.float32).sqrt().pow(a)  # (d_in,)
    return (A / col + A / row) * act[None, :]


def satisfies_nm(W: torch.Tensor, n: int, m: int) -> bool:
    """Whether every group of m consecutive inputs of every row has at most n non-zeros."""
    rows, cols = W.shape
    return bool(((W.reshape(rows, cols // m, m) != 0).sum(dim=2) <= n).all())


def sparsegpt_prune(
    W: torch.Tensor,
    H: torch.Tensor,
    *,
    sparsity: float | None = None,
    nm: tuple[int, int] | None = None,
    blocksize: int = 128,
    damp: float = 0.01,
    name: str = "",
) -> tuple[torch.Tensor, torch.Tensor, float]:
    """Prune W (d_out, d_in) given H = XᵀX; returns (pruned W, keep mask, OBS loss)."""
    if (sparsity is None) == (nm is None):
        raise ValueError("give exactly one of sparsity or nm")
    d_out, d_in = W.shape
    U, _ = inverse_hessian_cholesky(H, damp, name)
    keep = torch.ones(d_out, d_in, dtype=torch.bool)
    if nm is not None and blocksize % nm[1]:
        blocksize = max(nm[1], blocksize // nm[1] * nm[1])  # an N:M group must lie inside one block

    def on_block(b: Block) -> None:
        if sparsity is not None:
            score = b.W1.square() / b.U1.diagonal()[None, :].square()
            keep[:, b.i1 : b.i2] = unstructured_mask(score, sparsity, per_row=False)

    def column(j: int, w: torch.Tensor, b: Block) -> torch.Tensor:
        if nm is not None and j % nm[1] == 0:
            i = j - b.i1
            cols = b.W1[:, i : i + nm[1]]
            score = cols.square() / b.U1.diagonal()[i : i + nm[1]][None, :].square()
            keep[:, j : j + nm[1]] = nm_mask(score, *nm)
        return w * keep[:, j]

    pruned, losses = obs_sweep(W.float(), U, column, blocksize=blocksize, on_block=on_block)
    return pruned * keep, keep, float(losses.sum())
