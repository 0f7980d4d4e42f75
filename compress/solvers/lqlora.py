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

from .gptq import _static_sweep, sweep_factor
from .metrics import output_error
from .obs import SWEEP_DTYPE
from .quant import Quantized, QuantSpec, nf_levels, quantize_rtn


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


def one_alternation_errors(
    W: torch.Tensor, H: torch.Tensor, ranks: tuple[int, ...], options: list[tuple[int, int]], levels: str, relative: bool,
) -> list[tuple[tuple[int, int, int], float]]:
    """For each rank r of ``ranks`` and each (bits, group) of ``options``: the output error
    tr(Δ H Δᵀ) of one alternation, Δ = W − L − Q(W − L) with L the rank-r SVD of W (r = 0: no low-rank
    term); divided by the matrix's output energy tr(W H Wᵀ) when ``relative``. W: (d_out, d_in) float32,
    H: (d_in, d_in) float32. Returns ((bits, group, rank), error) in that order."""
    U, S, Vh = torch.linalg.svd(W.double(), full_matrices=False)
    # absolute output errors are dominated by the few matrices with the largest activations
    # (measured: at 4.02 bits they sent both first layers to 2-bit codes); relative ones are not
    energy = max(output_error(W, H), 1e-30) if relative else 1.0
    out = []
    for r in ranks:
        R = W - ((U[:, :r] * S[:r]) @ Vh[:r]).float() if r else W
        for b, g in options:
            D = R - quantize_rtn(R, QuantSpec(bits=b, group_size=g, levels=levels)).dequantize()
            out.append(((b, g, r), output_error(D, H) / energy))
    return out


#: bits whose codes get error feedback in the budget's estimate (8-bit codes are near exact by rounding alone)
FEEDBACK_BITS = (2, 3, 4)


def feedback_errors(
    W: torch.Tensor, H: torch.Tensor, ranks: tuple[int, ...], options: list[tuple[int, int]], levels: str, relative: bool,
    *, damp: float = 0.01, blocksize: int = 128,
) -> list[tuple[tuple[int, int, int], float]]:
    """As :func:`one_alternation_errors`, but each remainder W − L is quantized the way the pass
    will store it with ``feedback``: GPTQ's column sweep under H (activation order, static groups)
    for the bits of :data:`FEEDBACK_BITS`, round to nearest for the others. The sweeps of all options
    run as one: GPTQ's rows are independent given H, so the remainders of every option are stacked
    along the rows and share one factorization and one pass over the columns."""
    d_out, d_in = W.shape
    U_, S_, Vh_ = torch.linalg.svd(W.double(), full_matrices=False)
    energy = max(output_error(W, H), 1e-30) if relative else 1.0
    perm, U = sweep_factor(H, True, damp, "")
    swept = [(r, b, g) for r in ranks for b, g in options if b in FEEDBACK_BITS]
    remainders = {r: W - ((U_[:, :r] * S_[:r]) @ Vh_[:r]).float() if r else W for r in ranks}
    out: dict[tuple[int, int, int], float] = {}
    for r in ranks:
        for b, g in options:
            if b not in FEEDBACK_BITS:
                R = remainders[r]
                D = R - quantize_rtn(R, QuantSpec(bits=b, group_size=g, levels=levels)).dequantize()
                out[(b, g, r)] = output_error(D, H) / energy
    if swept:
        # per stacked row and permuted column: scale, zero-point (uniform) and the row's highest code
        Rs, Ss, Zs, Ms, Ls = [], [], [], [], []
        nf = levels == "nf"
        for r, b, g in swept:
            R = remainders[r]
            qz = quantize_rtn(R, QuantSpec(bits=b, group_size=g, levels=levels))  # its scales are the static grid
            cols = perm // g
            Rs.append(R[:, perm])
            Ss.append(qz.scales.float()[:, cols])
            Zs.append(qz.zeros.float()[:, cols])
            Ms.append(torch.full((d_out, 1), float(2**b - 1)))
            if nf:
                lv = nf_levels(b)
                Ls.append(torch.cat([lv, torch.full((16 - lv.numel(),), 1e9)])[None, :].expand(d_out, -1))
        Rst, Sst, Zst, Mst = (torch.cat(x).to(SWEEP_DTYPE) for x in (Rs, Ss, Zs, Ms))
        Lst = torch.cat(Ls).to(SWEEP_DTYPE) if nf else None
        rows = torch.arange(Rst.shape[0])

        def step(w: torch.Tensor, s: torch.Tensor, z: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
            if Lst is not None:
                q = ((w / s)[:, None] - Lst).abs().argmin(dim=1)
                return q.to(w.dtype), Lst[rows, q] * s
            q = torch.minimum(torch.clamp(torch.round(w / s) + z, min=0), Mst[:, 0])
            return q, (q - z) * s

        codes, _ = _static_sweep(Rst, U, Sst, Zst, step, blocksize)
        vals = (Lst.gather(1, codes.long()) * Sst) if Lst is not None else (codes - Zst) * Sst
        for k, (r, b, g) in enumerate(swept):
            D = torch.empty(d_out, d_in)
            D[:, perm] = (Rst[k * d_out : (k + 1) * d_out] - vals[k * d_out : (k + 1) * d_out]).float()
            out[(b, g, r)] = output_error(D, H) / energy
    return [((b, g, r), out[(b, g, r)]) for r in ranks for b, g in options]
