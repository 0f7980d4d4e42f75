"""GPTQ (Frantar et al., arXiv 2210.17323) on the shared OBS sweep, for per-OC and per-IC groups.

- per-OC with groups: the scale/zero of a group are computed from the current (already updated)
  weights when the sweep reaches the group's first column; with activation order (columns sorted
  by decreasing diag H) or ``static_groups`` they are computed up front from the original weights,
  so that each group still covers contiguous original columns (g_idx = column // g).
- per-IC: each input column is quantized as a vector of d_out values with groups along the output
  dimension, its parameters computed from its current value; the error feedback is unchanged
  (AdaDim's GPTQ-ada).
"""

from __future__ import annotations

from typing import Callable

import torch

from . import ggml
from .ggml import GGMLType
from .obs import SWEEP_DTYPE, Block, inverse_hessian_cholesky, obs_sweep
from .quant import SCALE_DTYPE, Quantized, QuantSpec, dequantize_rows, nf_levels, qparams_clipped, quantize_rows


class FactorCache:
    """The last inverse-Hessian factor, reused when the next linear has the same Gram (q/k/v and
    gate/up read the same input, so their sums are equal): one factorization instead of three."""

    def __init__(self) -> None:
        self._key: tuple[torch.Tensor, bool, float] | None = None
        self._value: tuple[torch.Tensor, torch.Tensor] | None = None

    def get(self, H: torch.Tensor, actorder: bool, damp: float, name: str) -> tuple[torch.Tensor, torch.Tensor]:
        k = self._key
        if k is not None and self._value is not None and k[1] == actorder and k[2] == damp and k[0].shape == H.shape and torch.equal(k[0], H):
            return self._value
        value = sweep_factor(H, actorder, damp, name)
        self._key, self._value = (H, actorder, damp), value
        return value


def sweep_factor(H: torch.Tensor, actorder: bool, damp: float, name: str) -> tuple[torch.Tensor, torch.Tensor]:
    """(sweep order of the columns, upper Cholesky factor of the damped H⁻¹ in that order)."""
    d_in = H.shape[0]
    perm = torch.argsort(H.diagonal(), descending=True) if actorder else torch.arange(d_in)
    U = inverse_hessian_cholesky(H[perm][:, perm] if actorder else H, damp, name)[0].to(SWEEP_DTYPE)
    return perm, U


def _static_sweep(Wp: torch.Tensor, U: torch.Tensor, S: torch.Tensor, Z: torch.Tensor, step: "Step",
                  blocksize: int) -> tuple[torch.Tensor, torch.Tensor]:
    """The OBS sweep for quantization parameters fixed up front (per column, in sweep order):
    :func:`~compress.solvers.obs.obs_sweep` with the column step inlined (the per-column Python work is
    most of a GPTQ solve). ``step(w, s, z)`` gives a column's codes and their values from its
    parameters. Returns (codes, per-column loss), the same numbers as the general sweep."""
    W = Wp.clone()
    d_out, n = W.shape
    codes = torch.empty_like(W)
    losses = torch.empty(n, dtype=W.dtype)
    for i1 in range(0, n, blocksize):
        i2 = min(i1 + blocksize, n)
        W1 = W[:, i1:i2].clone()
        U1 = U[i1:i2, i1:i2]
        S1, Z1 = S[:, i1:i2], Z[:, i1:i2]
        Err1 = torch.empty_like(W1)
        for i in range(i2 - i1):
            w = W1[:, i]
            q, v = step(w, S1[:, i], Z1[:, i])
            codes[:, i1 + i] = q
            err = (w - v) / U1[i, i]
            Err1[:, i] = err
            W1[:, i:] -= err[:, None] @ U1[i, i:][None, :]
        d = U1.diagonal()
        losses[i1:i2] = (Err1 * d).square().sum(0) / d.square()
        W[:, i2:] -= Err1 @ U[i1:i2, i2:]
    return codes, losses


Step = Callable[[torch.Tensor, torch.Tensor, torch.Tensor], tuple[torch.Tensor, torch.Tensor]]


