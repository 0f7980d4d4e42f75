"""AWQ (Lin et al., arXiv 2306.00978): per-input-channel scales that protect the channels with large
activations from rounding error, folded exactly into the operation that produces the input.

For a group of linears reading one input x (q/k/v after the attention norm, gate/up after the MLP
norm, o after v, down after up), quantizing W·diag(s) and dividing the input by s computes
Q(W·diag(s))·diag(s)⁻¹·x: a channel scaled up loses relatively less to rounding. The scales come
from the mean magnitude x̄ of each input channel (and, with ``duo``, the mean normalized magnitude
w̄ of each weight column): s = x̄^α / w̄^(1−α), normalized so that max(s)·min(s) = 1, for α on a
grid; the α whose fake-quantized sub-block output is closest to the original is kept. The identity
(s = 1) is always a candidate, so the search never does worse than plain rounding on what it
measures.
"""

from __future__ import annotations

import torch

from . import ggml
from .quant import QuantSpec, quantize_rtn

#: floor of x̄ and w̄ (channels that never fire must not give a zero or infinite scale)
EPS = 1e-4


def weight_column_mean(W: torch.Tensor, group: int) -> torch.Tensor:
    """Mean over output rows of |W| normalized by its group's max magnitude (groups of ``group``
    consecutive inputs of one row; 0 = the whole row): w̄ per input column, (d_in,)."""
    d_out, d_in = W.shape
    g = group or d_in
    A = W.detach().float().abs().reshape(d_out, d_in // g, g)
    A = A / A.amax(dim=-1, keepdim=True).clamp_min(1e-12)
    return A.reshape(d_out, d_in).mean(dim=0)


def candidate_scales(x_mean: torch.Tensor, w_mean: torch.Tensor | None, grid: int) -> list[tuple[float | None, torch.Tensor]]:
    """(α, s) for the identity (α = None) and α = i/grid, i = 0 … grid − 1."""
    x = x_mean.float().clamp_min(EPS)
    out: list[tuple[float | None, torch.Tensor]] = [(None, torch.ones_like(x))]
    for i in range(grid):
        a = i / grid
        s = x.pow(a) if w_mean is None else x.pow(a) / w_mean.float().clamp_min(EPS).pow(1 - a)
        s = s.clamp_min(EPS)
        s = s / (s.max() * s.min()).sqrt()
        out.append((a, s))
    return out


def fake_quantized(W: torch.Tensor, s: torch.Tensor, spec: QuantSpec, ggml_type: str | None = None) -> torch.Tensor:
    """Q(W·diag(s))·diag(s)⁻¹: what the linear computes on the unscaled input once the scale is folded
    (Q: round to nearest on the integer grid of ``spec``, or on llama.cpp's block type ``ggml_type``)."""
    Ws = W.float() * s[None, :]
    if ggml_type is not None:
        t = ggml.type_for(ggml_type, Ws.shape[1])
        if t is not None:
            return (ggml.decode(ggml.quantize(Ws, t), t, *Ws.shape) / s[None, :]).to(W.dtype)
    return (quantize_rtn(Ws, spec).dequantize() / s[None, :]).to(W.dtype)


def kv_expand(heads: int, kv_heads: int, head_dim: int) -> torch.Tensor:
    """For each input channel of the attention output projection (heads × head_dim), the channel of
    the value projection (kv_heads × head_dim) it reads: query heads that share a key/value head
    read the same value channel, so their scales must be equal."""
    rep = heads // kv_heads
    c = torch.arange(heads * head_dim)
    return (c // head_dim // rep) * head_dim + c % head_dim


def reduce_to(values: torch.Tensor, expand: torch.Tensor, size: int) -> torch.Tensor:
    """Mean of ``values`` over the channels ``expand`` maps to each of ``size`` targets."""
    total = torch.zeros(size, dtype=torch.float64).index_add_(0, expand, values.double())
    count = torch.zeros(size, dtype=torch.float64).index_add_(0, expand, torch.ones_like(values, dtype=torch.float64))
    return (total / count.clamp_min(1)).float()
