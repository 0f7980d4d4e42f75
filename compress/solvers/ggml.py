"""llama.cpp's weight grids (GGML block types) as quantization targets, stored byte for byte.

A GGML type cuts each row of W (d_out, d_in) into blocks along the input dimension (32 values, or
super-blocks of 256 for the k-quants) and stores every block in a fixed number of bytes. The values
each type represents, with c the integer code of a weight and d, dmin float16 numbers of the block:

==========  =====  ============================================================================
type        bits   value of a weight
==========  =====  ============================================================================
q8_0        8      d·(c − 128)                    (blocks of 32; c − 128 stored as int8)
q4_0        4      d·(c − 8)                      (blocks of 32)
q5_0        5      d·(c − 16)                     (blocks of 32)
q4_1        4      d·c + m                        (blocks of 32; m float16)
iq4_nl      4      d·L[c], L the 16 non-uniform levels below (blocks of 32)
q6_k        6      (d·s)·(c − 32)                 (256; 16 sub-blocks of 16, s int8)
q4_k        4      (d·s)·c − (dmin·m)             (256; 8 sub-blocks of 32, s, m 6-bit)
q3_k        3      (d·(s − 32))·(c − 4)           (256; 16 sub-blocks of 16, s 6-bit)
q2_k        2      (d·s)·c − (dmin·m)             (256; 16 sub-blocks of 16, s, m 4-bit)
==========  =====  ============================================================================

Everything is computed in float32 in the order written, which is how the ``gguf`` package's
dequantizer computes it, so :func:`decode` reproduces that dequantizer bit for bit (tested).

Choosing a grid (:func:`grid`): every sub-block gets its own scale (and offset) by a search over
range shrinks that minimizes the squared error, weighted by the input importance (diag of XᵀX) when
given; the k-quants then quantize their sub-block scales and offsets to 6 or 4 bits against one
float16 scale per super-block, exactly as stored. The result is the effective per-sub-block scale S
and offset M in float32 (value ≈ S·L[c] − M), which the GPTQ sweep quantizes against column by column
(:func:`~compress.solvers.gptq.gptq_quantize` with a ``grid``), and the fields :func:`encode` packs.

A width the k-quant super-block does not divide falls back the way llama.cpp's own quantizer does
(:data:`FALLBACK`: q4_k → q5_0, q6_k → q8_0, q3_k and q2_k → iq4_nl).
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch

from .quant import CLIP_GRID

QK_K = 256
#: iq4_nl's levels
IQ4_NL_LEVELS = (-127, -104, -83, -65, -49, -35, -22, -10, 1, 13, 25, 38, 53, 69, 89, 113)


@dataclass(frozen=True)
class GGMLType:
    name: str
    #: the gguf package's GGMLQuantizationType value
    ggml_id: int
    block: int  # values per block
    type_size: int  # bytes per block
    sub: int  # values sharing one effective scale
    bits: int
    #: "zero": S·(c − zero); "affine": S·c − M; "levels": S·L[c]
    form: str
    zero: int = 0

    @property
    def maxq(self) -> int:
        return 2**self.bits - 1

    def levels(self) -> torch.Tensor:
        """The value of each code before scaling: c − zero (zero form), c (affine) or L[c]."""
        if self.form == "levels":
            return torch.tensor(IQ4_NL_LEVELS, dtype=torch.float32)
        return torch.arange(self.maxq + 1, dtype=torch.float32) - (self.zero if self.form == "zero" else 0)

    def row_bytes(self, d_in: int) -> int:
        return d_in // self.block * self.type_size


TYPES: dict[str, GGMLType] = {t.name: t for t in (
    GGMLType("q8_0", 8, 32, 34, 32, 8, "zero", 128),
    GGMLType("q4_0", 2, 32, 18, 32, 4, "zero", 8),
    GGMLType("q5_0", 6, 32, 22, 32, 5, "zero", 16),
    GGMLType("q4_1", 3, 32, 20, 32, 4, "affine"),
    GGMLType("iq4_nl", 20, 32, 18, 32, 4, "levels"),
    GGMLType("q6_k", 14, QK_K, 210, 16, 6, "zero", 32),
    GGMLType("q4_k", 12, QK_K, 144, 32, 4, "affine"),
    GGMLType("q3_k", 11, QK_K, 110, 16, 3, "zero", 4),
    GGMLType("q2_k", 10, QK_K, 84, 16, 2, "affine"),
)}
#: what llama.cpp's quantizer uses for a row length its super-block does not divide
FALLBACK = {"q4_k": "q5_0", "q6_k": "q8_0", "q3_k": "iq4_nl", "q2_k": "iq4_nl"}


def type_for(name: str, d_in: int) -> GGMLType | None:
    """The type a row of length ``d_in`` is stored in for the requested type (with llama.cpp's
    fallback for k-quants), or None when no block of either divides it."""
    t = TYPES[name]
    if d_in % t.block == 0:
        return t
    fb = FALLBACK.get(name)
    if fb is not None and d_in % TYPES[fb].block == 0:
        return TYPES[fb]
    return None


def bits_per_weight(name: str, d_in: int) -> float | None:
    t = type_for(name, d_in)
    return None if t is None else 8 * t.type_size / t.block


@dataclass
class Grid:
    """The effective scale S and offset M (float32, (rows, d_in/sub)) of every sub-block of a matrix,
    and the stored fields :func:`encode` packs (per block, or per super-block for k-quants)."""

    type: GGMLType
    S: torch.Tensor
    M: torch.Tensor
    fields: dict[str, torch.Tensor] = field(default_factory=dict)

    def codes(self, W: torch.Tensor) -> torch.Tensor:
        """Nearest codes of W (rows, d_in) on this grid (round to nearest, no error feedback)."""
        rows, d_in = W.shape
        sub = self.type.sub
        S = self.S.repeat_interleave(sub, dim=1)
        M = self.M.repeat_interleave(sub, dim=1)
        return nearest_codes(W.float(), S, M, self.type)


def nearest_codes(w: torch.Tensor, S: torch.Tensor, M: torch.Tensor, t: GGMLType) -> torch.Tensor:
    """Codes (float, integer-valued) of values w given effective scale S and offset M of the same shape
    (value = S·L[c] − M); where S = 0 every code gives the same value and the zero code is taken."""
    safe = torch.where(S == 0, torch.ones_like(S), S)
    if t.form == "levels":
        L = t.levels()
        q = torch.bucketize((w + M) / safe, (L[1:] + L[:-1]) / 2).float()
    else:
        q = torch.round((w + M) / safe) + (t.zero if t.form == "zero" else 0)
        q = q.clamp(0, t.maxq)
    if t.form == "zero":
        q = torch.where(S == 0, torch.full_like(q, float(t.zero)), q)
    return q


def values(q: torch.Tensor, S: torch.Tensor, M: torch.Tensor, t: GGMLType) -> torch.Tensor:
    """Values of codes q given effective S and M (the sweep's dequantization)."""
    return S * t.levels()[q.long()] - M


def _f16(x: torch.Tensor) -> torch.Tensor:
    return x.to(torch.float16).float()


def _search(X: torch.Tensor, w: torch.Tensor, t: GGMLType, affine: bool, round16: bool) -> tuple[torch.Tensor, torch.Tensor]:
    """Per row of X (N, n): the scale S and offset M (value = S·L[c] − M) of least weighted squared
    error over range shrinks. Zero and level forms map the largest-magnitude value onto either end
    of the code range; the affine form spans [min(x, 0), max(x)] (or [min, max] with ``round16``,
    q4_1's float16 minimum)."""
    L = t.levels()
    best_err = torch.full((X.shape[0],), float("inf"))
    best_S = torch.zeros(X.shape[0])
    best_M = torch.zeros(X.shape[0])
    if affine:
        xmin = X.amin(dim=1)
        if not round16:
            xmin = xmin.clamp(max=0)
        xmax = X.amax(dim=1)
        cands = []
        for p in CLIP_GRID:
            lo, hi = xmin * p, xmax * p
            cands.append(((hi - lo) / t.maxq, -lo))
    else:
        idx = X.abs().argmax(dim=1, keepdim=True)
        m = X.gather(1, idx)[:, 0]
        cands = [(m * p / float(end), torch.zeros_like(m)) for p in CLIP_GRID for end in (L[0], L[-1])]
    for S, M in cands:
        if round16:
            S, M = _f16(S), _f16(-M).neg() if affine else M
        Sx, Mx = S[:, None].expand_as(X), M[:, None].expand_as(X)
        q = nearest_codes(X, Sx, Mx, t)
        err = ((values(q, Sx, Mx, t) - X).square() * w).sum(dim=1)
        better = err < best_err
        best_err = torch.where(better, err, best_err)
        best_S = torch.where(better, S, best_S)
        best_M = torch.where(better, M, best_M)
    return best_S, best_M


def grid(W: torch.Tensor, t: GGMLType, importance: torch.Tensor | None = None) -> Grid:
    """The grid of W (rows, d_in) for type ``t`` (d_in a multiple of its block); ``importance`` (d_in,)
    weights each input column's squared error (diag XᵀX)."""
    W = W.float()
    rows, d_in = W.shape
    wt = torch.ones(d_in) if importance is None else importance.float().clamp_min(0)
    wt = wt + 1e-12 * wt.mean().clamp_min(1e-30)
    n_sub = d_in // t.sub
    X = W.reshape(rows * n_sub, t.sub)
    Wt = wt.reshape(n_sub, t.sub).repeat(rows, 1)
    if t.block == 32:
        S, M = _search(X, Wt, t, affine=t.form == "affine", round16=True)
        S, M = S.reshape(rows, n_sub), M.reshape(rows, n_sub)
        fields = {"d": S.to(torch.float16)}
        if t.form == "affine":
            fields["m"] = (-M).to(torch.float16)
        return Grid(t, S, M, fields)
    S, M = _search(X, Wt, t, affine=t.form == "affine", round16=False)
    S, M = S.reshape(rows * d_in // QK_K, QK_K // t.sub), M.reshape(rows * d_in // QK_K, QK_K // t.sub)
    if t.form == "affine":
        top = 63 if t.name == "q4_k" else 15
        d = _f16(S.amax(dim=1) / top)
        dmin = _f16(M.amax(dim=1) / top)
        sc = torch.round(S / torch.where(d == 0, 1, d)[:, None]).clamp(0, top)
        mn = torch.round(M / torch.where(dmin == 0, 1, dmin)[:, None]).clamp(0, top)
        S_eff = d[:, None] * sc
        M_eff = dmin[:, None] * mn
        fields = {"d": d.to(torch.float16), "dmin": dmin.to(torch.float16), "sc": sc.to(torch.uint8), "m": mn.to(torch.uint8)}
    else:
        lo, hi = (-32, 31) if t.name == "q3_k" else (-128, 127)
        idx = S.abs().argmax(dim=1, keepdim=True)
        smax = S.gather(1, idx)[:, 0]
        d = _f16(smax / float(lo))
        sc = torch.round(S / torch.where(d == 0, 1, d)[:, None]).clamp(lo, hi)
        S_eff = d[:, None] * sc
        M_eff = torch.zeros_like(S_eff)
        fields = {"d": d.to(torch.float16), "sc": sc.to(torch.int16)}
    return Grid(t, S_eff.reshape(rows, n_sub), M_eff.reshape(rows, n_sub), fields)


def _f16_bytes(x: torch.Tensor) -> torch.Tensor:
    """float16 (N,) → (N, 2) uint8, little endian."""
    return x.to(torch.float16).contiguous().view(torch.uint8).reshape(-1, 2)


def _nibbles(q: torch.Tensor) -> torch.Tensor:
    """(N, 32) codes < 16 → (N, 16) bytes: value j in the low nibble of byte j, value j + 16 in its high."""
    return (q[:, :16] | (q[:, 16:] << 4)).to(torch.uint8)


def _bits_planes(q: torch.Tensor, width: int, per_byte: int) -> torch.Tensor:
    """(N, width·per_byte) values of 8/per_byte bits → (N, width) bytes: value s·width + j in bits
    [s·b, (s+1)·b) of byte j (the k-quants' layout within a chunk)."""
    b = 8 // per_byte
    q = q.reshape(q.shape[0], per_byte, width).to(torch.int32)
    out = torch.zeros(q.shape[0], width, dtype=torch.int32)
    for s in range(per_byte):
        out |= q[:, s] << (s * b)
    return out.to(torch.uint8)


def encode(codes: torch.Tensor, g: Grid) -> torch.Tensor:
    """The stored bytes (rows, d_in/block·type_size) uint8 of integer codes (rows, d_in) on grid g."""
    t = g.type
    rows, d_in = codes.shape
    nb = rows * d_in // t.block
    c = codes.reshape(nb, t.block).to(torch.int32)
    f = g.fields
    if t.block == 32:
        d = _f16_bytes(f["d"].reshape(-1))
        if t.name == "q8_0":
            body = [(c - 128).to(torch.int8).view(torch.uint8)]
        elif t.name == "q5_0":
            hb = ((c >> 4) & 1).to(torch.int64) << torch.arange(32)
            qh = hb.sum(dim=1).to(torch.int64)
            qh_bytes = torch.stack([(qh >> (8 * k)) & 0xFF for k in range(4)], dim=1).to(torch.uint8)
            body = [qh_bytes, _nibbles(c & 0xF)]
        elif t.name == "q4_1":
            body = [_f16_bytes(f["m"].reshape(-1)), _nibbles(c)]
        else:  # q4_0, iq4_nl
            body = [_nibbles(c)]
        out = torch.cat([d, *body], dim=1)
    elif t.name == "q4_k":
        sc = f["sc"].reshape(nb, 8).to(torch.int32)
        mn = f["m"].reshape(nb, 8).to(torch.int32)
        scales = torch.cat([
            sc[:, :4] | ((sc[:, 4:] >> 4) << 6),
            mn[:, :4] | ((mn[:, 4:] >> 4) << 6),
            (sc[:, 4:] & 0xF) | ((mn[:, 4:] & 0xF) << 4),
        ], dim=1).to(torch.uint8)
        ch = c.reshape(nb, 4, 2, 32)  # 4 chunks of 64: low nibbles = first 32, high = second 32
        qs = (ch[:, :, 0] | (ch[:, :, 1] << 4)).reshape(nb, 128).to(torch.uint8)
        out = torch.cat([_f16_bytes(f["d"]), _f16_bytes(f["dmin"]), scales, qs], dim=1)
    elif t.name == "q2_k":
        scales = (f["sc"].reshape(nb, 16).to(torch.int32) | (f["m"].reshape(nb, 16).to(torch.int32) << 4)).to(torch.uint8)
        qs = torch.cat([_bits_planes(c[:, k * 128:(k + 1) * 128], 32, 4) for k in range(2)], dim=1)
        out = torch.cat([scales, qs, _f16_bytes(f["d"]), _f16_bytes(f["dmin"])], dim=1)
    elif t.name == "q3_k":
        hmask = _bits_planes(c >> 2, 32, 8)
        qs = torch.cat([_bits_planes(c[:, k * 128:(k + 1) * 128] & 3, 32, 4) for k in range(2)], dim=1)
        s = (f["sc"].reshape(nb, 16).to(torch.int32) + 32)
        low = (s[:, :8] & 0xF) | ((s[:, 8:] & 0xF) << 4)
        high = _bits_planes(s >> 4, 4, 4)
        out = torch.cat([hmask, qs, low.to(torch.uint8), high, _f16_bytes(f["d"])], dim=1)
    elif t.name == "q6_k":
        ql = torch.cat([_bits_planes(c[:, k * 128:(k + 1) * 128] & 0xF, 64, 2) for k in range(2)], dim=1)
        qh = torch.cat([_bits_planes(c[:, k * 128:(k + 1) * 128] >> 4, 32, 4) for k in range(2)], dim=1)
        scales = f["sc"].reshape(nb, 16).to(torch.int8).view(torch.uint8)
        out = torch.cat([ql, qh, scales, _f16_bytes(f["d"])], dim=1)
    else:
        raise ValueError(f"no encoder for {t.name}")
    assert out.shape[1] == t.type_size, (t.name, out.shape)
    return out.reshape(rows, -1).contiguous()


def _f16_from(b: torch.Tensor) -> torch.Tensor:
    """(N, 2) uint8 → (N,) float32 from little-endian float16."""
    return b.contiguous().view(torch.float16)[:, 0].float()


def _unplanes(b: torch.Tensor, per_byte: int) -> torch.Tensor:
    """Inverse of :func:`_bits_planes`: (N, width) bytes → (N, width·per_byte) values."""
    bits = 8 // per_byte
    mask = (1 << bits) - 1
    b = b.to(torch.int32)
    return torch.cat([(b >> (s * bits)) & mask for s in range(per_byte)], dim=1)


def unpack(blocks: torch.Tensor, t: GGMLType, rows: int, d_in: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(codes (rows, d_in) int64, S, M (rows, d_in/sub) float32) from stored bytes; value = S·L[c] − M,
    with S and M computed exactly as the dequantizer computes them."""
    nb = rows * d_in // t.block
    B = blocks.reshape(nb, t.type_size)
    if t.block == 32:
        S = _f16_from(B[:, :2])
        M = torch.zeros_like(S)
        if t.name == "q8_0":
            c = B[:, 2:].contiguous().view(torch.int8).to(torch.int32) + 128
        elif t.name == "q5_0":
            qh = B[:, 2:6].to(torch.int64)
            word = qh[:, 0] | (qh[:, 1] << 8) | (qh[:, 2] << 16) | (qh[:, 3] << 24)
            hi = (word[:, None] >> torch.arange(32)) & 1
            c = _unplanes(B[:, 6:], 2) | (hi.to(torch.int32) << 4)
        elif t.name == "q4_1":
            M = -_f16_from(B[:, 2:4])
            c = _unplanes(B[:, 4:], 2)
        else:
            c = _unplanes(B[:, 2:], 2)
        return c.reshape(rows, d_in).long(), S.reshape(rows, -1), M.reshape(rows, -1)
    if t.name == "q4_k":
        d, dmin = _f16_from(B[:, 0:2]), _f16_from(B[:, 2:4])
        sb = B[:, 4:16].to(torch.int32)
        a, m_, md = sb[:, 0:4], sb[:, 4:8], sb[:, 8:12]
        sc = torch.cat([a & 0x3F, (md & 0x0F) | ((a >> 2) & 0x30)], dim=1)
        mn = torch.cat([m_ & 0x3F, (md >> 4) | ((m_ >> 2) & 0x30)], dim=1)
        c = _unplanes(B[:, 16:].reshape(nb * 4, 32), 2).reshape(nb, QK_K)
        S = d[:, None] * sc.float()
        M = dmin[:, None] * mn.float()
    elif t.name == "q2_k":
        sm = B[:, :16].to(torch.int32)
        c = torch.cat([_unplanes(B[:, 16 + 32 * k:48 + 32 * k], 4) for k in range(2)], dim=1)
        d, dmin = _f16_from(B[:, 80:82]), _f16_from(B[:, 82:84])
        S = d[:, None] * (sm & 0xF).float()
        M = dmin[:, None] * (sm >> 4).float()
    elif t.name == "q3_k":
        hm = _unplanes(B[:, :32], 8)
        low = torch.cat([_unplanes(B[:, 32 + 32 * k:64 + 32 * k], 4) for k in range(2)], dim=1)
        c = low | (hm << 2)
        lb = B[:, 96:104].to(torch.int32)
        lsc = torch.cat([lb & 0xF, lb >> 4], dim=1)
        hsc = _unplanes(B[:, 104:108], 4)
        s = ((lsc | (hsc << 4)) - 32).float()
        S = _f16_from(B[:, 108:110])[:, None] * s
        M = torch.zeros_like(S)
    elif t.name == "q6_k":
        ql = torch.cat([_unplanes(B[:, 64 * k:64 * (k + 1)], 2) for k in range(2)], dim=1)
        qh = torch.cat([_unplanes(B[:, 128 + 32 * k:160 + 32 * k], 4) for k in range(2)], dim=1)
        c = ql | (qh << 4)
        s = B[:, 192:208].contiguous().view(torch.int8).float()
        S = _f16_from(B[:, 208:210])[:, None] * s
        M = torch.zeros_like(S)
    else:
        raise ValueError(f"no decoder for {t.name}")
    return c.reshape(rows, d_in).long(), S.reshape(rows, -1), M.reshape(rows, -1)


def decode(blocks: torch.Tensor, t: GGMLType, rows: int, d_in: int) -> torch.Tensor:
    """The float32 weights (rows, d_in) that stored bytes represent (bit for bit the gguf package's)."""
    c, S, M = unpack(blocks, t, rows, d_in)
    S = S.repeat_interleave(t.sub, dim=1)
    M = M.repeat_interleave(t.sub, dim=1)
    v = t.levels()[c]
    if t.form == "affine":
        return S * v - M
    return S * v


def quantize(W: torch.Tensor, t: GGMLType, importance: torch.Tensor | None = None) -> torch.Tensor:
    """Round-to-nearest bytes of W on type ``t`` (no error feedback)."""
    g = grid(W, t, importance)
    return encode(g.codes(W).long(), g)
