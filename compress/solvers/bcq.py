"""Binary-coding quantization (BCQ, as in LUT-GEMM, Park et al., arXiv 2206.09557), extended with a
per-group offset so that uniform quantization is a special case.

For each group (g consecutive inputs of one output row): w ≈ Σ_{i<q} α_i b_i + β, b_i ∈ {−1, +1}.

Quantizer: greedy init (β = mean, then for each plane b_i = sign(r), α_i = mean|r|, r −= α_i b_i),
then ``rounds`` of alternating refinement: least squares for (α, β) given B, then each weight takes
the nearest of the 2^q values Σ ±α_i + β.

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


def bcq_quantize(W: torch.Tensor, bits: int, group_size: int, rounds: int = 15) -> BCQ:
    """Greedy + alternating BCQ of W (d_out, d_in) with groups of ``group_size`` inputs."""
    W = W.float()
    d_out, d_in = W.shape
    g = group_size or d_in
    n = d_in // g
    X = W.reshape(d_out * n, g)  # rows = groups
    beta = X.mean(dim=1)
    r = X - beta[:, None]
    B = torch.empty(bits, *X.shape, dtype=X.dtype)
    alpha = torch.empty(X.shape[0], bits, dtype=X.dtype)
    for i in range(bits):
        B[i] = torch.where(r >= 0, 1.0, -1.0)
        alpha[:, i] = r.abs().mean(dim=1)
        r = r - alpha[:, i : i + 1] * B[i]
    best_err = r.square().sum(dim=1)
    best = (B.clone(), alpha.clone(), beta.clone())
    eye = torch.eye(bits + 1, dtype=torch.float64)
    for _ in range(rounds):
        # least squares for (α, β) given the signs
        A = torch.cat([B.permute(1, 2, 0), torch.ones(X.shape[0], g, 1)], dim=2).double()  # (n, g, q+1)
        AtA = A.transpose(1, 2) @ A + 1e-10 * eye
        Atx = A.transpose(1, 2) @ X.double()[:, :, None]
        sol = torch.linalg.solve(AtA, Atx)[:, :, 0].float()
        alpha, beta = sol[:, :bits], sol[:, bits]
        # nearest of the 2^q representable values
        vals, signs = _candidates(alpha, beta)
        idx = (X[:, :, None] - vals[:, None, :]).abs().argmin(dim=2)  # (n, g)
        B = signs[idx].permute(2, 0, 1).contiguous()  # (q, n, g)
        err = (X - (vals.gather(1, idx))).square().sum(dim=1)
        improved = err < best_err
        best_err = torch.where(improved, err, best_err)
        best = (
            torch.where(improved[None, :, None], B, best[0]),
            torch.where(improved[:, None], alpha, best[1]),
            torch.where(improved, beta, best[2]),
        )
    B, alpha, beta = best
    # fp16 scales: re-solve nothing, just round (the stored values are what the model uses)
    alpha16 = alpha.to(ALPHA_DTYPE)
    return BCQ(
        signs=(B > 0).reshape(bits, d_out, d_in),
        alpha=alpha16.T.reshape(bits, d_out, n).contiguous(),
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