def _uniform_step(maxq: int) -> Step:
    def step(w: torch.Tensor, s: torch.Tensor, z: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        q = torch.clamp(torch.round(w / s) + z, 0, maxq)
        return q, (q - z) * s
    return step


def _nf_step(bits: int) -> Step:
    L = nf_levels(bits).to(SWEEP_DTYPE)
    mids = (L[1:] + L[:-1]) / 2

    def step(w: torch.Tensor, s: torch.Tensor, _: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        q = torch.bucketize(w / s, mids)  # nearest level, as quantize_rtn picks it
        return q.to(w.dtype), L[q] * s
    return step


#: multiply-adds a Python-level column step of the sweep costs in time (its per-column overhead)
COLUMN_STEP = 2e6


def gptq_work(d_out: int, d_in: int, tokens: int) -> float:
    """Estimated multiply-adds of a GPTQ solve: the Gram's accumulation, the damped inverse's
    factors, the lazy-batch sweep and its per-column loop."""
    return tokens * d_in**2 + 2.0 * d_in**3 + d_out * d_in**2 + COLUMN_STEP * d_in


def gptq_ggml(
    W: torch.Tensor, H: torch.Tensor, t: GGMLType, *, blocksize: int = 128, damp: float = 0.01, actorder: bool = False,
    name: str = "", cache: FactorCache | None = None,
) -> tuple[torch.Tensor, float]:
    """GPTQ on a llama.cpp block grid: the grid (sub-block scales and offsets, quantized as stored)
    is chosen up front from the original weights with diag(H) as importance, then every column is
    quantized against it with the error fed forward. Returns the stored bytes and the OBS loss."""
    d_out, d_in = W.shape
    g = ggml.grid(W, t, H.diagonal())
    perm, U = cache.get(H, actorder, damp, name) if cache is not None else sweep_factor(H, actorder, damp, name)
    cols = perm // t.sub
    S = g.S.to(SWEEP_DTYPE)[:, cols]
    M = g.M.to(SWEEP_DTYPE)[:, cols]
    L = t.levels().to(SWEEP_DTYPE)

    def step(w: torch.Tensor, s: torch.Tensor, m: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        q = ggml.nearest_codes(w, s, m, t)
        return q, s * L[q.long()] - m

    codes_p, losses = _static_sweep(W.to(SWEEP_DTYPE)[:, perm], U, S, M, step, blocksize)
    codes = torch.empty_like(codes_p)
    codes[:, perm] = codes_p
    return ggml.encode(codes.long(), g), float(losses.sum())


def _gptq_nf(W: torch.Tensor, U: torch.Tensor, perm: torch.Tensor, spec: QuantSpec, blocksize: int,
             keep: torch.Tensor | None) -> tuple[Quantized, float]:
    """GPTQ's sweep on NormalFloat levels: the absmax scales of the original weights' groups (as round
    to nearest stores them), fixed up front."""
    if spec.dim != "oc" or keep is not None:
        raise ValueError("NormalFloat levels take per-OC groups on an unpruned weight")
    d_out, d_in = W.shape
    g, n_groups = spec.groups(d_out, d_in)
    scales = W.reshape(d_out, n_groups, g).abs().amax(dim=2).clamp_min(1e-12).to(SCALE_DTYPE).to(SWEEP_DTYPE)
    cols = perm // g
    codes_p, losses = _static_sweep(W[:, perm], U, scales[:, cols], torch.zeros_like(scales)[:, cols], _nf_step(spec.bits), blocksize)
    codes = torch.empty_like(codes_p)
    codes[:, perm] = codes_p
    q = Quantized(q=codes.to(torch.uint8), scales=scales.to(SCALE_DTYPE), zeros=torch.zeros_like(scales, dtype=torch.uint8), spec=spec)
    return q, float(losses.sum())


def gptq_quantize(
    W: torch.Tensor,
    H: torch.Tensor,
    spec: QuantSpec,
    *,
    blocksize: int = 128,
    damp: float = 0.01,
    actorder: bool = False,
    static_groups: bool = False,
    keep: torch.Tensor | None = None,
    name: str = "",
    cache: FactorCache | None = None,
) -> tuple[Quantized, float]:
    """Quantize W (d_out, d_in) given H = XᵀX (d_in, d_in). Returns the codes and the OBS loss.

    ``keep`` (bool, like W): weights outside it are pruned and stay exactly 0 (code = zero-point);
    their error is fed forward like any other, as in SparseGPT's joint sparsify-and-quantize.
    ``cache`` reuses the factorization of an equal H (linears reading the same input)."""
    d_out, d_in = W.shape
    g, n_groups = spec.groups(d_out, d_in)
    W = W.to(SWEEP_DTYPE)
    perm, U = cache.get(H, actorder, damp, name) if cache is not None else sweep_factor(H, actorder, damp, name)
    hdiag = H.diagonal().to(SWEEP_DTYPE)
    channels = d_out if spec.dim == "oc" else d_in
    scales = torch.zeros(channels, n_groups, dtype=SWEEP_DTYPE)
    zeros = torch.zeros(channels, n_groups, dtype=SWEEP_DTYPE)
    codes = torch.zeros(d_out, d_in, dtype=SWEEP_DTYPE)
    static = spec.dim == "oc" and (static_groups or actorder)
    if spec.levels == "nf":
        return _gptq_nf(W, U, perm, spec, blocksize, keep)
    if static:
        for k in range(n_groups):
            block = W[:, k * g : (k + 1) * g]
            w8 = hdiag[k * g : (k + 1) * g][None, :].expand(d_out, -1)
            scales[:, k], zeros[:, k] = qparams_clipped(block, spec, w8)
    Wp = W[:, perm]
    if static and keep is None:
        cols = perm // g
        codes_p, losses = _static_sweep(Wp, U, scales[:, cols], zeros[:, cols], _uniform_step(spec.maxq), blocksize)
        codes[:, perm] = codes_p
        q = Quantized(q=codes.to(torch.uint8), scales=scales.to(SCALE_DTYPE), zeros=zeros.to(torch.uint8), spec=spec)
        return q, float(losses.sum())

    def column(j: int, w: torch.Tensor, block: Block) -> torch.Tensor:
        col = int(perm[j])  # original input index
        if spec.dim == "oc":
            k = col // g
            if not static and col % g == 0:
                # group parameters from the current weights of this group's columns
                # parameters from the current values of this group's columns (w and the next g - 1)
                cols = torch.cat([w[:, None], block.W1[:, j - block.i1 + 1 : j - block.i1 + g]], dim=1)
                w8 = hdiag[col : col + g][None, :].expand(d_out, -1)
                scales[:, k], zeros[:, k] = qparams_clipped(cols, spec, w8)
            s, z = scales[:, k], zeros[:, k]
            q = quantize_rows(w[:, None], s, z, spec.maxq)
            if keep is not None:
                q = torch.where(keep[:, col, None], q, z[:, None])
            codes[:, col] = q[:, 0]
            return dequantize_rows(q, s, z)[:, 0]
        rows = w.reshape(n_groups, g)  # per-IC: groups along d_out within input column `col`
        s, z = qparams_clipped(rows, spec)
        scales[col], zeros[col] = s, z
        q = quantize_rows(rows, s, z, spec.maxq)
        if keep is not None:
            q = torch.where(keep[:, col].reshape(n_groups, g), q, z[:, None])
        codes[:, col] = q.reshape(-1)
        return dequantize_rows(q, s, z).reshape(-1)

    if spec.dim == "oc" and not static and blocksize % g != 0 and g < d_in:
        blocksize = max(g, (blocksize // g) * g)  # a dynamic group must lie inside one block
    if spec.dim == "oc" and not static and g > blocksize:
        blocksize = g
    _, losses = obs_sweep(Wp, U, column, blocksize=blocksize)
    q = Quantized(
        q=codes.to(torch.uint8),
        scales=scales.to(SCALE_DTYPE),
        zeros=zeros.to(torch.uint8),
        spec=spec,
    )
    return q, float(losses.sum())
