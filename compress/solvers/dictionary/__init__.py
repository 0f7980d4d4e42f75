"""Sparse dictionary factorization of a linear layer in the whitened space (CoSpaDi, ROCKET).

A weight W (d_out × d_in) is approximated by Ŵ = C·A: a dense dictionary A (k × d_in, its rows are
the *atoms*) and a sparse coefficient matrix C (d_out × k) with few non-zeros per row. Each output
row of W is thus a combination of its own few atoms (a union of subspaces), where a low-rank
factorization puts every row in one shared r-dimensional subspace.

Data-aware objective: with the lower Cholesky factor L of the calibration Gram H = XᵀX
(H = L·Lᵀ), ‖X(W − Ŵ)ᵀ‖²_F = ‖(W − Ŵ)L‖²_F. So the problem is ordinary dictionary learning on the
whitened rows Y = W·L with atoms Ã = A·L; afterwards A = Ã·L⁻¹ (one triangular solve). The drivers
that whiten, solve and un-whiten — :func:`factorize_dict` (learn a dictionary) and
:func:`code_with_dictionary` (code on a fixed, e.g. shared, dictionary) — live in this file.

Solvers:

- :func:`ksvd` (``ksvd.py``) — K-SVD (Aharon et al.) with batched OMP sparse coding and
  power-iteration rank-1 atom updates, the CoSpaDi recipe. Each sparse-coding step keeps a row's
  previous code when OMP does not lower its error, and each atom update is one power step from the
  current atom, which never raises the error (Cauchy–Schwarz), so the objective does not increase
  across iterations.
- :func:`closed_form` (``closed_form.py``) — the ROCKET recipe: eigenbasis of the whitened weights
  (the top-k right singular vectors of Y), per-row sparsification by an importance score (the
  geometric mean of the whitened magnitude |c| and the original-space magnitude |c|·‖a_j‖), a small
  global recovery of the largest zeroed entries, and a least-squares refit of the atoms by Cholesky
  (with a damping far below ROCKET's, which raised the error). We then refit the kept coefficients
  on their support (conjugate gradients) and the atoms again (``refits`` rounds), and re-choose
  each row's support from its least-squares codes on every atom (``reselect`` rounds of
  hard-thresholding pursuit, each refitted); a step that does not lower the error is dropped.

Sparse coding and coefficient storage (``coding.py``): :class:`DictFactors`, batched OMP
(:func:`omp`), the least-squares refits of codes on their support and of atoms for fixed codes,
support selection by importance (:func:`select_support`), and the packed stored coefficients
(:func:`encode_coefficients`, :func:`decode_coefficients`).

Sizes (``sizing.py``): :func:`dict_shape` turns a removed fraction ``ratio`` and the
atoms-per-non-zero ratio ρ = k/s (CoSpaDi's default ρ = 2) into (k, s) so that the stored bits —
dictionary, values and the support (a packed k-bit mask per row, or packed ⌈log₂ k⌉-bit indices,
whichever is smaller) — stay within (1 − ratio) of the dense weight's bits.
"""

from __future__ import annotations

import torch

from ..linalg import SOLVE_DTYPE
from .closed_form import IMPORTANCE_LAMBDA, RECOVER_FRACTION, RESELECT_REFITS, closed_form, first_step_errors
from .coding import (
    CG_ITERS,
    DictFactors,
    _sq_error,
    decode_coefficients,
    decode_support,
    encode_coefficients,
    omp,
    refit_atoms,
    refit_on_support,
    refit_on_support_cg,
    select_support,
)
from .ksvd import ksvd
from .sizing import CROW_BITS, dict_shape, index_bits, largest_fitting, stored_bits, support_bits, support_format

__all__ = [
    "CROW_BITS",
    "IMPORTANCE_LAMBDA",
    "RECOVER_FRACTION",
    "RESELECT_REFITS",
    "DictFactors",
    "closed_form",
    "first_step_errors",
    "code_with_dictionary",
    "decode_coefficients",
    "decode_support",
    "dict_work",
    "dict_shape",
    "encode_coefficients",
    "factorize_dict",
    "index_bits",
    "ksvd",
    "largest_fitting",
    "omp",
    "refit_atoms",
    "refit_on_support",
    "refit_on_support_cg",
    "select_support",
    "stored_bits",
    "support_bits",
    "support_format",
]


# -------------------------------------------------------------------------------------- drivers


def _unwhiten(atoms_w: torch.Tensor, L: torch.Tensor | None) -> torch.Tensor:
    """A = Ã·L⁻¹ (solve X·L = Ã)."""
    if L is None:
        return atoms_w
    return torch.linalg.solve_triangular(L.to(SOLVE_DTYPE), atoms_w, upper=False, left=False)


