"""CoSpaDi: calibration-guided sparse dictionary learning (arXiv 2509.22075), with ROCKET's closed
form (arXiv 2602.11008). Each target W (d_out × d_in) becomes a :class:`~compress.modules.DictLinear`:
k atoms A (k × d_in) and coefficients C (d_out × k) with s non-zeros per row, fitted in the space
whitened by the Cholesky factor of the layer's input Gram (the output error on the calibration inputs).

Size: ``ratio`` is the fraction of the target's *stored bits* removed (dictionary + values + the
support, a packed mask or packed indices, whichever is smaller), as SVD-LLM's ratio for its factors,
so the two compare at equal stored size. k and s follow from ``ratio`` and ``rho`` = k/s (by default
2 for K-SVD, the paper's, and 2.5 for the closed form), or from ``nonzeros`` = s.

Options:

- ``solver=closed-form`` (ROCKET; the default: K-SVD did not finish SmolLM2-135M in 35 minutes on this
  CPU): eigenbasis, importance-scored sparsification, a least-squares refit of the atoms, then
  ``refits`` rounds of coefficient (conjugate gradients) and atom refits and ``reselect`` rounds of
  support reselection (hard-thresholding pursuit), each step kept only if it lowers the error (ROCKET
  refines by 100 Adam steps on a fixed support). ``solver=ksvd`` (the paper): K-SVD with batched OMP,
  ``iters`` iterations at most, dictionary from the top singular vectors (``init=svd``) or random rows
  (``init=data``); its cost grows with d_out·s·k² per iteration (bench/results/layer_cost.md), and a
  target wider than :data:`KSVD_PRACTICAL_WIDTH` is announced at planning.
- Quantizing afterwards (``--pass gptq:bits=4``) quantizes the atoms with the layer's input Gram and
  the coefficient values in groups; a shared dictionary is quantized per layer.
- ``share=n``: one dictionary per projection type for each group of n consecutive layers, fitted on
  the stacked weights whitened by the group's summed Gram (from one profiling forward before the
  loop, so it exists when the group's first layer is compressed); each layer's coefficients are
  fitted in its own whitened space.
- ``allocate=global``: per-target ratios (0.05–0.90, at the pass's rho) by a multiple-choice knapsack
  over predicted loss increases under the targets' total stored bits (:mod:`compress.solvers.allocate`):
  each candidate's relative whitened error (the closed form's first step; it misranks rho, so rho is
  not allocated) times the target's loss sensitivity (:mod:`compress.pipeline.gradients`).

Example recipe::

    passes:
      - pass: cospadi
        ratio: 0.2
        solver: closed-form
"""

from __future__ import annotations

import logging
import zlib
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn

from ..config import PassConfig, option, targets_option
from ..dtypes import element_bits
from ..errors import ConfigError
from ..modules.dictionary import DictLinear
from ..pipeline.stats import SENSITIVITY, LinearStats
from ..registry import register_pass
from ..solvers.allocate import allocate_fraction
from ..solvers.dictionary import (
    code_with_dictionary,
    dict_shape,
    dict_work,
    factorize_dict,
    first_step_errors,
    largest_fitting,
    support_bits,
)
from ..solvers.dictionary import (
    stored_bits as dict_bits,
)
from ..solvers.linalg import SOLVE_DTYPE, cholesky_psd
from ..solvers.lowrank import rank_for_ratio
from ..solvers.metrics import predicted_increase, relative_output_error
from .base import Capabilities, LayerContext, LinearPass, PassPlan, PassResult, Shapes, Site, Stored, dense_bits, layer_relative_name

logger = logging.getLogger(__name__)

#: widest layer (max of d_out, d_in) K-SVD is practical on (one 576/1536 layer took 445 forwards of itself on
#: this CPU, bench/results/layer_cost.md); a wider target warns at planning
KSVD_PRACTICAL_WIDTH = 512


