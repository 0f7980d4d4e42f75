"""The search: one candidate per target under one size budget, by the predicted loss increase.

1. Statistics of the dense model (:mod:`compress.pipeline.gradients`): input Grams and output-gradient
   second moments, one streamed backward pass.
2. Per target and candidate: the stored bits (the passes' own accounting) and the predicted increase
   of the calibration loss, ½·Σᵢ E[gᵢ²]·(ΔW H ΔWᵀ)ᵢᵢ, from the candidate's cheap estimate of Ŵ.
3. A multiple-choice knapsack (:func:`compress.solvers.allocate.knapsack`) picks one candidate per
   target, minimizing the summed prediction within the budget.
4. The choice becomes a recipe: one step per distinct candidate, narrowed with layer-qualified
   ``targets=`` ('3.mlp.down_proj|5-7.self_attn.q_proj'); the engine then runs it like any recipe,
   layer by layer, each layer calibrated on the compressed layers below it.
"""

from __future__ import annotations

import time
from collections import Counter
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import nn

from ..adapters.base import ModelAdapter
from ..errors import ConfigError
from ..passes.targeting import layer_indexed_name, split_index
from ..pipeline.gradients import SensitivityStats, sensitivity_statistics
from ..recipe import Recipe, parse_shorthand
from ..solvers.allocate import knapsack
from .candidates import Candidate

BUDGET_KINDS = ("bits", "size", "params")
#: candidates above this multiple of the budget's bits per weight are left out (their estimate costs
#: time and a knapsack at that budget does not pick them: see bench/results/budget.md)
REACH = 4.0


@dataclass(frozen=True)
class Budget:
    """``bits=3.0``: stored bits per weight of the target linears; ``size=0.5``: that fraction of their
    dense bytes; ``params=0.75``: that fraction of their parameters (structured candidates only)."""

    kind: str
    value: float

    @classmethod
    def parse(cls, text: str) -> "Budget":
        kind, eq, value = text.strip().partition("=")
        kind = kind.strip()
        if not eq or kind not in BUDGET_KINDS:
            raise ConfigError(f"--budget '{text}' is not KIND=VALUE with KIND one of {', '.join(BUDGET_KINDS)} "
                              "(e.g. --budget bits=3.0, --budget size=0.5, --budget params=0.75)")
        try:
            v = float(value)
        except ValueError:
            raise ConfigError(f"--budget {kind}= needs a number, got '{value.strip()}' (e.g. --budget {kind}={3.0 if kind == 'bits' else 0.5})") from None
        if not v > 0 or v != v:
            raise ConfigError(f"--budget {kind}={value.strip()} must be positive")
        return cls(kind, v)

    @property
    def structured(self) -> bool:
        return self.kind == "params"

    def __str__(self) -> str:
        return f"{self.kind}={self.value:g}"


@dataclass(frozen=True)
class Choice:
    name: str
    candidate: Candidate
    bits: int
    weights: int
    predicted: float


@dataclass
class SearchResult:
    budget: Budget
    choices: list[Choice]
    recipe: Recipe
    loss: float
    seconds: dict[str, float] = field(default_factory=dict)

    @property
    def bits_per_weight(self) -> float:
        return sum(c.bits for c in self.choices) / sum(c.weights for c in self.choices)

    def histogram(self) -> dict[str, int]:
        return dict(Counter(c.candidate.label for c in self.choices).most_common())

    def to_dict(self) -> dict[str, Any]:
        return {
            "budget": str(self.budget), "bits_per_weight": round(self.bits_per_weight, 4), "dense_loss": self.loss,
            "predicted_increase": sum(c.predicted for c in self.choices), "histogram": self.histogram(),
            "seconds": {k: round(v, 2) for k, v in self.seconds.items()},
            "targets": [{"name": c.name, "choice": c.candidate.label, "bits": c.bits, "bits_per_weight": round(c.bits / c.weights, 4),
                         "predicted": c.predicted} for c in self.choices],
        }

    def lines(self, layers_path: str) -> list[str]:
        """The choice as text: the histogram, then a layers × linears map (candidate keys in each cell)."""
        keys = {label: chr(ord("A") + i) if i < 26 else str(i) for i, label in enumerate(self.histogram())}
        out = [f"search: {self.budget} → {self.bits_per_weight:.3f} bits per weight over {len(self.choices)} targets, "
               f"predicted loss increase {sum(c.predicted for c in self.choices):.4f} nats/token (dense {self.loss:.4f})"]
        out += [f"  {keys[label]}  {n:4d} × {label}" for label, n in self.histogram().items()]
        grid: dict[int, dict[str, str]] = {}
        for c in self.choices:
            i, rel = split_index(layer_indexed_name(c.name, layers_path))
            grid.setdefault(i if i is not None else -1, {})[rel] = keys[c.candidate.label]
        cols = list(dict.fromkeys(r for row in grid.values() for r in row))
        out.append("  layer  " + " ".join(c.rsplit(".", 1)[-1][:6].ljust(6) for c in cols))
        out += [f"  {i:5d}  " + " ".join(grid[i].get(c, "-").ljust(6) for c in cols) for i in sorted(grid)]
        return out


