"""Binary-coding quantization (BCQ, as in LUT-GEMM, Park et al., arXiv 2206.09557), extended with a
per-group offset so that uniform quantization is a special case.

For each group (g consecutive inputs of one output row): w ≈ Σ_{i<q} α_i b_i + β, b_i ∈ {−1, +1}.

Quantizer: start from round-to-nearest uniform codes converted exactly (below), or LUT-GEMM's greedy
planes (β = mean, then for each plane b_i = sign(r), α_i = mean|r|, r −= α_i b_i); then ``rounds``
of alternating refinement: least squares for (α, β) given B, then each weight takes the nearest of
the 2^q values Σ ±α_i + β. Errors are weighted per input by the calibration energy diag(XᵀX) when
given (the output error of a layer whose inputs are uncorrelated), and a round is kept per group
only where it lowers that error, so the result is never worse than its start.

Exact conversion from uniform codes: with w = (c − z)·s and c = Σ_i 2^i c_i (c_i ∈ {0,1}),
b_i = 2c_i − 1 gives α_i = s·2^(i−1) and β = s·((2^q − 1)/2 − z). In float32 every partial sum is
a multiple of s/2 within 24 mantissa bits for q ≤ 8, so the conversion and its dequantization
reproduce (c − z)·s bit for bit.
"""

from __future__ import annotations

import itertools
from dataclasses import dataclass

import torch

from .gptq import FactorCache, _static_sweep, sweep_factor
from .obs import SWEEP_DTYPE
from .quant import Quantized

ALPHA_DTYPE = torch.float16
OFFSET_DTYPE = torch.float32


@dataclass
class BCQ:
    """Sign planes and scales of a (d_out, d_in) weight with groups of g along the input dimension.

    ``signs``: bool (q, d_out, d_in), True for +1. ``alpha``: (q, d_out, d_in/g). ``offset``: (d_out, d_in/g).
    """

    signs: torch.Tensor
    alpha: torch.Tensor
    offset: torch.Tensor
    group_size: int

    @property
    def bits(self) -> int:
        return int(self.signs.shape[0])

    def dequantize(self) -> torch.Tensor:
        g = self.group_size
        b = self.signs.to(torch.float32) * 2 - 1  # (q, d_out, d_in)
        a = self.alpha.float().repeat_interleave(g, dim=2)
        w = self.offset.float().repeat_interleave(g, dim=1).clone()
        for i in range(self.bits):
            w = w + a[i] * b[i]
        return w


