"""All budget math: how a total size is split among targets.

- :func:`knapsack`: one option per target (stored bits or parameters, error), minimum summed error
  within a budget; dynamic programming over the budget in ``resolution`` units: every option's cost
  is rounded *up* to whole units, so the chosen options meet the budget for certain, and the budget
  is filled to within one unit per target (resolution 2¹⁶: 0.0015 % of the budget per target).
  CoSpaDi's ``allocate=global`` and MoDeGPT's ``allocate=knapsack``.
- :func:`integer_program`: the same choice solved exactly as a mixed-integer program (SciPy's
  HiGHS), for problems with many options per target (LQ-LoRA's ``budget=``).
- :func:`allocate_ranks`: LoRD's greedy rank allocation on relative singular-value energy.
- :func:`allocate_sparsity`: MoDeGPT's per-layer sparsity from block-influence scores.
- :func:`fraction_budget`: a budget given as a fraction of the dense total.
"""

from __future__ import annotations

from typing import Mapping, Sequence, TypeVar

import torch

from .linalg import SOLVE_DTYPE
from .lowrank import saves_parameters

T = TypeVar("T")


def fraction_budget(dense_total: float, keep: float) -> float:
    """The budget that keeps the fraction ``keep`` of a dense total (bits or parameters)."""
    return keep * dense_total


def allocate_fraction(tables: Mapping[str, Sequence[tuple[int, float, T]]], keep: float) -> tuple[dict[str, T], float]:
    """One option per target by :func:`knapsack`, from per-target tables of (cost, error, choice) whose
    first option is the target's dense weight: the budget is ``keep`` of the dense total. Returns the
    choice per target and the fraction of the dense total the choices use."""
    names = list(tables)
    dense_total = sum(tables[n][0][0] for n in names)  # option 0: kept dense
    picks = knapsack([[(b, e) for b, e, _ in tables[n]] for n in names], fraction_budget(dense_total, keep))
    used = sum(tables[n][j][0] for n, j in zip(names, picks))
    return {n: tables[n][j][2] for n, j in zip(names, picks)}, used / dense_total


def knapsack(options: list[list[tuple[int, float]]], budget: float, resolution: int = 1 << 16) -> list[int]:
    """Indices of the chosen option per item: minimum Σ error subject to Σ bits ≤ ``budget``.

    Raises ValueError when even the cheapest option of every item exceeds the budget."""
    if budget <= 0:
        raise ValueError("the budget must be positive")
    unit = budget / resolution
    R = resolution
    dp = torch.zeros(R + 1, dtype=torch.float64)  # least error of the items so far within b units
    choices: list[torch.Tensor] = []
    for opts in options:
        if not opts:
            raise ValueError("an item has no options")
        # every option of the item at once: row j is dp shifted by its cost plus its error
        cand = torch.full((len(opts), R + 1), float("inf"), dtype=torch.float64)
        for j, (bits, err) in enumerate(opts):
            w = int(-(-bits // unit)) if bits > 0 else 0
            if w <= R:
                cand[j, w:] = dp[: R + 1 - w] + float(err)
        dp, pick = cand.min(dim=0)  # ties go to the earlier option
        choices.append(pick.to(torch.int16 if len(opts) < 32000 else torch.int32))
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


def integer_program(errors: list[list[float]], costs: list[list[float]], budget: float) -> list[int]:
    """Choose one option per matrix (index into its lists) minimizing Σ error with Σ cost ≤ budget.

    Raises ValueError naming the smallest reachable total cost when the budget is below it."""
    import numpy as np
    from scipy.optimize import Bounds, LinearConstraint, milp

    n_opts = [len(e) for e in errors]
    c = np.concatenate([np.asarray(e, dtype=float) for e in errors])
    cost = np.concatenate([np.asarray(k, dtype=float) for k in costs])
    minimum = float(sum(min(k) for k in costs))
    if minimum > budget * (1 + 1e-12):
        raise ValueError(f"budget {budget:.6g} is below the smallest reachable cost {minimum:.6g}")
    n = len(c)
    rows = np.zeros((len(errors), n))
    start = 0
    for i, k in enumerate(n_opts):
        rows[i, start : start + k] = 1.0
        start += k
    # scale errors so the objective is well conditioned for the solver
    scale = float(np.abs(c).max()) or 1.0
    res = milp(
        c / scale,
        constraints=[LinearConstraint(rows, 1, 1), LinearConstraint(cost[None, :], -np.inf, budget)],
        integrality=np.ones(n),
        bounds=Bounds(0, 1),
        options={"time_limit": 120},
    )
    if res.x is None:
        raise ValueError(f"the integer program found no allocation within the budget ({res.message})")
    x = np.round(res.x).astype(int)
    out, start = [], 0
    for k in n_opts:
        out.append(int(np.argmax(x[start : start + k])))
        start += k
    return out


def allocate_ranks(
    spectra: list[torch.Tensor], shapes: list[tuple[int, int]], budget: float
) -> list[int | None]:
    """Global rank allocation under a parameter budget (LoRD's one-shot budgeted ranks).

    Each layer l with singular values σ (descending) and shape (m, n) gains σ_i²/‖W_l‖²_F of
    relative energy per kept direction at a cost of m + n parameters. Directions are taken
    greedily by gain per parameter until the total parameter count reaches ``budget``; a layer
    whose rank reaches the break-even point (factors no smaller than the dense matrix) is kept
    dense. Returns a rank per layer, or None for layers kept dense.
    """
    import heapq

    dense = [False] * len(spectra)
    energy = [float(s.double().square().sum().clamp_min(1e-300)) for s in spectra]
    # every layer keeps at least rank 1
    ranks = [1] * len(spectra)
    used = float(sum(m + n for m, n in shapes))
    heap: list[tuple[float, int]] = []
    for li, (s, (m, n)) in enumerate(zip(spectra, shapes)):
        if len(s) > 1:
            heapq.heappush(heap, (-float(s[1]) ** 2 / energy[li] / (m + n), li))
    while heap:
        _, li = heapq.heappop(heap)
        m, n = shapes[li]
        if used + (m + n) > budget:
            continue
        ranks[li] += 1
        used += m + n
        if not saves_parameters(m, n, ranks[li]):
            # break-even: the dense matrix costs no more than these factors
            used += m * n - ranks[li] * (m + n)
            dense[li] = True
            continue
        nxt = ranks[li]
        if nxt < len(spectra[li]):
            heapq.heappush(heap, (-float(spectra[li][nxt]) ** 2 / energy[li] / (m + n), li))
    return [None if d else r for r, d in zip(ranks, dense)]


def allocate_sparsity(influence: list[float], ratio: float, temperature: float, cap: float) -> list[float]:
    """Per-layer sparsity φ = L·ratio·softmax(−s/ε) (a layer that changes its input less loses more),
    capped at ``cap`` with the excess handed to the uncapped layers in proportion to their weights.
    The mean of the result is ``ratio`` unless every layer is capped (then ``cap``)."""
    s = torch.tensor(influence, dtype=SOLVE_DTYPE)
    w = torch.softmax(-s / temperature, dim=0)
    phi = w * len(influence) * ratio
    capped = torch.zeros_like(phi, dtype=torch.bool)
    while True:
        over = (phi > cap + 1e-12) & ~capped
        if not over.any():
            break
        capped |= over
        excess = float((phi[capped] - cap).sum())
        phi[capped] = cap
        free = ~capped
        if not free.any():
            break
        phi[free] += excess * w[free] / w[free].sum()
    return [float(x) for x in phi.clamp(0.0, cap)]
