"""Sizes and storage accounting of a dictionary factorization: bits of the support (mask or index
format), of the whole stored form, and the largest (k, s) within a budget."""

from __future__ import annotations

import math
from typing import Callable

#: bits of one row offset of the index support format
CROW_BITS = 32


def index_bits(k: int) -> int:
    """⌈log₂ k⌉ bits per stored atom index (at least 1)."""
    return max(1, math.ceil(math.log2(max(k, 2))))


def support_format(d_out: int, k: int, nnz: int) -> str:
    """'full' (every coefficient kept: nothing to store), 'mask' (a k-bit row mask, d_out·⌈k/8⌉
    bytes) or 'index' (⌈log₂ k⌉ bits per non-zero plus d_out+1 row offsets), whichever stores the
    support of ``nnz`` non-zeros in fewer bits."""
    if nnz == d_out * k:
        return "full"
    return "mask" if d_out * -(-k // 8) * 8 <= nnz * index_bits(k) + (d_out + 1) * CROW_BITS else "index"


def support_bits(d_out: int, k: int, nnz: int) -> int:
    """Bits of the support of ``nnz`` non-zeros in a d_out × k coefficient matrix, as stored."""
    fmt = support_format(d_out, k, nnz)
    if fmt == "full":
        return 0
    if fmt == "mask":
        return d_out * -(-k // 8) * 8
    return -(-nnz * index_bits(k) // 8) * 8 + (d_out + 1) * CROW_BITS


def stored_bits(d_out: int, d_in: int, k: int, nnz: int, elt_bits: int) -> int:
    """Bits of a factorization: dictionary k·d_in and ``nnz`` values of ``elt_bits``, plus the support."""
    return (k * d_in + nnz) * elt_bits + support_bits(d_out, k, nnz)


def dict_shape(d_out: int, d_in: int, ratio: float, rho: float, elt_bits: int) -> tuple[int, int] | None:
    """The largest (k atoms, s non-zeros per row) with s = max(1, round(k/ρ)) ≤ k whose stored bits
    are at most (1 − ratio)·d_out·d_in·elt_bits; None when not even one atom fits."""
    budget = (1.0 - ratio) * d_out * d_in * elt_bits

    def s_of(k: int) -> int:
        return min(k, max(1, round(k / rho)))

    def fits(k: int) -> bool:
        return stored_bits(d_out, d_in, k, d_out * s_of(k), elt_bits) <= budget

    k = largest_fitting(fits, 1, int(budget // (d_in * elt_bits)) + 1)
    return None if k is None else (k, s_of(k))


def largest_fitting(fits: Callable[[int], bool], lo: int, hi: int) -> int | None:
    """The largest k in [lo, hi] with ``fits(k)`` for a ``fits`` true up to some k and false after
    (stored bits grow with the atom count); None when not even ``lo`` fits."""
    if not fits(lo):
        return None
    hi = max(lo, hi)
    while lo < hi:
        mid = (lo + hi + 1) // 2
        if fits(mid):
            lo = mid
        else:
            hi = mid - 1
    return lo
