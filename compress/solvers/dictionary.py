"""Sparse dictionary factorization of a linear layer in the whitened space (CoSpaDi, ROCKET).

A weight W (d_out × d_in) is approximated by Ŵ = C·A: a dense dictionary A (k × d_in, its rows are
the *atoms*) and a sparse coefficient matrix C (d_out × k) with few non-zeros per row. Each output
row of W is thus a combination of its own few atoms (a union of subspaces), where a low-rank
factorization puts every row in one shared r-dimensional subspace.

Data-aware objective: with the lower Cholesky factor L of the calibration Gram H = XᵀX
(H = L·Lᵀ), ‖X(W − Ŵ)ᵀ‖²_F = ‖(W − Ŵ)L‖²_F. So the problem is ordinary dictionary learning on the
whitened rows Y = W·L with atoms Ã = A·L; afterwards A = Ã·L⁻¹ (one triangular solve).

Solvers:

- :func:`ksvd` — K-SVD (Aharon et al.) with batched OMP sparse coding and power-iteration rank-1
  atom updates, the CoSpaDi recipe. Each sparse-coding step keeps a row's previous code when OMP
  does not lower its error, and each atom update is one power step from the current atom, which
  never raises the error (Cauchy–Schwarz), so the objective does not increase across iterations.
- :func:`closed_form` — the ROCKET recipe: eigenbasis of the whitened weights (the top-k right
  singular vectors of Y), per-row sparsification by an importance score (the geometric mean of the
  whitened magnitude |c| and the original-space magnitude |c|·‖a_j‖), a small global recovery of
  the largest zeroed entries, and a least-squares refit of the atoms by Cholesky (with a damping
  far below ROCKET's, which raised the error). We then refit the kept coefficients on their support
  (conjugate gradients) and the atoms again (``refits`` rounds), and re-choose each row's support
  from its least-squares codes on every atom (``reselect`` rounds of hard-thresholding pursuit,
  each refitted); a step that does not lower the error is dropped.

Sizes: :func:`dict_shape` turns a removed fraction ``ratio`` and the atoms-per-non-zero ratio
ρ = k/s (CoSpaDi's default ρ = 2) into (k, s) so that the stored bits — dictionary, values and the
support (a packed k-bit mask per row, or packed ⌈log₂ k⌉-bit indices, whichever is smaller) — stay
within (1 − ratio) of the dense weight's bits.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Callable

import torch

from .linalg import SOLVE_DTYPE

#: importance exponent λ of the closed-form path's score |c|·‖a_j‖^λ (ROCKET's geometric mean)
IMPORTANCE_LAMBDA = 0.5
#: fraction of all k·d_out coefficients the closed-form path recovers after the per-row cut (ROCKET: 0.5 %)
RECOVER_FRACTION = 0.005
#: refit rounds after each support reselection of the closed form
RESELECT_REFITS = 2
#: elements of OMP's per-chunk working set (chunk · s · max(s, k)), bounds its memory
_OMP_CHUNK_ELEMENTS = 1 << 24
#: bits of one row offset of the index support format
CROW_BITS = 32


def index_bits(k: int) -> int:
    """⌈log₂ k⌉ bits per stored atom index (at least 1)."""
    return max(1, math.ceil(math.log2(max(k, 2))))


def support_format(d_out: int, k: int, nnz: int) -> str:
    """'full' (every coefficient kept: nothing to store), 'mask' (a k-bit row mask, d_out·⌈k/8⌉
    bytes) or 'index' (⌈log₂ k⌉ bits per non-zero plus d_out+1 row offsets), whichever stores the
    support of ``nnz`` non-zeros in fewer bits."""
    if nnz == d_out * k:
        return "full"
    return "mask" if d_out * -(-k // 8) * 8 <= nnz * index_bits(k) + (d_out + 1) * CROW_BITS else "index"


def support_bits(d_out: int, k: int, nnz: int) -> int:
    """Bits of the support of ``nnz`` non-zeros in a d_out × k coefficient matrix, as stored."""
    fmt = support_format(d_out, k, nnz)
    if fmt == "full":
        return 0
    if fmt == "mask":
        return d_out * -(-k // 8) * 8
    return -(-nnz * index_bits(k) // 8) * 8 + (d_out + 1) * CROW_BITS


def stored_bits(d_out: int, d_in: int, k: int, nnz: int, elt_bits: int) -> int:
    """Bits of a factorization: dictionary k·d_in and ``nnz`` values of ``elt_bits``, plus the support."""
    return (k * d_in + nnz) * elt_bits + support_bits(d_out, k, nnz)


def dict_shape(d_out: int, d_in: int, ratio: float, rho: float, elt_bits: int) -> tuple[int, int] | None:
    """The largest (k atoms, s non-zeros per row) with s = max(1, round(k/ρ)) ≤ k whose stored bits
    are at most (1 − ratio)·d_out·d_in·elt_bits; None when not even one atom fits."""
    budget = (1.0 - ratio) * d_out * d_in * elt_bits

    def s_of(k: int) -> int:
        return min(k, max(1, round(k / rho)))

    def fits(k: int) -> bool:
        return stored_bits(d_out, d_in, k, d_out * s_of(k), elt_bits) <= budget

    k = largest_fitting(fits, 1, int(budget // (d_in * elt_bits)) + 1)
    return None if k is None else (k, s_of(k))


def largest_fitting(fits: Callable[[int], bool], lo: int, hi: int) -> int | None:
    """The largest k in [lo, hi] with ``fits(k)`` for a ``fits`` true up to some k and false after
    (stored bits grow with the atom count); None when not even ``lo`` fits."""
    if not fits(lo):
        return None
    hi = max(lo, hi)
    while lo < hi:
        mid = (lo + hi + 1) // 2
        if fits(mid):
            lo = mid
        else:
            hi = mid - 1
    return lo


@dataclass
class DictFactors:
    """Ŵ = C @ A: atoms ``A`` (k × d_in, original space) and coefficients ``C`` (d_out × k, zero off
    its support ``mask``). ``error`` is ‖(W − Ŵ)L‖²_F in the whitened space, ``energy`` ‖W·L‖²_F;
    ``history`` the K-SVD objective per iteration (empty for the closed form)."""

    A: torch.Tensor
    C: torch.Tensor
    mask: torch.Tensor
    error: float
    energy: float
    history: list[float] = field(default_factory=list)
    converged: bool = True

    @property
    def relative_error(self) -> float:
        return self.error / max(self.energy, 1e-300)


# ------------------------------------------------------------------------------------------- OMP


def omp(atoms: torch.Tensor, signals: torch.Tensor, s: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Batched orthogonal matching pursuit: for each row y of ``signals`` (n × d), at most ``s`` atoms
    (rows of ``atoms``, k × d) chosen greedily and the least-squares coefficients on them.

    Works on the k × k atom Gram only (Rubinstein's Batch-OMP): the correlations are updated through
    an incrementally built inverse Cholesky factor of the chosen atoms' Gram, so no residual in the
    d-dimensional space is formed. Rows are processed in chunks that bound the working memory.
    Returns (C, mask): C (n × k) with the coefficients, mask (n × k) its support.
    """
    atoms = atoms.to(SOLVE_DTYPE)
    signals = signals.to(SOLVE_DTYPE)
    k = atoms.shape[0]
    n = signals.shape[0]
    s = min(s, k)
    G = atoms @ atoms.T  # (k, k)
    G32 = G.float()
    alpha0 = signals @ atoms.T  # (n, k)
    C = torch.zeros(n, k, dtype=SOLVE_DTYPE)
    if bool(((G - torch.eye(k, dtype=SOLVE_DTYPE)).abs() <= 1e-12).all()):
        # orthonormal atoms (K-SVD's first step from the singular vectors): OMP picks the s largest
        # |correlations| and its least-squares coefficients are the correlations themselves
        top = alpha0.abs().topk(s, dim=1).indices
        C.scatter_(1, top, alpha0.gather(1, top))
        return C, C != 0
    chunk = max(1, _OMP_CHUNK_ELEMENTS // max(1, s * max(s, k)))
    tiny = torch.finfo(SOLVE_DTYPE).eps * float(G.diagonal().max().clamp_min(1e-300))
    for c0 in range(0, n, chunk):
        a0 = alpha0[c0:c0 + chunk]
        m = a0.shape[0]
        alpha = a0.clone()
        sel = torch.zeros(m, s, dtype=torch.long)
        Linv = torch.zeros(m, s, s, dtype=SOLVE_DTYPE)  # inverse of the chosen atoms' Cholesky factor
        beta = torch.zeros(m, s, dtype=SOLVE_DTYPE)  # projections on the orthonormalized chosen atoms
        chosen = torch.zeros(m, k, dtype=torch.bool)
        rows = torch.arange(m)
        for t in range(s):
            score = alpha.abs().masked_fill(chosen, -1.0)
            j = score.argmax(1)
            sel[:, t] = j
            chosen[rows, j] = True
            g = G[j]  # (m, k): Gram row of the new atom
            if t:
                w = torch.bmm(Linv[:, :t, :t], g.gather(1, sel[:, :t]).unsqueeze(-1)).squeeze(-1)  # L⁻¹·G[I, j]
                delta = (g[rows, j] - w.square().sum(1)).clamp_min(tiny).sqrt()
                Linv[:, t, :t] = -torch.bmm(w.unsqueeze(1), Linv[:, :t, :t]).squeeze(1) / delta[:, None]
            else:
                delta = g[rows, j].clamp_min(tiny).sqrt()
            Linv[:, t, t] = 1.0 / delta
            u = Linv[:, t, : t + 1]  # the new orthonormal direction, in coefficient coordinates
            b = (u * a0.gather(1, sel[:, : t + 1])).sum(1)
            beta[:, t] = b
            # correlations with the new residual; only the next choice reads them, so the k × k
            # product runs in float32 (the coefficients themselves come from β in float64)
            u_full = torch.zeros(m, k, dtype=torch.float32).scatter_(1, sel[:, : t + 1], u.float())
            alpha -= (u_full @ G32).double() * b[:, None]
        coef = torch.bmm(Linv.transpose(1, 2), beta.unsqueeze(-1)).squeeze(-1)  # c_I = L⁻ᵀ β
        C[c0:c0 + chunk].scatter_(1, sel, coef)
    return C, C != 0


def refit_on_support(atoms: torch.Tensor, signals: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """Least-squares coefficients of each row of ``signals`` on the atoms of its support (``mask``
    row), in batches; rows with a singular support Gram keep a ridge-damped solution."""
    atoms = atoms.to(SOLVE_DTYPE)
    signals = signals.to(SOLVE_DTYPE)
    n, k = mask.shape
    counts = mask.sum(1)
    smax = int(counts.max()) if n else 0
    C = torch.zeros(n, k, dtype=SOLVE_DTYPE)
    if smax == 0:
        return C
    G = atoms @ atoms.T
    alpha = signals @ atoms.T
    ridge = 1e-12 * float(G.diagonal().mean().clamp_min(1e-300))
    chunk = max(1, _OMP_CHUNK_ELEMENTS // (smax * smax))
    # padded index lists: real support first, padding points at atom 0 with an identity block
    order = torch.sort(mask.to(torch.int8), dim=1, descending=True, stable=True).indices[:, :smax]
    valid = torch.arange(smax)[None, :] < counts[:, None]
    for c0 in range(0, n, chunk):
        idx, ok = order[c0:c0 + chunk], valid[c0:c0 + chunk]
        Gs = G[idx.unsqueeze(-1), idx.unsqueeze(-2)]  # (m, smax, smax)
        both = ok.unsqueeze(-1) & ok.unsqueeze(-2)
        eye = torch.eye(smax, dtype=SOLVE_DTYPE).expand_as(Gs)
        Gs = torch.where(both, Gs, eye * (~ok).unsqueeze(-1)) + ridge * eye
        rhs = torch.where(ok, alpha[c0:c0 + chunk].gather(1, idx), torch.zeros((), dtype=SOLVE_DTYPE))
        L, info = torch.linalg.cholesky_ex(Gs)
        coef = torch.cholesky_solve(rhs.unsqueeze(-1), L).squeeze(-1)
        bad = info != 0
        if bool(bad.any()):
            coef[bad] = torch.linalg.lstsq(Gs[bad], rhs[bad].unsqueeze(-1)).solution.squeeze(-1)
        C[c0:c0 + chunk].scatter_(1, idx, torch.where(ok, coef, torch.zeros((), dtype=SOLVE_DTYPE)))
    return C


def refit_on_support_cg(atoms: torch.Tensor, signals: torch.Tensor, mask: torch.Tensor, C0: torch.Tensor, iters: int = 24) -> torch.Tensor:
    """The least-squares coefficients of :func:`refit_on_support`, approached by ``iters`` steps of
    conjugate gradients on every row at once, warm-started from ``C0``: each step is one n × k by
    k × k product (float32), where the exact solve factors n matrices of size s × s. CG lowers the
    least-squares error at every step (in exact arithmetic); the caller keeps a result only if it did."""
    atoms = atoms.to(SOLVE_DTYPE)
    M = mask.to(torch.float32)
    G = (atoms @ atoms.T).float()
    B = (signals.to(SOLVE_DTYPE) @ atoms.T).float() * M
    X = C0.float() * M
    R = B - (X @ G) * M
    P = R.clone()
    rs = (R * R).sum(1)
    tiny = torch.finfo(torch.float32).tiny
    zero = torch.zeros((), dtype=torch.float32)
    for _ in range(iters):
        Q = (P @ G) * M
        pq = (P * Q).sum(1)
        live = (pq > tiny) & (rs > tiny)  # a converged row (or one whose curvature rounds to zero) stops
        a = torch.where(live, rs / torch.where(live, pq, torch.ones_like(pq)), zero)
        X += a[:, None] * P
        R -= a[:, None] * Q
        rs_new = (R * R).sum(1)
        P = R + torch.where(live, rs_new / torch.where(live, rs, torch.ones_like(rs)), zero)[:, None] * P
        rs = rs_new
    out = X.to(SOLVE_DTYPE)
    return torch.where(torch.isfinite(out), out, C0.to(SOLVE_DTYPE) * mask)


def refit_atoms(Y: torch.Tensor, C: torch.Tensor, ridge_rel: float = 1e-10) -> torch.Tensor:
    """Least-squares atoms for fixed coefficients: argmin_Ã ‖Y − C·Ã‖² + ε‖Ã‖², by Cholesky.

    ROCKET damps with ε = 1e-3·tr(CᵀC)/k; that bias raises the error it minimizes (with every
    coefficient kept it is measurably worse than the plain truncated SVD), so we take ε =
    ``ridge_rel``·tr(CᵀC)/k, enough for a stable float64 solve, and fall back to a general solve."""
    Y, C = Y.to(SOLVE_DTYPE), C.to(SOLVE_DTYPE)
    k = C.shape[1]
    G = C.T @ C
    eps = max(1e-300, ridge_rel * float(G.diagonal().sum()) / max(k, 1))
    G = G + eps * torch.eye(k, dtype=SOLVE_DTYPE)
    if not bool(torch.isfinite(G).all()):
        return torch.full((k, Y.shape[1]), float("nan"), dtype=SOLVE_DTYPE)  # the caller drops a non-finite step
    L, info = torch.linalg.cholesky_ex(G)
    if int(info) != 0:
        return torch.linalg.pinv(G, hermitian=True) @ (C.T @ Y)
    return torch.cholesky_solve(C.T @ Y, L)


def _sq_error(Y: torch.Tensor, C: torch.Tensor, atoms: torch.Tensor) -> float:
    return float((Y - C @ atoms).square().sum())


# ----------------------------------------------------------------------------------------- K-SVD


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


# ----------------------------------------------------------------------------------- closed form


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
    best = (_sq_error(Y, C, atoms), atoms, C, mask)

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
            err = _sq_error(Y, C, atoms)
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
        err = _sq_error(Y, C, atoms)
        if err < best[0]:
            best = (err, atoms, C, mask)
        alternate(atoms, C, mask, RESELECT_REFITS)
    return best[1], best[2], best[3]


def select_support(score: torch.Tensor, s: int, recover: float) -> torch.Tensor:
    """Per row the highest-scoring entries, then the largest of the rest matrix-wide, n·s in all
    (every row keeps at least one)."""
    n, k = score.shape
    total = n * min(s, k)
    n_recover = max(0, min(int(math.ceil(recover * n * k)), total - n))
    base = max(1, (total - n_recover) // n)
    top = score.topk(base, dim=1).indices
    mask = torch.zeros(n, k, dtype=torch.bool).scatter_(1, top, True)
    left = total - int(mask.sum())
    if left > 0:
        rest = score.masked_fill(mask, -1.0).reshape(-1)
        mask.view(-1)[rest.topk(left).indices] = True
    return mask


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


# ------------------------------------------------------------------------------ stored coefficients


def encode_coefficients(C: torch.Tensor, mask: torch.Tensor, fmt: str | None = None) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(values, support, crow) of a d_out × k coefficient matrix on its support ``mask``.

    ``values``: the kept coefficients in row-major order. ``support``: 'full' format, empty (every
    coefficient is kept); 'mask' format, a packed k-bit mask per row (uint8, d_out × ⌈k/8⌉); 'index'
    format, the column of each value as a packed ⌈log₂ k⌉-bit stream (uint8). ``crow``: the row
    offsets (int32, d_out + 1) in the index format, empty otherwise. ``fmt`` None picks the
    smallest (:func:`support_format`)."""
    from .packing import pack_signs, pack_uint

    d_out, k = mask.shape
    nnz = int(mask.sum())
    fmt = fmt or support_format(d_out, k, nnz)
    values = C[mask]
    if fmt == "full":
        return values, torch.zeros(0, dtype=torch.uint8), torch.zeros(0, dtype=torch.int32)
    if fmt == "mask":
        pad = (-k) % 8
        m = torch.cat([mask, mask.new_zeros(d_out, pad)], 1) if pad else mask
        return values, pack_signs(m), torch.zeros(0, dtype=torch.int32)
    cols = mask.nonzero()[:, 1]
    crow = torch.zeros(d_out + 1, dtype=torch.int32)
    crow[1:] = mask.sum(1).cumsum(0).to(torch.int32)
    return values, pack_uint(cols, index_bits(k)), crow


def decode_support(support: torch.Tensor, crow: torch.Tensor, k: int, nnz: int) -> tuple[torch.Tensor, torch.Tensor]:
    """(rows, cols) of the stored non-zeros, in the order of the stored values."""
    from .packing import unpack_signs, unpack_uint

    if support.numel() == 0:  # 'full': every coefficient, row-major
        n = torch.arange(nnz, device=support.device)
        return n // k, n % k
    if crow.numel() == 0:
        mask = unpack_signs(support)[:, :k]
        nz = mask.nonzero()
        return nz[:, 0], nz[:, 1]
    cols = unpack_uint(support, index_bits(k), nnz)
    counts = (crow[1:] - crow[:-1]).to(torch.int64)
    rows = torch.repeat_interleave(torch.arange(counts.numel(), device=support.device), counts)
    return rows, cols


def decode_coefficients(values: torch.Tensor, support: torch.Tensor, crow: torch.Tensor, k: int, d_out: int) -> torch.Tensor:
    """The dense d_out × k coefficient matrix of :func:`encode_coefficients`' output."""
    if support.numel() == 0:
        return values.reshape(d_out, k)
    rows, cols = decode_support(support, crow, k, values.numel())
    C = torch.zeros(d_out, k, dtype=values.dtype, device=values.device)
    C[rows, cols] = values
    return C
