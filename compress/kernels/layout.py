"""The layouts the CUDA kernels read, and exact conversions from the modules' storage.

LUT-GEMM (``csrc/lut_gemm.cu``) reads BCQ weights tiled along the input dimension so that one
thread (one output row) fetches its 16 bytes of a 128-input tile with one coalesced 16-byte load:

- ``kplanes``: uint8 (q, KT, N, 16), KT = ceil(K/128): byte c of (i, t, m) is byte 16·t + c of
  ``BCQLinear.planes[i, m]`` (signs of plane i for inputs 128·t + 8c … +7, LSB first); 0 past K.
- ``alpha_t``: float16 (q, G, N) = ``alpha.transpose(1, 2)``; ``offset_t``: float32 (G, N).

Uniform per-OC codes convert to BCQ exactly (:func:`compress.solvers.bcq.bcq_from_uniform`), so
RTN/GPTQ layers use the same layout. The 2:4 kernel reads the storage of
:mod:`compress.solvers.sparse24` unchanged.
"""

from __future__ import annotations

import torch

TILE = 128  # inputs per LUT-GEMM tile: 16 packed bytes per row and plane


def bcq_kernel_layout(planes: torch.Tensor, alpha: torch.Tensor, offset: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(planes (q, N, K/8), alpha (q, N, G), offset (N, G)) → (kplanes, alpha_t, offset_t)."""
    q, n, kb = planes.shape
    kt = -(-kb * 8 // TILE)
    padded = torch.zeros(q, n, kt * (TILE // 8), dtype=torch.uint8, device=planes.device)
    padded[:, :, :kb] = planes
    kplanes = padded.reshape(q, n, kt, TILE // 8).permute(0, 2, 1, 3).contiguous()
    return kplanes, alpha.to(torch.float16).transpose(1, 2).contiguous(), offset.to(torch.float32).t().contiguous()


def bcq_storage_layout(kplanes: torch.Tensor, alpha_t: torch.Tensor, offset_t: torch.Tensor, in_features: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Inverse of :func:`bcq_kernel_layout`."""
    q, kt, n, _ = kplanes.shape
    planes = kplanes.permute(0, 2, 1, 3).reshape(q, n, kt * (TILE // 8))[:, :, : in_features // 8].contiguous()
    return planes, alpha_t.transpose(1, 2).contiguous(), offset_t.t().contiguous()


def dense_from_kernel_layout(kplanes: torch.Tensor, alpha_t: torch.Tensor, offset_t: torch.Tensor, in_features: int) -> torch.Tensor:
    """W (N, K) float32 from the kernel layout (the reference the kernel must match)."""
    q, kt, n, _ = kplanes.shape
    k = in_features
    groups = alpha_t.shape[1]
    g = k // groups
    p = kplanes.permute(0, 2, 1, 3).reshape(q, n, kt * (TILE // 8)).to(torch.int32)[..., None]
    bits = ((p >> torch.arange(8, dtype=torch.int32, device=p.device)) & 1).reshape(q, n, -1)[:, :, :k]
    signs = bits.to(torch.float32) * 2 - 1
    a = alpha_t.float().transpose(1, 2).repeat_interleave(g, dim=2)  # (q, N, K)
    w = offset_t.float().t().repeat_interleave(g, dim=1)
    for i in range(q):  # plane by plane, as BCQ.dequantize adds them (bit-identical results)
        w = w + a[i] * signs[i]
    return w
