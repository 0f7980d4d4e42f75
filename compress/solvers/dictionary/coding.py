"""Sparse coding and coefficient storage: the factors' container, batched OMP, least-squares refits
of codes on a fixed support and of atoms for fixed codes, support selection by an importance
score, and the packed stored form of the coefficients (encode / decode)."""

from __future__ import annotations

import math
from dataclasses import dataclass, field

import torch

from ..linalg import SOLVE_DTYPE
from .sizing import index_bits, support_format

#: conjugate-gradient steps of a warm-started coefficient refit: on SmolLM2's q/o/up/down (layers 3, 15,
#: 27) 8 gave the relative whitened error of 24 to 3 significant digits, 4 within 0.4 %, at a third of the time
CG_ITERS = 4
#: elements of OMP's per-chunk working set (chunk · s · max(s, k)), bounds its memory
_OMP_CHUNK_ELEMENTS = 1 << 24


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


def refit_on_support_cg(atoms: torch.Tensor, signals: torch.Tensor, mask: torch.Tensor, C0: torch.Tensor, iters: int = CG_ITERS) -> torch.Tensor:
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
    """‖Y − C·atoms‖² in float64 (the reported error)."""
    return float((Y - C @ atoms).square().sum())


def _sq_error_fast(Y: torch.Tensor, C: torch.Tensor, atoms: torch.Tensor) -> float:
    """‖Y − C·atoms‖² with the residual in float32, summed in float64: for the closed form's keep-or-drop
    decisions between steps (the float64 product was a tenth of its time; the decisions came out the
    same on SmolLM2's layers)."""
    return float((Y.float() - C.float() @ atoms.float()).double().square().sum())


# -------------------------------------------------------------------------------- support selection


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


# ------------------------------------------------------------------------------ stored coefficients


def encode_coefficients(C: torch.Tensor, mask: torch.Tensor, fmt: str | None = None) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(values, support, crow) of a d_out × k coefficient matrix on its support ``mask``.

    ``values``: the kept coefficients in row-major order. ``support``: 'full' format, empty (every
    coefficient is kept); 'mask' format, a packed k-bit mask per row (uint8, d_out × ⌈k/8⌉); 'index'
    format, the column of each value as a packed ⌈log₂ k⌉-bit stream (uint8). ``crow``: the row
    offsets (int32, d_out + 1) in the index format, empty otherwise. ``fmt`` None picks the
    smallest (:func:`support_format`)."""
    from ..packing import pack_signs, pack_uint

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
    from ..packing import unpack_signs, unpack_uint

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
