"""Compressed 2:4 storage: kept values plus 2-bit positions, and exact conversions.

For W (d_out, d_in) with at most 2 non-zeros in every group of 4 consecutive inputs of a row:
- ``values``: (d_out, d_in/2), values[r, 2g] and values[r, 2g+1] are the kept entries of group g
  (positions i0 < i1 within the group);
- ``meta``: uint8 (d_out, d_in/8), one 4-bit code per group, i0 | (i1 << 2); group 2k in the low
  nibble of byte k, group 2k+1 in the high nibble.
A group with fewer than two non-zeros keeps its non-zero positions first, then the lowest free
positions (their values are 0), so the conversion is exact for any weight satisfying the pattern.
"""

from __future__ import annotations

import torch


def pack_24(W: torch.Tensor, keep: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """Dense W (and optionally its keep mask with exactly 2 per group) → (values, meta).
    Raises ValueError if a group has more than two non-zeros (or keep marks other than two)."""
    d_out, d_in = W.shape
    if d_in % 8:
        raise ValueError(f"2:4 storage needs the input dimension divisible by 8, got {d_in}")
    g = W.reshape(d_out, d_in // 4, 4)
    if keep is None:
        nz = g != 0
        if bool((nz.sum(dim=2) > 2).any()):
            raise ValueError("weight violates the 2:4 pattern (a group of 4 has more than 2 non-zeros)")
        # rank positions: non-zeros first, then by position; keep the first two
        order = (~nz).to(torch.int64) * 4 + torch.arange(4)
        pos = torch.sort(order, dim=2).values[:, :, :2] % 4
    else:
        k = keep.reshape(d_out, d_in // 4, 4)
        if bool((k.sum(dim=2) != 2).any()) or bool((g[~k] != 0).any()):
            raise ValueError("mask is not 2:4 or the weight has non-zeros outside it")
        pos = torch.sort((~k).to(torch.int64) * 4 + torch.arange(4), dim=2).values[:, :, :2] % 4
    pos = torch.sort(pos, dim=2).values  # i0 < i1
    values = torch.gather(g, 2, pos).reshape(d_out, d_in // 2)
    code = (pos[:, :, 0] | (pos[:, :, 1] << 2)).to(torch.uint8)  # (d_out, d_in/4)
    meta = (code[:, 0::2] | (code[:, 1::2] << 4)).contiguous()
    return values.contiguous(), meta


def unpack_24(values: torch.Tensor, meta: torch.Tensor) -> torch.Tensor:
    """(values, meta) → dense W (d_out, d_in)."""
    d_out, half = values.shape
    d_in = half * 2
    m = meta.to(torch.int64)
    code = torch.stack([m & 0xF, m >> 4], dim=2).reshape(d_out, d_in // 4)
    pos = torch.stack([code & 0x3, (code >> 2) & 0x3], dim=2)  # (d_out, d_in/4, 2)
    out = torch.zeros(d_out, d_in // 4, 4, dtype=values.dtype, device=values.device)
    out.scatter_(2, pos, values.reshape(d_out, d_in // 4, 2))
    return out.reshape(d_out, d_in)