@dataclass
class CoSpaDiConfig(PassConfig):
    ratio: float = option(
        0.2, "fraction of each target's stored bits removed (dictionary + values + support)", min=0.0, max=1.0, min_open=True, max_open=True
    )
    solver: str = option("closed-form", "closed-form (ROCKET's eigenbasis, support selection and refits; the default since K-SVD "
                         "does not finish a 135M model in 35 minutes on a CPU) or ksvd (K-SVD + OMP, the paper; small layers)",
                         choices=("closed-form", "ksvd"))
    rho: float = option(
        0.0, "atoms per non-zero coefficient k/s (1 = low rank); 0: 2 for ksvd (the paper's), 2.5 for closed-form (measured)", min=0.0, max=64.0
    )
    nonzeros: int = option(0, "non-zero coefficients per output row s (0: from rho)", min=0)
    iters: int = option(10, "K-SVD iterations at most (the paper uses 60)", min=1, max=1000)
    init: str = option("svd", "K-SVD dictionary init: svd (top singular vectors) or data (random rows)", choices=("svd", "data"))
    refits: int = option(4, "closed-form: rounds of coefficient (conjugate gradients) and atom (Cholesky) refits on the fixed support", min=0, max=100)
    reselect: int = option(4, "closed-form: rounds of support reselection from least-squares codes (hard-thresholding pursuit), each refitted", min=0, max=100)
    share: int = option(1, "one dictionary per projection for groups of this many consecutive layers", min=1)
    allocate: str = option("uniform", "uniform (every target at ratio) or global (knapsack over per-target candidates)", choices=("uniform", "global"))
    seed: int = option(0, "seed of K-SVD's random choices")
    targets: str = targets_option()


