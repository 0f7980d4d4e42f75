"""Budgeted choice of one compression option per target: a multiple-choice knapsack.

Each target offers options (stored bits, error); :func:`knapsack` picks one per target minimizing
the summed error with the summed bits within a budget. Used by CoSpaDi's ``allocate=global`` and
written for any pass with per-target candidates (low-rank ranks, MoDeGPT's per-layer sparsity).

Dynamic programming over the budget in ``resolution`` units: every option's bits are rounded *up*
to whole units, so the chosen options meet the budget for certain, and the budget is filled to
within one unit per target (resolution 2¹⁶: 0.0015 % of the budget per target).
"""

from __future__ import annotations

import torch


def knapsack(options: list[list[tuple[int, float]]], budget: float, resolution: int = 1 << 16) -> list[int]:
    """Indices of the chosen option per item: minimum Σ error subject to Σ bits ≤ ``budget``.

    Raises ValueError when even the cheapest option of every item exceeds the budget."""
    if budget <= 0:
        raise ValueError("the budget must be positive")
    unit = budget / resolution
    R = resolution
    dp = torch.zeros(R + 1, dtype=torch.float64)  # least error of the items so far within b units
    inf = torch.tensor(float("inf"), dtype=torch.float64)
    choices: list[torch.Tensor] = []
    for opts in options:
        if not opts:
            raise ValueError("an item has no options")
        best = torch.full((R + 1,), float("inf"), dtype=torch.float64)
        pick = torch.full((R + 1,), -1, dtype=torch.int16 if len(opts) < 32000 else torch.int32)
        for j, (bits, err) in enumerate(opts):
            w = int(-(-bits // unit)) if bits > 0 else 0
            if w > R:
                continue
            cand = torch.full((R + 1,), float("inf"), dtype=torch.float64)
            cand[w:] = dp[: R + 1 - w] + float(err)
            better = cand < best
            best = torch.where(better, cand, best)
            pick = torch.where(better, torch.tensor(j, dtype=pick.dtype), pick)
        dp = torch.where(torch.isfinite(best), best, inf)
        choices.append(pick)
    if not torch.isfinite(dp[R]):
        raise ValueError("no choice of options fits the budget")
    out: list[int] = []
    b = R
    for opts, pick in zip(reversed(options), reversed(choices)):
        j = int(pick[b])
        out.append(j)
        bits = opts[j][0]
        b -= int(-(-bits // unit)) if bits > 0 else 0
    return out[::-1]