def factorize_dict(
    W: torch.Tensor,
    k: int,
    s: int,
    L: torch.Tensor | None,
    *,
    solver: str = "closed-form",
    iters: int = 10,
    seed: int = 0,
    init: str = "svd",
    refits: int = 1,
    reselect: int = 0,
) -> DictFactors:
    """Factorize W (d_out × d_in) as C·A with k atoms and s non-zeros per row (on average, for the
    closed form), minimizing ‖(W − C·A)L‖_F (L: lower Cholesky factor of the input Gram; None = the
    plain weight error)."""
    W = W.to(SOLVE_DTYPE)
    Y = W @ L.to(SOLVE_DTYPE) if L is not None else W
    energy = float(Y.square().sum())
    history: list[float] = []
    converged = True
    if solver == "ksvd":
        atoms_w, C, mask, history, converged = ksvd(Y, k, s, iters=iters, seed=seed, init=init)
    elif solver == "closed-form":
        atoms_w, C, mask = closed_form(Y, k, s, lambda a: _unwhiten(a, L).norm(dim=1), refits=refits, reselect=reselect)
    else:
        raise ValueError(f"unknown dictionary solver {solver!r}")
    error = _sq_error(Y, C, atoms_w)
    return DictFactors(A=_unwhiten(atoms_w, L), C=C, mask=mask, error=error, energy=energy, history=history, converged=converged)


def code_with_dictionary(W: torch.Tensor, A: torch.Tensor, s: int, L: torch.Tensor | None, *, method: str = "omp") -> DictFactors:
    """Coefficients of W on a fixed dictionary A (k × d_in, e.g. shared by several layers) with ``s``
    non-zeros per row on average, in the whitened space of this layer's own L. ``method``: 'omp'
    (exactly s per row, greedy) or 'pursuit' (least-squares codes on every atom, the n·s most
    important kept as in the closed form, then refitted on that support; much faster)."""
    W, A = W.to(SOLVE_DTYPE), A.to(SOLVE_DTYPE)
    Y = W @ L.to(SOLVE_DTYPE) if L is not None else W
    atoms_w = A @ L.to(SOLVE_DTYPE) if L is not None else A
    if method == "omp":
        C, mask = omp(atoms_w, Y, s)
    elif method == "pursuit":
        G = atoms_w @ atoms_w.T
        ridge = 1e-10 * float(G.diagonal().mean().clamp_min(1e-300))
        full = torch.linalg.solve(G + ridge * torch.eye(G.shape[0], dtype=SOLVE_DTYPE), atoms_w @ Y.T).T
        mask = select_support(full.abs() * A.norm(dim=1).pow(IMPORTANCE_LAMBDA)[None, :], s, RECOVER_FRACTION)
        C = refit_on_support_cg(atoms_w, Y, mask, full * mask)
    else:
        raise ValueError(f"unknown coding method {method!r}")
    return DictFactors(A=A, C=C, mask=mask, error=_sq_error(Y, C, atoms_w), energy=float(Y.square().sum()))


#: multiply-adds per (row, non-zero, atom²) one OMP step costs in time (batched small products)
KSVD_OMP = 18.0
#: multiply-adds one K-SVD atom update costs in time (a Python-level step per atom)
KSVD_ATOM_STEP = 5e6
#: time of the closed form's refits per counted multiply-add (element-wise work and float64)
CF_SCALE = 1.4


def dict_work(d_out: int, d_in: int, k: int, s: int, tokens: int, solver: str, *, iters: int, refits: int, reselect: int) -> float:
    """Estimated multiply-adds of one target's factorization (constants set against
    bench/results/layer_cost.md): the whitening, then K-SVD's iterations (batched OMP: s steps, each a
    k-wide Gram product per row; k atom updates) or the closed form's SVD and refits."""
    whiten = tokens * d_in**2 + d_in**3 / 3 + 2.0 * d_out * d_in**2
    if solver == "ksvd":
        return whiten + iters * (KSVD_OMP * d_out * s * k * k + 8.0 * d_out * s * d_in + KSVD_ATOM_STEP * k)
    cg = refits + reselect * (1 + RESELECT_REFITS)  # coefficient refits
    atoms = refits + 1 + reselect * (1 + RESELECT_REFITS)  # atom refits (with their error checks)
    return whiten + 12.0 * d_out * d_in * min(d_out, d_in) + CF_SCALE * (
        cg * 2 * CG_ITERS * d_out * k * k + atoms * (d_out * k * k + 3.0 * d_out * k * d_in) + reselect * 2.0 * k * d_in * d_out)