def relative_error(W: torch.Tensor, W_hat: torch.Tensor, st: Any) -> float:
    """The per-matrix proxy the allocators used before: tr(ΔW H ΔWᵀ) / tr(W H Wᵀ)."""
    d = (W_hat.float() - W.float())
    return float(((d @ st.gram) * d).sum() / ((W.float() @ st.gram) * W.float()).sum().clamp_min(1e-30))


def target_weights(model: nn.Module, adapter: ModelAdapter) -> dict[str, torch.Tensor]:
    """The weight of every target linear of the decoder layers, by full name."""
    out: dict[str, torch.Tensor] = {}
    for i, layer in enumerate(adapter.layers(model)):
        for g in adapter.groups(layer):
            for n in g:
                w = layer.get_submodule(n).weight
                assert isinstance(w, torch.Tensor)
                out[f"{adapter.layers_path}.{i}.{n}"] = w
    return out


def cost_tables(model: nn.Module, adapter: ModelAdapter, budget: Budget, candidates: list[Candidate]) -> dict[str, list[tuple[int, Candidate]]]:
    """Per target, the candidates that accept its shape with their cost (stored bits; parameters for a
    params= budget) and the target's dense cost first; candidates above :data:`REACH` × the budget
    per weight are left out. Refuses a budget at or above dense, or below the
    cheapest plan, in one line."""
    dtype = next((t.dtype for t in model.parameters() if t.is_floating_point()), torch.float32)
    elt = torch.finfo(dtype).bits
    memo: dict[tuple[str, int, int], int | None] = {}
    # a candidate storing more than REACH × the budget per weight on a target is not considered there
    reach = REACH * (budget.value / elt if budget.kind == "bits" else budget.value) if not budget.structured else 1.0
    tables: dict[str, list[tuple[int, Candidate]]] = {}
    least = 0  # the cheapest plan of every candidate (those beyond the reach included), for the refusal
    for name, w in target_weights(model, adapter).items():
        d_out, d_in = w.shape
        row = []
        cheapest = None
        for c in candidates:
            key = (c.label, d_out, d_in)
            if key not in memo:
                memo[key] = c.stored_bits(d_out, d_in, dtype)
            bits = memo[key]
            if bits is None:
                continue
            cost = bits // elt if budget.structured else bits
            cheapest = cost if cheapest is None else min(cheapest, cost)
            if c.steps and bits > min(1.0, reach) * d_out * d_in * elt:
                continue
            row.append((cost, c))
        tables[name] = row
        least += cheapest if cheapest is not None else 0
    dense = sum(t[0][0] for t in tables.values())
    weights = sum(w.numel() for w in target_weights(model, adapter).values())
    limit = _limit(budget, dense, weights, elt)
    unit = "parameters" if budget.structured else "bits"
    if limit >= dense:
        raise ConfigError(f"--budget {budget} is at or above the dense model ({_as_budget(budget, dense, dense, weights, elt)}): "
                          "nothing to compress; lower the budget")
    if least <= limit:  # reachable by every candidate; the ones kept (within the reach) must reach it too
        least = sum(min(c for c, _ in row) for row in tables.values())
    if least > limit:
        raise ConfigError(f"--budget {budget} is below the cheapest plan these candidates reach "
                          f"({_as_budget(budget, least, dense, weights, elt)}, {least:,} {unit}); raise it to at least that, or add cheaper candidates with --search")
    return tables


