"""K-SVD: dictionary learning by alternating OMP sparse coding and power-iteration rank-1 atom updates."""

from __future__ import annotations

import torch

from ..linalg import SOLVE_DTYPE
from .coding import omp


def ksvd(
    Y: torch.Tensor,
    k: int,
    s: int,
    *,
    iters: int,
    seed: int = 0,
    init: str = "svd",
    tol: float = 1e-6,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, list[float], bool]:
    """K-SVD on the rows of ``Y`` (n × d): k unit-norm atoms (k × d), codes (n × k) with at most ``s``
    non-zeros per row. ``init``: 'svd' (the top right singular vectors, padded with random rows of
    Y when k exceeds the rank) or 'data' (k random rows of Y, CoSpaDi's choice). Stops when an
    iteration lowers the objective by less than ``tol`` relative. Returns (atoms, C, mask, objective
    after each iteration, converged)."""
    Y = Y.to(SOLVE_DTYPE)
    n, d = Y.shape
    gen = torch.Generator().manual_seed(seed)
    if init == "svd":
        _, _, Vh = torch.linalg.svd(Y, full_matrices=False)
        atoms = Vh[: min(k, Vh.shape[0])]
        if atoms.shape[0] < k:
            extra = Y[torch.randperm(n, generator=gen)[: k - atoms.shape[0]]]
            if extra.shape[0] < k - atoms.shape[0]:
                extra = torch.cat([extra, torch.randn(k - atoms.shape[0] - extra.shape[0], d, generator=gen, dtype=SOLVE_DTYPE)])
            atoms = torch.cat([atoms, extra])
    elif init == "data":
        pick = torch.randperm(n, generator=gen)[:k]
        atoms = Y[pick]
        if atoms.shape[0] < k:
            atoms = torch.cat([atoms, torch.randn(k - atoms.shape[0], d, generator=gen, dtype=SOLVE_DTYPE)])
    else:
        raise ValueError(f"unknown K-SVD init {init!r}")
    norms = atoms.norm(dim=1, keepdim=True)
    atoms = torch.where(norms > 0, atoms / norms.clamp_min(1e-300), torch.randn(atoms.shape, generator=gen, dtype=SOLVE_DTYPE))
    atoms = atoms / atoms.norm(dim=1, keepdim=True)
    C = torch.zeros(n, k, dtype=SOLVE_DTYPE)
    row_err = Y.square().sum(1)  # error of the empty code
    history: list[float] = []
    converged = False
    for _ in range(iters):
        # sparse coding: OMP, keeping a row's previous code where OMP does not improve it
        C_new, _ = omp(atoms, Y, s)
        new_err = (Y - C_new @ atoms).square().sum(1)
        better = new_err < row_err
        C = torch.where(better[:, None], C_new, C)
        mask = C != 0
        R = Y - C @ atoms  # residual (n × d)
        # dictionary update: one power step per atom on the rows that use it
        for j in torch.randperm(k, generator=gen).tolist():
            rows = mask[:, j].nonzero().squeeze(1)
            if rows.numel() == 0:
                continue
            g = C[rows, j]
            E = R[rows] + g[:, None] * atoms[j][None, :]  # (|ω|, d)
            a = g @ E
            na = float(a.norm())
            if na <= 0.0:
                continue
            a = a / na
            g_new = E @ a
            R[rows] = E - g_new[:, None] * a[None, :]
            atoms[j] = a
            C[rows, j] = g_new
        mask = C != 0
        row_err = R.square().sum(1)
        history.append(float(row_err.sum()))
        if len(history) > 1 and history[-2] - history[-1] <= tol * max(history[-2], 1e-300):
            converged = True
            break
    else:
        converged = iters == 0 or (len(history) > 1 and history[-2] - history[-1] <= tol * max(history[-2], 1e-300))
    return atoms, C, C != 0, history, converged
