"""PyTorch emulations of the CUDA kernels' exact data paths, for CPU tests of the layouts.

They compute what the kernels compute, the way they compute it — lookup tables of ±-sums of 8
activations indexed by packed weight bytes, per-group flushes scaled by α and the offset times the
group's activation sum (LUT-GEMM); metadata words decoded nibble by nibble with the kept values
gathered against the activations (2:4) — in float32, so a layout or indexing error shows up as a
mismatch with the reference ops on any machine.
"""

from __future__ import annotations

import torch

from .layout import TILE


def lut_tables(x: torch.Tensor) -> torch.Tensor:
    """x (B, K) → (B, K/8, 256): entry e of chunk c is Σ_u (bit u of e ? +x : −x)[8c + u]."""
    b, k = x.shape
    e = torch.arange(256)
    sign = ((e[:, None] >> torch.arange(8)) & 1).to(torch.float32) * 2 - 1  # (256, 8)
    return torch.einsum("bcu,eu->bce", x.float().reshape(b, k // 8, 8), sign)


def lut_gemm_emulate(x: torch.Tensor, kplanes: torch.Tensor, alpha_t: torch.Tensor, offset_t: torch.Tensor, in_features: int) -> torch.Tensor:
    """y (B, N) float32 through LUT-GEMM's data path (tables, byte lookups, group flushes)."""
    q, kt, n, _ = kplanes.shape
    k = in_features
    groups = alpha_t.shape[1]
    g = k // groups
    xp = torch.zeros(x.shape[0], kt * TILE)
    xp[:, :k] = x.float()
    lut = lut_tables(xp)  # (B, KT·16, 256)
    chunk_sum = xp.reshape(x.shape[0], -1, 8).sum(dim=2)  # (B, KT·16)
    byte = kplanes.permute(0, 2, 1, 3).reshape(q, n, kt * 16).long()  # (q, N, chunks)
    chunks = k // 8
    # looked-up partial sums per plane, row and chunk: (B, q, N, chunks)
    looked = torch.stack([torch.gather(lut[bb, :chunks].expand(q, n, chunks, 256), 3, byte[:, :, :chunks, None])[..., 0] for bb in range(x.shape[0])])
    grp = torch.arange(chunks) * 8 // g  # group of each chunk
    per_group = torch.zeros(x.shape[0], q, n, groups).index_add_(3, grp, looked)  # (B, q, N, G)
    xsum = torch.zeros(x.shape[0], groups).index_add_(1, grp, chunk_sum[:, :chunks])  # (B, G)
    y = (per_group * alpha_t.float().permute(0, 2, 1)[None]).sum(dim=(1, 3))
    return y + xsum @ offset_t.float()


def sparse24_emulate(x: torch.Tensor, values: torch.Tensor, meta: torch.Tensor) -> torch.Tensor:
    """y (B, N) float32 through the 2:4 kernel's data path: per chunk of 8 groups one 32-bit
    metadata word (little-endian bytes, group gi in nibble gi), positions k + (code & 3) and
    k + (code >> 2 & 3), values 2·gi and 2·gi + 1 of the chunk."""
    n, half = values.shape
    k = half * 2
    if k % 32:
        raise ValueError("the 2:4 kernel needs K % 32 == 0")
    words = meta.reshape(n, k // 32, 4).to(torch.int64)
    words = words[..., 0] | (words[..., 1] << 8) | (words[..., 2] << 16) | (words[..., 3] << 24)  # (N, chunks)
    gi = torch.arange(8)
    code = (words[..., None] >> (4 * gi)) & 0xF  # (N, chunks, 8)
    base = torch.arange(k // 32)[:, None] * 32 + gi * 4  # (chunks, 8)
    p0 = (base + (code & 3)).reshape(n, -1)
    p1 = (base + ((code >> 2) & 3)).reshape(n, -1)
    v = values.float().reshape(n, -1, 2)
    xf = x.float()
    return torch.einsum("ng,bng->bn", v[..., 0], xf[:, p0]) + torch.einsum("ng,bng->bn", v[..., 1], xf[:, p1])
