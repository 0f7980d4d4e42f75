"""Dense bit packing of small unsigned integers (1–8 bits), 3-bit included (no 4-bit slots).

Layout: the values, in the given order, form one little-endian bit stream: value k occupies bits
[k·b, (k+1)·b) of the stream, least significant bit first; stream bit t is bit (t mod 8) of byte
⌊t/8⌋. Every 8 values fill exactly b bytes, so the stream is processed in blocks of 8 values;
the last block is zero-padded. ``packed_nbytes(n, b) = ceil(n/8)·b``.
"""

from __future__ import annotations

import torch


def packed_nbytes(n: int, bits: int) -> int:
    return -(-n // 8) * bits


def pack_bits(values: torch.Tensor, bits: int) -> torch.Tensor:
    """Pack a flat tensor of integers in [0, 2^bits) into uint8 bytes."""
    if not 1 <= bits <= 8:
        raise ValueError(f"bits must be in 1..8, got {bits}")
    v = values.reshape(-1).to(torch.int64)
    if v.numel() and (int(v.min()) < 0 or int(v.max()) >= 2**bits):
        raise ValueError(f"values out of range for {bits} bits")
    pad = (-v.numel()) % 8
    if pad:
        v = torch.cat([v, v.new_zeros(pad)])
    blocks = v.view(-1, 8)  # 8 values → bits bytes
    shifts = torch.arange(8, dtype=torch.int64, device=v.device) * bits
    word = (blocks << shifts).sum(dim=1)  # up to 64 bits
    byte_shifts = torch.arange(bits, dtype=torch.int64, device=v.device) * 8
    out = (word[:, None] >> byte_shifts) & 0xFF
    return out.to(torch.uint8).reshape(-1)


def unpack_bits(packed: torch.Tensor, bits: int, n: int) -> torch.Tensor:
    """Inverse of :func:`pack_bits`: the first ``n`` values, as uint8."""
    b = packed.reshape(-1, bits).to(torch.int64)
    byte_shifts = torch.arange(bits, dtype=torch.int64, device=packed.device) * 8
    word = (b << byte_shifts).sum(dim=1)
    shifts = torch.arange(8, dtype=torch.int64, device=packed.device) * bits
    vals = (word[:, None] >> shifts) & (2**bits - 1)
    return vals.reshape(-1)[:n].to(torch.uint8)


_BIT_WEIGHTS = 2 ** torch.arange(8, dtype=torch.int32)


def pack_signs(signs: torch.Tensor) -> torch.Tensor:
    """bool (..., d_in) → uint8 (..., d_in/8), LSB first (BCQ's binary planes)."""
    s = signs.reshape(*signs.shape[:-1], -1, 8).to(torch.int32)
    return (s * _BIT_WEIGHTS.to(s.device)).sum(dim=-1).to(torch.uint8)


def unpack_signs(packed: torch.Tensor) -> torch.Tensor:
    """uint8 (..., d_in/8) → bool (..., d_in)."""
    p = packed.to(torch.int32)[..., None]
    bits = (p >> torch.arange(8, dtype=torch.int32, device=p.device)) & 1
    return bits.reshape(*packed.shape[:-1], -1).bool()


def pack_uint(values: torch.Tensor, bits: int) -> torch.Tensor:
    """Pack a flat tensor of integers in [0, 2^bits) (any width up to 31 bits) into uint8 bytes as
    one little-endian bit stream (value i occupies stream bits [i·bits, (i+1)·bits), LSB first)."""
    if not 1 <= bits <= 31:
        raise ValueError(f"bits must be in 1..31, got {bits}")
    v = values.reshape(-1).to(torch.int64)
    if v.numel() and (int(v.min()) < 0 or int(v.max()) >= 2**bits):
        raise ValueError(f"values out of range for {bits} bits")
    stream = ((v[:, None] >> torch.arange(bits, device=v.device)) & 1).reshape(-1).bool()
    pad = (-stream.numel()) % 8
    if pad:
        stream = torch.cat([stream, stream.new_zeros(pad)])
    return pack_signs(stream)


def unpack_uint(packed: torch.Tensor, bits: int, n: int) -> torch.Tensor:
    """Inverse of :func:`pack_uint`: the first ``n`` values, as int64."""
    stream = unpack_signs(packed.reshape(-1))[: n * bits].reshape(n, bits).to(torch.int64)
    return (stream << torch.arange(bits, device=packed.device)).sum(1)
