"""Uniform (integer-grid) weight quantization with per-OC or per-IC groups.

W is (d_out, d_in). Grouping:
- ``oc`` (per-output-channel groups, the usual layout): each output row is cut into groups of g
  consecutive input positions; one scale/zero per (row, input group). Scales: (d_out, d_in/g).
- ``ic`` (per-input-channel groups, AdaDim's per-IC): each input column is cut into groups of g
  consecutive output positions; one scale/zero per (column, output group). Scales: (d_in, d_out/g).
g = 0 means one group over the whole channel.

Asymmetric: scale = (max − min)/(2^b − 1), zero = round(−min/scale), q = clamp(round(w/scale) + zero).
Symmetric: scale = 2·max|w|/(2^b − 1), zero = 2^(b−1) (GPTQ's convention, unsigned storage).
Dequantized w = (q − zero)·scale. Scales are rounded to :data:`SCALE_DTYPE` before use so that the
stored checkpoint reproduces exactly the values the solver worked with.
"""

from __future__ import annotations

import functools
from dataclasses import dataclass

import torch

SUPPORTED_BITS = (2, 3, 4, 8)
#: storage dtype of scales; quantization uses the rounded value
SCALE_DTYPE = torch.float16
#: range shrink factors tried by the clipping search
CLIP_GRID = tuple(1.0 - 0.05 * i for i in range(11))  # 1.0 … 0.5
#: largest grid × group elements the clipping search evaluates in one batch
_CLIP_BATCH = 1 << 24


@dataclass(frozen=True)
class QuantSpec:
    bits: int = 4
    group_size: int = 128  # 0 = whole channel
    sym: bool = False
    dim: str = "oc"  # "oc" | "ic"
    clip: bool = False
    levels: str = "uniform"  # "uniform" | "nf" (NormalFloat codebook, absmax scale, no zero-point)

    @property
    def maxq(self) -> int:
        return 2**self.bits - 1

    def groups(self, d_out: int, d_in: int) -> tuple[int, int]:
        """(group length, number of groups per channel) along the grouped dimension."""
        length = d_in if self.dim == "oc" else d_out
        g = self.group_size or length
        return g, length // g


