"""ROCKET-style closed form: eigenbasis atoms, support chosen by an importance score, least-squares
refits and hard-thresholding reselection; and the constants of that score and recovery."""

from __future__ import annotations

from typing import Callable

import torch

from ..linalg import SOLVE_DTYPE
from .coding import _sq_error_fast, refit_atoms, refit_on_support, refit_on_support_cg, select_support

#: importance exponent λ of the closed-form path's score |c|·‖a_j‖^λ (ROCKET's geometric mean)
IMPORTANCE_LAMBDA = 0.5
#: fraction of all k·d_out coefficients the closed-form path recovers after the per-row cut (ROCKET: 0.5 %)
RECOVER_FRACTION = 0.005
#: refit rounds after each support reselection of the closed form
RESELECT_REFITS = 2


def closed_form(
    Y: torch.Tensor,
    k: int,
    s: int,
    atom_norm: Callable[[torch.Tensor], torch.Tensor],
    *,
    refits: int = 1,
    recover: float = RECOVER_FRACTION,
    basis: torch.Tensor | None = None,
    cg: bool = True,
    reselect: int = 0,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """ROCKET's closed form on the rows of ``Y`` (n × d): atoms = top-k right singular vectors of Y,
    codes = Y·atomsᵀ sparsified per row by |c_ij|·‖a_j‖^λ (``atom_norm(atoms)`` gives ‖a_j‖ in the
    original space), then the ⌈recover·n·k⌉ largest zeroed entries (by the same score) restored
    while the total stays n·s, then a least-squares refit of the atoms; ``refits`` further rounds
    refit the kept coefficients on their support and the atoms. ``reselect`` rounds then re-choose
    each row's support from its least-squares codes on every atom (hard-thresholding pursuit) and
    refit. Every step is kept only if it lowers the error. ``basis``: Y's right singular vectors
    when the caller already has them. Returns (atoms, C, mask)."""
    Y = Y.to(SOLVE_DTYPE)
    n, d = Y.shape
    Vh = torch.linalg.svd(Y, full_matrices=False)[2] if basis is None else basis
    atoms = Vh[: min(k, Vh.shape[0])]
    if atoms.shape[0] < k:  # more atoms than the rank of Y: the extra atoms would get no weight
        atoms = torch.cat([atoms, torch.zeros(k - atoms.shape[0], d, dtype=SOLVE_DTYPE)])
    V = Y @ atoms.T  # (n, k)
    norms = atom_norm(atoms).to(SOLVE_DTYPE).clamp_min(0).pow(IMPORTANCE_LAMBDA)
    mask = select_support(V.abs() * norms[None, :], s, recover)
    C = torch.where(mask, V, torch.zeros((), dtype=SOLVE_DTYPE))
    best = (_sq_error_fast(Y, C, atoms), atoms, C, mask)

    def alternate(atoms: torch.Tensor, C: torch.Tensor, mask: torch.Tensor, rounds: int) -> None:
        nonlocal best
        # each refit is a least-squares step; a result that does not lower the error (round-off) is not kept
        for step in range(1 + 2 * rounds):
            if step % 2 == 0:
                atoms = refit_atoms(Y, C)
            else:
                C = refit_on_support_cg(atoms, Y, mask, C) if cg else refit_on_support(atoms, Y, mask)
            if not (torch.isfinite(atoms).all() and torch.isfinite(C).all()):
                return  # a degenerate step (all-zero atoms or codes): keep the best so far
            err = _sq_error_fast(Y, C, atoms)
            if err < best[0]:
                best = (err, atoms, C, mask)

    alternate(atoms, C, mask, refits)
    for _ in range(reselect):
        # hard-thresholding pursuit: least-squares codes on every atom, the support re-chosen by the
        # same importance score, then refitted; kept only where it lowers the error
        _, atoms, C, _ = best
        G = atoms @ atoms.T
        ridge = 1e-10 * float(G.diagonal().mean().clamp_min(1e-300))
        full = torch.linalg.solve(G + ridge * torch.eye(G.shape[0], dtype=SOLVE_DTYPE), atoms @ Y.T).T  # (n, k)
        norms = atom_norm(atoms).to(SOLVE_DTYPE).clamp_min(0).pow(IMPORTANCE_LAMBDA)
        mask = select_support(full.abs() * norms[None, :], s, recover)
        C = refit_on_support_cg(atoms, Y, mask, full * mask) if cg else refit_on_support(atoms, Y, mask)
        err = _sq_error_fast(Y, C, atoms)
        if err < best[0]:
            best = (err, atoms, C, mask)
        alternate(atoms, C, mask, RESELECT_REFITS)
    return best[1], best[2], best[3]


def first_step_errors(W: torch.Tensor, L: torch.Tensor, shapes: list[tuple[int, int]]) -> list[float]:
    """Relative whitened error ‖(W − Ŵ)L‖²/‖WL‖² of the closed form's first step for each (k, s) of
    ``shapes``: the top-k singular directions of Y = W·L, each row cut to its s most important codes
    (with the recovery), read off one SVD of Y. The refinements lower every candidate's error; this
    proxy costs one top-k per candidate (for a budgeted choice of (k, s) per target)."""
    Y = W.to(SOLVE_DTYPE) @ L  # (d_out, d_in)
    energy = float(Y.square().sum().clamp_min(1e-300))
    U, S, Vh = torch.linalg.svd(Y, full_matrices=False)
    codes = U * S[None, :]  # (d_out, rank): codes on the singular directions
    weight = torch.linalg.solve_triangular(L, Vh, upper=False, left=False).norm(dim=1).pow(IMPORTANCE_LAMBDA)
    out = []
    for k, s in shapes:
        V = codes[:, :k]
        mask = select_support(V.abs() * weight[None, :k], min(s, V.shape[1]), RECOVER_FRACTION)
        out.append(max((energy - float(V.square()[mask].sum())) / energy, 0.0))
    return out
