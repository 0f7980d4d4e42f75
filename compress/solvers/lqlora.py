"""LQ-LoRA (Guo et al., arXiv 2311.12023): W ≈ Q + L₁L₂ with Q quantized and L₁L₂ of rank r.

Alternation from Q = 0: (L₁, L₂) = rank-r SVD of D_r(W − Q)D_c mapped back, then Q = quantize(W − L₁L₂);
stop as soon as the (weighted) reconstruction error ‖D_r(W − Q − L₁L₂)D_c‖_F rises, or improves by less
than ``tol`` (relative), and keep the best iterate. The first iteration takes an exact SVD; later ones
refine the previous right singular subspace (rank + 8 columns) by two steps of subspace iteration and
a Rayleigh–Ritz SVD inside it: W − Q moves little between iterations, so this tracks the leading
subspace to float64 accuracy at O(d_out·d_in·r) instead of a full SVD each time. D_r, D_c are row/column weights for the data-aware variant (here: D_c = √mean(x²) per input
channel from the calibration Gram diagonal; the paper's empirical-Fisher weights need backward
passes and are not used), identity otherwise.

Budget mode: :func:`allocate` picks one (bits, group) configuration per matrix minimizing the total
error subject to an average bits-per-weight budget, as a 0/1 integer program solved with
``scipy.optimize.milp``.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from .quant import Quantized, QuantSpec, quantize_rtn


@dataclass
class LQResult:
    q: Quantized
    L1: torch.Tensor  # (d_out, r)
    L2: torch.Tensor  # (r, d_in)
    errors: list[float]  # weighted reconstruction error after each iteration (the last may be the rise)

    @property
    def error(self) -> float:
        return min(self.errors)


_OVERSAMPLE = 8
_POWER_STEPS = 2


def _leading_svd(R: torch.Tensor, rank: int, V: torch.Tensor | None) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """Top-``rank`` SVD of R (float64). With ``V`` (d_in × k, orthonormal) from the previous
    iteration: subspace iteration from V, then the exact SVD of R restricted to the subspace.
    Returns U_r, S_r, Vh_r and the subspace for the next call."""
    k = min(rank + _OVERSAMPLE, *R.shape)
    if V is None:
        U, S, Vh = torch.linalg.svd(R, full_matrices=False)
        return U[:, :rank], S[:rank], Vh[:rank], Vh[:k].T.contiguous()
    for _ in range(_POWER_STEPS):
        Y, _ = torch.linalg.qr(R @ V)
        V, _ = torch.linalg.qr(R.T @ Y)
    Ub, S, Vh = torch.linalg.svd(R @ V, full_matrices=False)  # (d_out × k) = Ub S (V_k-basis)
    Vh = Vh @ V.T
    return Ub[:, :rank], S[:rank], Vh[:rank], Vh.T.contiguous()


def lq_decompose(
    W: torch.Tensor, rank: int, spec: QuantSpec, *, iters: int = 100, tol: float = 1e-4,
    row_weight: torch.Tensor | None = None, col_weight: torch.Tensor | None = None,
) -> LQResult:
    W = W.float()
    d_out, d_in = W.shape
    dr = torch.ones(d_out) if row_weight is None else row_weight.float().clamp_min(1e-12)
    dc = torch.ones(d_in) if col_weight is None else col_weight.float().clamp_min(1e-12)
    Q = torch.zeros_like(W)
    errors: list[float] = []
    best: LQResult | None = None
    best_err = float("inf")
    V: torch.Tensor | None = None
    for _ in range(iters):
        Rw = dr[:, None] * (W - Q) * dc[None, :]
        U, S, Vh, V = _leading_svd(Rw.double(), rank, V)
        root = S[:rank].sqrt()
        L1 = ((U[:, :rank] * root[None, :]) / dr.double()[:, None]).float()
        L2 = ((root[:, None] * Vh[:rank]) / dc.double()[None, :]).float()
        qz = quantize_rtn(W - L1 @ L2, spec)
        Q = qz.dequantize()
        err = float((dr[:, None] * (W - Q - L1 @ L2) * dc[None, :]).norm())
        errors.append(err)
        if err >= best_err:
            break
        converged = err > best_err * (1 - tol)
        best, best_err = LQResult(qz, L1, L2, errors), err
        if converged:
            break
    assert best is not None
    best.errors = errors
    return best


def allocate(errors: list[list[float]], costs: list[list[float]], budget: float) -> list[int]:
    """Choose one option per matrix (index into its lists) minimizing Σ error with Σ cost ≤ budget.

    Raises ValueError naming the smallest reachable total cost when the budget is below it."""
    import numpy as np
    from scipy.optimize import Bounds, LinearConstraint, milp

    n_opts = [len(e) for e in errors]
    c = np.concatenate([np.asarray(e, dtype=float) for e in errors])
    cost = np.concatenate([np.asarray(k, dtype=float) for k in costs])
    minimum = float(sum(min(k) for k in costs))
    if minimum > budget * (1 + 1e-12):
        raise ValueError(f"budget {budget:.6g} is below the smallest reachable cost {minimum:.6g}")
    n = len(c)
    rows = np.zeros((len(errors), n))
    start = 0
    for i, k in enumerate(n_opts):
        rows[i, start : start + k] = 1.0
        start += k
    # scale errors so the objective is well conditioned for the solver
    scale = float(np.abs(c).max()) or 1.0
    res = milp(
        c / scale,
        constraints=[LinearConstraint(rows, 1, 1), LinearConstraint(cost[None, :], -np.inf, budget)],
        integrality=np.ones(n),
        bounds=Bounds(0, 1),
        options={"time_limit": 120},
    )
    if res.x is None:
        raise ValueError(f"the integer program found no allocation within the budget ({res.message})")
    x = np.round(res.x).astype(int)
    out, start = [], 0
    for k in n_opts:
        out.append(int(np.argmax(x[start : start + k])))
        start += k
    return out