@functools.lru_cache(maxsize=None)
def _nf_levels(bits: int) -> torch.Tensor:
    offset = 0.5 * ((1 - 1 / (2 * 15)) + (1 - 1 / (2 * 16)))
    n = 2**bits
    pos = torch.special.ndtri(torch.linspace(offset, 0.5, n // 2 + 1, dtype=torch.float64)[:-1])
    neg = -torch.special.ndtri(torch.linspace(offset, 0.5, n // 2, dtype=torch.float64)[:-1])
    v = torch.sort(torch.cat([pos, torch.zeros(1, dtype=torch.float64), neg])).values
    return (v / v.abs().max()).float()


def nf_levels(bits: int) -> torch.Tensor:
    """The 2^bits NormalFloat levels in [-1, 1], ascending (QLoRA's construction: normal quantiles, an
    exact 0, one more positive than negative level)."""
    return _nf_levels(bits).clone()


def group_error_check(spec: QuantSpec, d_out: int, d_in: int) -> str | None:
    """None if the group size divides the grouped dimension, else the reason and sizes that would."""
    length = d_in if spec.dim == "oc" else d_out
    g = spec.group_size
    if g == 0 or length % g == 0:
        return None
    ok = [s for s in (32, 64, 128, 256) if length % s == 0]
    which = "input" if spec.dim == "oc" else "output"
    return f"group size {g} does not divide the {which} dimension {length} (sizes that do: {', '.join(map(str, ok)) or 'only 0 = whole channel'})"


def qparams(x: torch.Tensor, spec: QuantSpec, shrink: float | torch.Tensor = 1.0) -> tuple[torch.Tensor, torch.Tensor]:
    """Scale and zero for each row of ``x`` (rows are groups): x (n_groups, g) → scale, zero (n_groups,)."""
    xmin = x.amin(dim=1).clamp(max=0) * shrink
    xmax = x.amax(dim=1).clamp(min=0) * shrink
    if spec.sym:
        amax = torch.maximum(xmin.abs(), xmax)
        scale = 2 * amax / spec.maxq
        zero = torch.full_like(scale, float((spec.maxq + 1) // 2))
    else:
        scale = (xmax - xmin) / spec.maxq
        zero = None  # set below from the rounded scale
    scale = torch.where(scale > 0, scale, torch.ones_like(scale))
    scale = scale.to(SCALE_DTYPE).to(x.dtype)
    scale = torch.where(scale > 0, scale, torch.full_like(scale, float(torch.finfo(SCALE_DTYPE).tiny)))
    if zero is None:
        zero = torch.round(-xmin / scale).clamp(0, spec.maxq)
    return scale, zero


def quantize_rows(x: torch.Tensor, scale: torch.Tensor, zero: torch.Tensor, maxq: int) -> torch.Tensor:
    """Integer codes of rows of x (n, g) with per-row scale/zero (n,)."""
    return torch.clamp(torch.round(x / scale[:, None]) + zero[:, None], 0, maxq)


def dequantize_rows(q: torch.Tensor, scale: torch.Tensor, zero: torch.Tensor) -> torch.Tensor:
    return (q - zero[:, None]) * scale[:, None]


def qparams_clipped(
    x: torch.Tensor, spec: QuantSpec, weight: torch.Tensor | None = None
) -> tuple[torch.Tensor, torch.Tensor]:
    """qparams with an optional grid search over the range shrink (per group), minimizing the
    squared error Σ w_k (x − x̂)² (``weight`` (g,) or (n, g): e.g. diag(XᵀX) for per-OC groups)."""
    scale, zero = qparams(x, spec)
    if not spec.clip:
        return scale, zero
    if x.numel() * len(CLIP_GRID) <= _CLIP_BATCH:
        # every shrink at once (one set of tensor ops instead of eleven); argmin takes the first
        # minimum, as the loop below keeps the earlier shrink on a tie
        grid = torch.tensor(CLIP_GRID, dtype=x.dtype, device=x.device)[:, None]
        s, z = qparams(x, spec, grid)  # (grid, n)
        q = torch.clamp(torch.round(x / s[..., None]) + z[..., None], 0, spec.maxq)
        d = ((q - z[..., None]) * s[..., None] - x).square()
        e = (d * weight if weight is not None else d).sum(dim=-1)
        k = e.argmin(dim=0, keepdim=True)
        return s.gather(0, k)[0], z.gather(0, k)[0]
    best = _err(x, scale, zero, spec.maxq, weight)
    for p in CLIP_GRID[1:]:
        s, z = qparams(x, spec, p)
        e = _err(x, s, z, spec.maxq, weight)
        better = e < best
        scale = torch.where(better, s, scale)
        zero = torch.where(better, z, zero)
        best = torch.where(better, e, best)
    return scale, zero


def _err(x: torch.Tensor, s: torch.Tensor, z: torch.Tensor, maxq: int, weight: torch.Tensor | None) -> torch.Tensor:
    d = dequantize_rows(quantize_rows(x, s, z, maxq), s, z) - x
    d = d.square()
    if weight is not None:
        d = d * weight
    return d.sum(dim=1)


@dataclass
class Quantized:
    """Integer codes (d_out, d_in) plus scales/zeros in the layout of ``spec.dim`` (see module doc)."""

    q: torch.Tensor  # uint8 (d_out, d_in)
    scales: torch.Tensor  # oc: (d_out, d_in/g); ic: (d_in, d_out/g)
    zeros: torch.Tensor  # same shape as scales, integer-valued
    spec: QuantSpec

    def dequantize(self, dtype: torch.dtype = torch.float32) -> torch.Tensor:
        return dequantize(self.q, self.scales, self.zeros, self.spec).to(dtype)


def _to_groups(W: torch.Tensor, spec: QuantSpec) -> torch.Tensor:
    """W (d_out, d_in) → (n_channels · n_groups, g) rows, channel-major."""
    d_out, d_in = W.shape
    g, n = spec.groups(d_out, d_in)
    M = W if spec.dim == "oc" else W.T  # (channels, length)
    return M.reshape(M.shape[0] * n, g)


def _from_groups(G: torch.Tensor, spec: QuantSpec, d_out: int, d_in: int) -> torch.Tensor:
    M = G.reshape(d_out, d_in) if spec.dim == "oc" else G.reshape(d_in, d_out).T
    return M


def quantize_rtn(W: torch.Tensor, spec: QuantSpec, hdiag: torch.Tensor | None = None) -> Quantized:
    """Round-to-nearest quantization of W (d_out, d_in); ``hdiag`` (d_in,) weights the clipping
    search by input importance (per-OC groups; per-IC groups lie in one input channel)."""
    W = W.float()
    d_out, d_in = W.shape
    g, n = spec.groups(d_out, d_in)
    G = _to_groups(W, spec)
    weight = None
    if hdiag is not None and spec.dim == "oc":
        weight = hdiag.float().reshape(n, g).repeat(d_out, 1)
    channels = d_out if spec.dim == "oc" else d_in
    if spec.levels == "nf":
        L = nf_levels(spec.bits)
        scale = G.abs().amax(dim=1).clamp_min(1e-12).to(SCALE_DTYPE).float()
        # nearest level: bucketize against the midpoints (a tie goes to the lower level, as argmin would)
        q = torch.bucketize(G / scale[:, None], (L[1:] + L[:-1]) / 2).float()
        return Quantized(
            q=_from_groups(q, spec, d_out, d_in).to(torch.uint8).contiguous(),
            scales=scale.reshape(channels, n).to(SCALE_DTYPE),
            zeros=torch.zeros(channels, n, dtype=torch.uint8),
            spec=spec,
        )
    scale, zero = qparams_clipped(G, spec, weight)
    q = quantize_rows(G, scale, zero, spec.maxq)
    return Quantized(
        q=_from_groups(q, spec, d_out, d_in).to(torch.uint8).contiguous(),
        scales=scale.reshape(channels, n).to(SCALE_DTYPE),
        zeros=zero.reshape(channels, n).to(torch.uint8),
        spec=spec,
    )


def dequantize(q: torch.Tensor, scales: torch.Tensor, zeros: torch.Tensor, spec: QuantSpec) -> torch.Tensor:
    """Float32 weights (d_out, d_in) from codes and per-group scales/zeros."""
    d_out, d_in = q.shape
    g, n = spec.groups(d_out, d_in)
    s = scales.float().repeat_interleave(g, dim=1)  # (channels, length)
    if spec.levels == "nf":
        L = nf_levels(spec.bits)
        vals = L[q.long()]
        return vals * s if spec.dim == "oc" else (vals.T * s).T
    z = zeros.float().repeat_interleave(g, dim=1)
    if spec.dim == "oc":
        return (q.float() - z) * s
    return ((q.float().T - z) * s).T