def _limit(budget: Budget, dense: int, weights: int, elt: int) -> float:
    if budget.kind == "bits":
        return budget.value * weights
    return budget.value * dense


def _as_budget(budget: Budget, cost: float, dense: int, weights: int, elt: int) -> str:
    if budget.kind == "bits":
        return f"bits={cost / weights:.4g}"
    return f"{budget.kind}={cost / dense:.4g}"


def search(model: nn.Module, adapter: ModelAdapter, input_ids: torch.Tensor, budget: Budget, candidates: list[Candidate], *,
           device: torch.device, batch_size: int, stats: SensitivityStats | None = None) -> SearchResult:
    """Choose one candidate per target within ``budget`` (see the module docstring)."""
    tables = cost_tables(model, adapter, budget, candidates)
    t0 = time.perf_counter()
    stats = stats or sensitivity_statistics(model, adapter, input_ids, device=device, batch_size=batch_size)
    seconds = {"statistics": time.perf_counter() - t0}
    t0 = time.perf_counter()
    mods = target_weights(model, adapter)
    options: list[list[tuple[int, float]]] = []
    for name, row in tables.items():
        W = mods[name].detach().float()
        st = stats.targets[name]
        options.append([(cost, c.predict(W, st)) for cost, c in row])
    seconds["candidates"] = time.perf_counter() - t0
    t0 = time.perf_counter()
    dense = sum(t[0][0] for t in tables.values())
    weights = sum(w.numel() for w in mods.values())
    elt = torch.finfo(next(iter(mods.values())).dtype).bits
    picks = knapsack(options, _limit(budget, dense, weights, elt))
    seconds["knapsack"] = time.perf_counter() - t0
    choices = []
    for (name, row), opts, j in zip(tables.items(), options, picks):
        cand = row[j][1]
        w = mods[name]
        n = w.numel()
        bits = cand.stored_bits(int(w.shape[0]), int(w.shape[1]), w.dtype) if cand.steps else n * elt
        choices.append(Choice(name, cand, int(bits or 0), n, opts[j][1]))
    return SearchResult(budget, choices, recipe_of(choices, adapter.layers_path), stats.loss, seconds)


def recipe_of(choices: list[Choice], layers_path: str) -> Recipe:
    """The recipe that applies each target's candidate: every step of a candidate narrowed to its
    targets; first steps before quantization steps, so a candidate's own order holds."""
    by: dict[str, list[str]] = {}
    cands: dict[str, Candidate] = {}
    for c in choices:
        if c.candidate.steps:
            by.setdefault(c.candidate.label, []).append(layer_indexed_name(c.name, layers_path))
            cands[c.candidate.label] = c.candidate
    depth = max((len(c.steps) for c in cands.values()), default=0)
    specs = []
    for k in range(depth):  # step k of every candidate, counted from its last step
        for label, cand in cands.items():
            i = len(cand.steps) - depth + k
            if i >= 0:
                specs.append(parse_shorthand(f"{cand.steps[i]},targets={_compact(by[label])}"))
    if not specs:
        raise ConfigError("the search kept every target dense: lower the budget")
    return Recipe(specs)


def _compact(names: list[str]) -> str:
    """'0.mlp.up_proj', '1.mlp.up_proj', '2.mlp.up_proj', '5.mlp.up_proj' → '0-2.mlp.up_proj|5.mlp.up_proj'."""
    by: dict[str, list[int]] = {}
    for n in names:
        i, rel = split_index(n)
        by.setdefault(rel, []).append(int(i or 0))
    parts = []
    for rel, idx in by.items():
        idx.sort()
        start = prev = idx[0]
        for i in [*idx[1:], None]:
            if i is not None and i == prev + 1:
                prev = i
                continue
            parts.append(f"{start}.{rel}" if start == prev else f"{start}-{prev}.{rel}")
            if i is not None:
                start = prev = i
    return "|".join(parts)