def _candidates(alpha: torch.Tensor, offset: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """All 2^q values Σ ±α_i + β per row: alpha (n, q), offset (n,) → values (n, 2^q), signs (2^q, q)."""
    q = alpha.shape[1]
    signs = torch.tensor(list(itertools.product((-1.0, 1.0), repeat=q)), dtype=alpha.dtype, device=alpha.device)
    return offset[:, None] + alpha @ signs.T, signs


def _weighted_error(X: torch.Tensor, h: torch.Tensor, B: torch.Tensor, alpha: torch.Tensor, beta: torch.Tensor) -> torch.Tensor:
    """Σ_j h_j (x_j − Σ_i α_i b_ij − β)² per group row: X, h (n, g); B (q, n, g); alpha (n, q); beta (n,)."""
    approx = beta[:, None] + torch.einsum("qng,nq->ng", B, alpha)
    return (h * (X - approx).square()).sum(dim=1)


def bcq_quantize(
    W: torch.Tensor, bits: int, group_size: int, rounds: int = 15, hdiag: torch.Tensor | None = None, init: str = "uniform",
) -> BCQ:
    """BCQ of W (d_out, d_in) with groups of ``group_size`` inputs, minimizing the error weighted by
    ``hdiag`` (d_in,: the calibration inputs' Σx², i.e. diag(XᵀX); None: unweighted).

    ``init="uniform"``: start from round-to-nearest uniform quantization at the same bits and groups,
    converted exactly (:func:`bcq_from_uniform`); ``"greedy"``: LUT-GEMM's greedy planes. Each
    alternating round (weighted least squares for (α, β) given the signs, then the nearest
    representable value per weight) is kept for a group only where it lowers that group's weighted
    error, also after α is rounded to float16, so the result is never worse than the start (with the
    uniform start: never worse than RTN, in the weighted error)."""
    from .quant import QuantSpec, quantize_rtn

    W = W.float()
    d_out, d_in = W.shape
    g = group_size or d_in
    n = d_in // g
    X = W.reshape(d_out * n, g)  # rows = groups
    h = (hdiag.float().clamp_min(0) if hdiag is not None else torch.ones(d_in)).reshape(n, g).repeat(d_out, 1)
    h = h + 1e-12 * h.mean(dim=1, keepdim=True).clamp_min(1e-30)  # a dead input still counts a little
    if init == "uniform" and 2 <= bits <= 8 and bits in (2, 3, 4, 8):
        start = bcq_from_uniform(quantize_rtn(W, QuantSpec(bits=bits, group_size=g), hdiag))
        B = (start.signs.float() * 2 - 1).reshape(bits, d_out * n, g)
        alpha = start.alpha.float().reshape(bits, d_out * n).T.contiguous()
        beta = start.offset.float().reshape(-1)
    else:
        beta = (h * X).sum(dim=1) / h.sum(dim=1)
        r = X - beta[:, None]
        B = torch.empty(bits, *X.shape, dtype=X.dtype)
        alpha = torch.empty(X.shape[0], bits, dtype=X.dtype)
        for i in range(bits):
            B[i] = torch.where(r >= 0, 1.0, -1.0)
            alpha[:, i] = (h * r.abs()).sum(dim=1) / h.sum(dim=1)
            r = r - alpha[:, i : i + 1] * B[i]
        alpha = alpha.to(ALPHA_DTYPE).float()
    best = (B.clone(), alpha.clone(), beta.clone())
    best_err = _weighted_error(X, h, B, alpha, beta)
    eye = torch.eye(bits + 1, dtype=torch.float64)
    hd = h.double()
    for _ in range(rounds):
        # weighted least squares for (α, β) given the signs
        A = torch.cat([B.permute(1, 2, 0), torch.ones(X.shape[0], g, 1)], dim=2).double()  # (n, g, q+1)
        AtH = A.transpose(1, 2) * hd[:, None, :]
        AtA = AtH @ A
        AtA = AtA + 1e-10 * AtA.diagonal(dim1=1, dim2=2).mean(dim=1)[:, None, None].clamp_min(1e-30) * eye
        sol = torch.linalg.solve(AtA, AtH @ X.double()[:, :, None])[:, :, 0].float()
        alpha, beta = sol[:, :bits].to(ALPHA_DTYPE).float(), sol[:, bits]  # the stored α are float16
        # nearest of the 2^q representable values (the weight of an input does not change which is nearest)
        vals, signs = _candidates(alpha, beta)
        idx = (X[:, :, None] - vals[:, None, :]).abs().argmin(dim=2)  # (n, g)
        B = signs[idx].permute(2, 0, 1).contiguous()  # (q, n, g)
        err = _weighted_error(X, h, B, alpha, beta)
        improved = err < best_err
        best_err = torch.where(improved, err, best_err)
        best = (
            torch.where(improved[None, :, None], B, best[0]),
            torch.where(improved[:, None], alpha, best[1]),
            torch.where(improved, beta, best[2]),
        )
    B, alpha, beta = best
    return BCQ(
        signs=(B > 0).reshape(bits, d_out, d_in),
        alpha=alpha.to(ALPHA_DTYPE).T.reshape(bits, d_out, n).contiguous(),
        offset=beta.to(OFFSET_DTYPE).reshape(d_out, n),
        group_size=g,
    )


def bcq_from_uniform(qz: Quantized) -> BCQ:
    """Exact BCQ form of a per-OC uniform quantization (see module doc)."""
    spec = qz.spec
    if spec.dim != "oc":
        raise ValueError("only per-OC uniform quantization converts to BCQ (groups must run along the input dimension)")
    d_out, d_in = qz.q.shape
    g, n = spec.groups(d_out, d_in)
    q = spec.bits
    codes = qz.q.to(torch.int64)
    signs = torch.stack([((codes >> i) & 1).bool() for i in range(q)])  # (q, d_out, d_in)
    s = qz.scales.float()  # (d_out, n)
    z = qz.zeros.float()
    alpha = torch.stack([s * 2.0 ** (i - 1) for i in range(q)])  # (q, d_out, n)
    if alpha.to(ALPHA_DTYPE).float().ne(alpha).any():
        raise ValueError("scales out of float16 range for an exact BCQ conversion")
    offset = s * ((2**q - 1) / 2 - z)
    return BCQ(signs=signs, alpha=alpha.to(ALPHA_DTYPE), offset=offset.to(OFFSET_DTYPE), group_size=g)


def refit_full_gram(W: torch.Tensor, H: torch.Tensor, signs: torch.Tensor, g: int, chunk: int = 64) -> tuple[torch.Tensor, torch.Tensor]:
    """The (α, β) of every group that minimize the output error tr((W − Ŵ) H (W − Ŵ)ᵀ) for fixed sign
    planes (q, d_out, d_in): per output row a least-squares problem in the (q+1)·n values of its n
    groups, coupled across groups through H. Cost d_out·d_in²·(q+1). Returns alpha (q, d_out, n)
    rounded to float16 and offset (d_out, n)."""
    q, d_out, d_in = signs.shape
    n = d_in // g
    c = q + 1
    Hd = H.double()
    ridge = 1e-8 * float(Hd.diagonal().mean().clamp_min(1e-30))
    alpha = torch.empty(q, d_out, n)
    offset = torch.empty(d_out, n)
    Hg = Hd.reshape(d_in, n, g)  # H[:, group k]
    for r0 in range(0, d_out, chunk):
        r1 = min(r0 + chunk, d_out)
        m = r1 - r0
        S = torch.cat([signs[:, r0:r1].double() * 2 - 1, torch.ones(1, m, d_in, dtype=torch.float64)])  # (c, m, d_in)
        S = S.reshape(c, m, n, g).permute(2, 3, 1, 0)  # (n, g, m, c)
        HA = torch.einsum("jkg,kgmc->mjkc", Hg, S).reshape(m, d_in, n * c)  # (m, d_in, Q): H times each block column
        Sm = S.permute(2, 0, 1, 3)  # (m, n, g, c)
        G = torch.einsum("mkgc,mkgQ->mkcQ", Sm, HA.reshape(m, n, g, n * c)).reshape(m, n * c, n * c)
        rhs = torch.einsum("mjQ,mj->mQ", HA, W[r0:r1].double())
        G = G + ridge * torch.eye(n * c, dtype=torch.float64)
        theta = torch.linalg.solve(G, rhs[:, :, None])[:, :, 0].reshape(m, n, c)
        alpha[:, r0:r1] = theta[:, :, :q].permute(2, 0, 1).float()
        offset[r0:r1] = theta[:, :, q].float()
    return alpha.to(ALPHA_DTYPE), offset.to(OFFSET_DTYPE)


def bcq_gptq(
    W: torch.Tensor, H: torch.Tensor, bits: int, group_size: int, *, rounds: int = 15, refits: int = 2, blocksize: int = 128,
    damp: float = 0.01, actorder: bool = True, name: str = "", cache: FactorCache | None = None,
) -> tuple[BCQ, float]:
    """BCQ with GPTQ's error feedback under the full Gram H = XᵀX (d_in, d_in).

    The first grid (α, β per group) comes from :func:`bcq_quantize` on the original weights, weighted
    by diag(H). The OBS sweep then visits the columns (in order of decreasing diag(H) with
    ``actorder``), gives each weight the nearest of its group's 2^q values Σ ±α_i + β, and feeds the
    error forward to the columns not yet visited, as GPTQ does on a uniform grid with static groups.
    Each of ``refits`` rounds then solves (α, β) for the swept signs under the full H
    (:func:`refit_full_gram`) and sweeps again on that grid; the result with the lowest output error
    tr(ΔHΔᵀ) is kept. Returns the codes and that error."""
    W = W.float()
    g = group_size or W.shape[1]
    grid = bcq_quantize(W, bits, g, rounds, hdiag=H.diagonal(), init="uniform")
    perm, U = cache.get(H, actorder, damp, name) if cache is not None else sweep_factor(H, actorder, damp, name)
    Hd = H.double()

    def output_error(b: BCQ) -> float:
        D = (W - b.dequantize()).double()
        return float(((D @ Hd) * D).sum())

    best, best_err = grid, output_error(grid)
    for k in range(refits + 1):
        swept = BCQ(signs=_sweep_signs(W, grid, perm, U, blocksize), alpha=grid.alpha, offset=grid.offset, group_size=g)
        e = output_error(swept)
        if e < best_err:
            best, best_err = swept, e
        if k == refits:
            break
        alpha, offset = refit_full_gram(W, H, swept.signs, g)
        grid = BCQ(signs=swept.signs, alpha=alpha, offset=offset, group_size=g)
        e = output_error(grid)
        if e < best_err:
            best, best_err = grid, e
    return best, best_err


def _sweep_signs(W: torch.Tensor, grid: BCQ, perm: torch.Tensor, U: torch.Tensor, blocksize: int) -> torch.Tensor:
    """Sign planes (q, d_out, d_in) from the OBS sweep of W on the fixed values of ``grid``."""
    d_out, d_in = W.shape
    bits, g = grid.bits, grid.group_size
    n = d_in // g
    alpha = grid.alpha.float().permute(1, 2, 0).reshape(d_out * n, bits)  # (d_out·n, q)
    vals, signs = _candidates(alpha, grid.offset.float().reshape(-1))
    vals = vals.reshape(d_out, n, -1).to(SWEEP_DTYPE)  # (d_out, n, 2^q)
    group = (perm // g).to(SWEEP_DTYPE)[None, :].expand(d_out, -1)
    rows = torch.arange(d_out)

    def step(w: torch.Tensor, k: torch.Tensor, _: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        v = vals[:, int(k[0])]  # (d_out, 2^q): the values of this column's group
        idx = (w[:, None] - v).abs().argmin(dim=1)
        return idx.to(w.dtype), v[rows, idx]

    idx_p, _ = _static_sweep(W.to(SWEEP_DTYPE)[:, perm], U, group, group, step, blocksize)
    idx = torch.empty_like(idx_p)
    idx[:, perm] = idx_p
    return (signs[idx.long()] > 0).permute(2, 0, 1).contiguous()  # (q, d_out, d_in)
