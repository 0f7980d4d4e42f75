"""The grid of a sweep: its points (a pass and its options), built from varying one option of a pass,
and the points one shard of it runs."""

from __future__ import annotations

import re
from dataclasses import dataclass
from typing import Any

from ..errors import CompressError
from ..recipe import make_pass


@dataclass
class GridPoint:
    method: str
    options: dict[str, Any]

    @property
    def label(self) -> str:
        opts = ",".join(f"{k}={v}" for k, v in self.options.items())
        return f"{self.method}:{opts}" if opts else self.method


def make_grid(axes: list[tuple[str, dict[str, Any], str, list[Any]]]) -> list[GridPoint]:
    """[(pass, base options, varying key, values)] → grid points (each validated)."""
    points: list[GridPoint] = []
    for method, base, key, values in axes:
        if not values:
            raise CompressError(f"empty list of values for '{key}' of pass '{method}'; example: --ratios 0.1,0.2")
        for v in values:
            opts = {**base, key: v}
            make_pass(method, opts)  # validate now, not in the middle of the sweep
            points.append(GridPoint(method, opts))
    return points


def parse_shard(text: str) -> tuple[int, int]:
    """``"i/n"`` (1 <= i <= n) → (i, n); anything else is a one-line :class:`CompressError`."""
    m = re.fullmatch(r"\s*(\d+)\s*/\s*(\d+)\s*", text or "")
    if m is None or not 1 <= int(m.group(1)) <= int(m.group(2)):
        raise CompressError(f"--shard expects i/n with 1 <= i <= n (e.g. --shard 1/2), got '{text}'")
    return int(m.group(1)), int(m.group(2))


def shard_points(grid: list[GridPoint], shard: tuple[int, int] | None) -> list[GridPoint]:
    """The points of ``grid`` that shard (i, n) runs: those at index k with k % n == i - 1."""
    if shard is None:
        return list(grid)
    ok = isinstance(shard, (tuple, list)) and len(shard) == 2 and all(isinstance(v, int) and not isinstance(v, bool) for v in shard)
    if not ok or not 1 <= shard[0] <= shard[1]:
        raise CompressError(f"shard expects (i, n) with 1 <= i <= n (1-based), got {shard!r}")
    i, n = shard
    return [p for k, p in enumerate(grid) if k % n == i - 1]