@register_pass
class CoSpaDiPass(LinearPass[CoSpaDiConfig]):
    """Sparse dictionary learning in the whitened space."""

    name = "cospadi"
    accepts_reason = "it factorizes dense weights"

    def __init__(self, config: CoSpaDiConfig) -> None:
        super().__init__(config)
        if 0.0 < config.rho < 1.0:
            raise ConfigError(f"cospadi: rho={config.rho} would keep more non-zeros than atoms; use rho >= 1 (1 is plain low rank)")
        self.rho = config.rho or DEFAULT_RHO[config.solver]

    def capabilities(self) -> Capabilities:
        c = self.config
        profile = frozenset({"gram"}) if c.share > 1 else frozenset()
        if c.allocate == "global":  # the knapsack weighs each target's error by how much the loss depends on it
            profile = frozenset({"gram", SENSITIVITY})
        # every sub-group's Gram from one forward of the layer (as GPTQ's default), not one forward per sub-group
        return Capabilities(requires_calibration=True, statistics=frozenset({"gram"}), profile=profile, observe_once=True)

    def produces(self, kinds: frozenset[str]) -> frozenset[str]:
        return frozenset({"DictLinear", "Linear"})  # a target too small to gain is kept dense

    # -- sizes -----------------------------------------------------------------------------------

    def shape_for(self, d_out: int, d_in: int, elt_bits: int, ratio: float | None = None, rho: float | None = None) -> tuple[int, int] | None:
        """(k, s) of a d_out × d_in target, or None when no factorization fits its budget."""
        c = self.config
        ratio = c.ratio if ratio is None else ratio
        if c.nonzeros and rho is None:
            s = c.nonzeros
            budget = (1.0 - ratio) * d_out * d_in * elt_bits
            k = largest_fitting(lambda k: dict_bits(d_out, d_in, k, d_out * s, elt_bits) <= budget, s, int(budget // (d_in * elt_bits)) + 1)
            return None if k is None else (k, s)
        return dict_shape(d_out, d_in, ratio, self.rho if rho is None else rho, elt_bits)

    def work(self, d_out: int, d_in: int, tokens: int) -> float | None:
        c, shape = self.config, self.shape_for(d_out, d_in, 16)
        return 0.0 if shape is None else dict_work(d_out, d_in, *shape, tokens, c.solver, iters=c.iters, refits=c.refits, reselect=c.reselect)

    def faster(self) -> str | None:
        return "solver=closed-form" if self.config.solver == "ksvd" else "reselect=2 (lower quality)"

    def check(self, site: Site) -> Shapes:
        c = self.config
        if c.share > 1:
            if c.allocate == "global":
                raise ConfigError("cospadi: share= and allocate=global cannot be combined yet; use one of them")
            n = len(site.adapter.layers(site.model))
            if n % c.share:
                ok = [d for d in range(1, n + 1) if n % d == 0]
                raise ConfigError(f"cospadi: share={c.share} does not divide the model's {n} layers; use share= one of {', '.join(map(str, ok))}")
        if c.solver == "ksvd":
            wide = [(t, hw) for t, hw in site.shapes.items() if self.selects(t, site.adapter) and max(hw) > KSVD_PRACTICAL_WIDTH]
            if wide:
                t, (d_out, d_in) = max(wide, key=lambda w: max(w[1]))
                logger.warning("cospadi solver=ksvd on %s (%dx%d) and %d other target(s) wider than %d: K-SVD's OMP is "
                               "impractical at this width (bench/results/layer_cost.md); solver=closed-form is faster",
                               t, d_out, d_in, len(wide) - 1, KSVD_PRACTICAL_WIDTH)
        return super().check(site)

    def check_target(self, d_out: int, d_in: int, stored: Stored | None) -> str | None:
        c = self.config
        elt = stored.elt_bits if stored is not None else 32  # the model's dtype decides what fits
        if c.nonzeros and self.shape_for(d_out, d_in, elt) is None:
            best = self.shape_for(d_out, d_in, elt, rho=1.0)
            k = best[0] if best else 0
            return (f"ratio {c.ratio} leaves room for {k} atoms, fewer than nonzeros={c.nonzeros}; "
                    f"use nonzeros={max(1, k // 2)} or lower, or a smaller ratio")
        return None

    def stored_bits(self, d_out: int, d_in: int, dtype: torch.dtype, before: Stored | None = None) -> int | None:
        if self.config.allocate == "global" or self.config.share > 1:
            return None  # known once the profile has been taken
        shape = self.shape_for(d_out, d_in, element_bits(dtype))
        if shape is None:
            return dense_bits(d_out, d_in, dtype)
        k, s = shape
        return dict_bits(d_out, d_in, k, d_out * s, element_bits(dtype))

    # -- per linear ------------------------------------------------------------------------------

    def apply(self, name: str, module: nn.Module, stats: LinearStats | None, ctx: LayerContext) -> PassResult:
        assert isinstance(module, nn.Linear) and stats is not None and stats.gram is not None
        c = self.config
        W = module.weight.data
        d_out, d_in = W.shape
        rel = layer_relative_name(name, self._layers_path) if self._layers_path else name
        shared = self._dicts.get((self._group_of(name), rel)) if c.share > 1 else None
        if c.share > 1 and shared is None:
            self._sizes.append((d_out, d_in, element_bits(W.dtype), d_out * d_in * element_bits(W.dtype)))
            return PassResult(None, {"kept_dense": "no shared dictionary fits the group's budget"})
        if shared is not None:
            k, s = shared.k, shared.s
        elif c.allocate == "global":
            choice = self._choice[name]
            shape = None if choice is None else self.shape_for(d_out, d_in, element_bits(W.dtype), ratio=choice[0], rho=choice[1])
            if shape is None:
                self._sizes.append((d_out, d_in, element_bits(W.dtype), d_out * d_in * element_bits(W.dtype)))
                return PassResult(None, {"kept_dense": "the global allocation kept it dense"})
            k, s = shape
        else:
            shape = self.shape_for(d_out, d_in, element_bits(W.dtype))
            if shape is None:
                why = f"no dictionary fits {1 - c.ratio:.0%} of its {d_out}x{d_in} weights"
                logger.info("%s left dense: %s", name, why)
                self._sizes.append((d_out, d_in, element_bits(W.dtype), d_out * d_in * element_bits(W.dtype)))
                return PassResult(None, {"kept_dense": why})
            k, s = shape
        L, _ = cholesky_psd(stats.gram, name)
        if shared is not None:
            f = code_with_dictionary(W, shared.A, s, L, method="omp" if c.solver == "ksvd" else "pursuit")
        else:
            seed = c.seed ^ zlib.crc32(name.encode())
            f = factorize_dict(W, k, s, L, solver=c.solver, iters=c.iters, seed=seed, init=c.init, refits=c.refits, reselect=c.reselect)
        if not (torch.isfinite(f.A).all() and torch.isfinite(f.C).all()):
            raise FloatingPointError(f"cospadi: {name}: the factorization is not finite; the layer's calibration Gram may be degenerate")
        if c.solver == "ksvd" and shared is None and not f.converged:
            # the first target at the limit warns; the rest are counted in the report's notes
            log = logger.warning if not self._unconverged else logger.info
            log("cospadi: %s: K-SVD stopped at its iteration limit (%d) with relative whitened error %.4g "
                "(its last iteration gained %.2g relative); raise iters= to go further (the report counts every such target)",
                name, c.iters, f.relative_error, _gain(f.history))
            self._unconverged.append((name, f.relative_error))
        bias = module.bias.data if module.bias is not None else None
        elt = element_bits(W.dtype)
        if shared is not None:
            if shared.stored is None or shared.stored.dtype != W.dtype:
                shared.stored = shared.A.to(W.dtype)
            new = DictLinear.from_factors(f.A, f.C, f.mask, bias, like=W, shared_atoms=shared.stored, shared=c.share)
        else:
            new = DictLinear.from_factors(f.A, f.C, f.mask, bias, like=W)
        info: dict[str, Any] = {
            "atoms": k, "nonzeros": s, "support": new.fmt,
            "error": relative_output_error(W, new.dense_weight(), stats.gram), "error_metric": "rel_output_err",
        }
        self._sizes.append((d_out, d_in, elt, new.storage_bits()))
        if f.history:
            info["ksvd_iters"] = len(f.history)
        if shared is not None:
            info["shared_by"] = c.share
        elif c.allocate == "global":
            allocated = self._choice[name]
            assert allocated is not None  # a layer the allocation keeps dense returned above
            info["allocated_ratio"], info["allocated_rho"] = allocated
        return PassResult(new, info)

    # -- profile: global allocation and shared dictionaries --------------------------------------

    def prepare(self, model: nn.Module, adapter: Any, plan: PassPlan) -> None:
        self._sizes: list[tuple[int, int, int, int]] = []  # (d_out, d_in, bits per weight, bits stored) per target
        self._unconverged: list[tuple[str, float]] = []  # K-SVD at its iteration limit: (target, relative error)
        self._layers_path = adapter.layers_path
        self._dicts: dict[tuple[int, str], _SharedDict] = {}
        self._pending: dict[tuple[int, str], list[tuple[torch.Tensor, torch.Tensor]]] = {}
        self._candidates: dict[str, list[tuple[int, float, tuple[float, float] | None]]] = {}
        self._choice: dict[str, tuple[float, float] | None] = {}
        self._n_layers = len(adapter.layers(model))

    def _group_of(self, name: str) -> int:
        prefix = self._layers_path + "."
        index = int(name[len(prefix):].split(".", 1)[0])
        return index // self.config.share

    def _targets_of(self, layer: nn.Module, stats: Any) -> list[tuple[str, nn.Linear, torch.Tensor]]:
        out = []
        for rel, st in stats.linears.items():
            mod = layer.get_submodule(rel)
            if self.targets(rel, mod) and st.gram is not None:
                assert isinstance(mod, nn.Linear)
                out.append((rel, mod, st.gram))
        return out

    def profile_layer(self, index: int, layer: nn.Module, stats: Any) -> None:
        c = self.config
        for rel, mod, gram in self._targets_of(layer, stats):
            W = mod.weight.data.to("cpu")
            if c.allocate == "global":
                name = f"{self._layers_path}.{index}.{rel}"
                self._candidates[name] = self._cost_candidates(W, gram, name, stats.sensitivity.get(rel))
            else:
                g = index // c.share
                self._pending.setdefault((g, rel), []).append((W, gram))
                if len(self._pending[(g, rel)]) == c.share:
                    self._fit_shared(g, rel, self._pending.pop((g, rel)))

    def profile_done(self) -> None:
        c = self.config
        if c.allocate != "global":
            return
        self._choice, used = allocate_fraction(self._candidates, 1.0 - c.ratio)
        kept = sum(1 for v in self._choice.values() if v is None)
        logger.info("cospadi: global allocation: %d targets, %.4f of the dense bits kept (budget %.4f), %d kept dense",
                    len(self._choice), used, 1.0 - c.ratio, kept)

    def _cost_candidates(self, W: torch.Tensor, gram: torch.Tensor, name: str,
                         sensitivity: Any = None) -> list[tuple[int, float, tuple[float, float] | None]]:
        """(stored bits, predicted loss increase, (ratio, rho)) per candidate; the first is the dense
        weight. The relative whitened error of the closed form's first step
        (:func:`~compress.solvers.dictionary.first_step_errors`) times the target's loss sensitivity
        ½·Σᵢ E[gᵢ²]·(W H Wᵀ)ᵢᵢ (:func:`~compress.solvers.metrics.predicted_increase` of removing the
        whole weight): the loss increase if the error were spread over the rows like the weight."""
        d_out, d_in = W.shape
        elt = element_bits(W.dtype)
        L, _ = cholesky_psd(gram, name)
        picked: list[tuple[float, tuple[int, int]]] = []
        for ratio in GLOBAL_RATIOS:
            shape = self.shape_for(d_out, d_in, elt, ratio=ratio, rho=self.rho)
            if shape is not None and shape not in [s for _, s in picked]:
                picked.append((ratio, shape))
        errors = first_step_errors(W, L, [shape for _, shape in picked])
        if sensitivity is not None:
            weight = predicted_increase(W, torch.zeros_like(W), sensitivity)
            errors = [e * weight for e in errors]
        out: list[tuple[int, float, tuple[float, float] | None]] = [(dense_bits(d_out, d_in, W.dtype), 0.0, None)]
        for (ratio, (k, s)), err in zip(picked, errors):
            out.append((dict_bits(d_out, d_in, k, d_out * s, elt), err, (ratio, self.rho)))
        return out

    def _fit_shared(self, g: int, rel: str, members: list[tuple[torch.Tensor, torch.Tensor]]) -> None:
        """One dictionary for projection ``rel`` of layer group ``g``: whitened by the group's summed
        Gram, fitted on the stacked weights; (k, s) from the group's budget, the dictionary stored once."""
        c = self.config
        W0 = members[0][0]
        d_out, d_in = W0.shape
        n = len(members)
        elt = element_bits(W0.dtype)
        budget = (1.0 - c.ratio) * n * d_out * d_in * elt

        def bits(k: int) -> int:
            s = min(k, max(1, round(k / self.rho))) if not c.nonzeros else c.nonzeros
            return k * d_in * elt + n * (d_out * s * elt + support_bits(d_out, k, d_out * s)) if s <= k else 1 << 62

        found = largest_fitting(lambda k: bits(k) <= budget, c.nonzeros or 1, int(budget // (d_in * elt)) + 1)
        if found is None:
            logger.info("cospadi: %s of layer group %d kept dense: no shared dictionary fits its budget", rel, g)
            return
        k = found
        s = c.nonzeros or min(k, max(1, round(k / self.rho)))
        H = sum(gram.to(SOLVE_DTYPE) for _, gram in members)
        assert isinstance(H, torch.Tensor)  # members is not empty
        L, _ = cholesky_psd(H, f"{rel} (layers {g * n}-{g * n + n - 1})")
        f = factorize_dict(torch.cat([W for W, _ in members]), k, s, L, solver=c.solver, iters=c.iters,
                           seed=c.seed ^ zlib.crc32(f"{g}/{rel}".encode()), init=c.init, refits=c.refits, reselect=c.reselect)
        self._dicts[(g, rel)] = _SharedDict(A=f.A, k=k, s=s)

    def notes(self, summary: dict[str, Any]) -> list[str]:
        lines = [
            "cospadi ratio: the fraction of each target's stored bits removed, counting the dictionary, the coefficient values "
            "and their support (packed row mask or packed indices); svd-llm at the same ratio stores the same bits as factors."
        ]
        sizes = getattr(self, "_sizes", [])
        if sizes:
            dense = sum(d_out * d_in * elt for d_out, d_in, elt, _ in sizes)
            kept = sum(b for *_, b in sizes)
            r = self.config.ratio
            lowrank = sum(
                min(rank_for_ratio(d_out, d_in, r) * (d_out + d_in), d_out * d_in) * elt for d_out, d_in, elt, _ in sizes
            )
            lines.append(
                f"cospadi: its {len(sizes)} targets keep {kept / dense:.4f} of their dense bits (ratio achieved {1 - kept / dense:.4f}, "
                f"requested {r}); svd-llm:ratio={r} on the same targets would keep {lowrank / dense:.4f} ({1 - lowrank / dense:.4f} removed)."
            )
        stuck = getattr(self, "_unconverged", [])
        if stuck:
            worst = max(stuck, key=lambda t: t[1])
            lines.append(
                f"cospadi: K-SVD reached its iteration limit ({self.config.iters}) on {len(stuck)} of {len(sizes)} targets, still improving "
                f"(largest relative whitened error {worst[1]:.4g} at {worst[0]}); iters= raises the limit."
            )
        return lines


#: candidate ratios of ``allocate=global`` (ROCKET's grid spans 0.05–0.70), each at the pass's rho: the
#: cheap first-step error ranks rho wrongly (it favours dense codes, which the refinements overtake:
#: at SmolLM2 layers 10 and 25 the first step is best at rho 1.5–2, the refined fit at 2.5–3)
GLOBAL_RATIOS = tuple(round(0.05 * i, 2) for i in range(1, 19))
#: atoms per non-zero when rho=0: the paper's 2 for K-SVD; 2.5 for the closed form with support
#: reselection (lower relative output error than 1.5, 2 and 3 at q/o/up/down of SmolLM2 layers 10 and 25)
DEFAULT_RHO = {"ksvd": 2.0, "closed-form": 2.5}


@dataclass
class _SharedDict:
    """A dictionary shared by one projection of a group of layers (float64, original space)."""

    A: torch.Tensor
    k: int
    s: int
    stored: torch.Tensor | None = None


def _gain(history: list[float]) -> float:
    if len(history) < 2:
        return float("nan")
    return (history[-2] - history[-1]) / max(history[-2], 1e-300)

