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
