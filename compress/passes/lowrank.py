"""The low-rank family: svd, asvd, svd-llm, lord.

Each replaces a target linear W (d_out × d_in) by :class:`~compress.modules.LowRankLinear`
factors B (d_out × r) and A (r × d_in). ``ratio`` is the fraction of the target linears'
parameters removed: a layer keeps r·(d_out + d_in) of its d_out·d_in weights. Biases, norms and
embeddings are not counted and not changed.

- ``svd``: truncated SVD of W (data-free).
- ``asvd``: ASVD (Yuan et al., arXiv 2312.05821) — SVD of W·diag(s^α) where s is a per-input-channel
  activation statistic (mean |x| by default, α = 0.5), mapped back with diag(s^-α).
- ``svd-llm``: SVD-LLM (Wang et al., arXiv 2403.07378) — truncation-aware whitening: with the
  Cholesky factor L of H = XᵀX (float64, repaired if not positive definite), take the SVD of W·L,
  truncate, and keep B = U_r√Σ_r, A = √Σ_r V_rᵀ L⁻¹; each dropped σ_i costs exactly σ_i² of squared
  output error on the calibration inputs.
- ``lord``: LoRD (Kaushal et al., arXiv 2309.14021) — plain low-rank decomposition of W, one shot,
  with the ranks of all target linears chosen together from the parameter budget
  (1 − ratio)·Σ d_out·d_in by a greedy allocation on relative singular-value energy (see
  :func:`compress.solvers.lowrank.allocate_ranks`). Our reading: the paper's "rank chosen from a
  parameter budget" is a global, data-free allocation; layers whose budgeted rank would not save
  parameters stay dense.

Lifecycle: ``prepare`` (lord: allocate ranks), then per sub-group ``observe`` (asvd: Σ|x|;
svd-llm: XᵀX) and ``apply`` (factorize one linear).

Example recipe::

    passes:
      - pass: svd-llm
        ratio: 0.2
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from typing import Any, ClassVar, TypeVar

import torch
from torch import nn

from ..adapters.base import ModelAdapter
from ..config import PassConfig, option, targets_option
from ..modules.lowrank import LowRankLinear
from ..pipeline.stats import LinearStats
from ..registry import register_pass
from ..solvers.allocate import allocate_ranks
from ..solvers.linalg import cholesky_psd
from ..solvers.lowrank import factorize, rank_for_ratio, saves_parameters
from ..solvers.metrics import relative_output_error
from .base import Capabilities, LayerContext, LinearPass, PassPlan, PassResult, Stored, dense_bits, meta_storage_bits

logger = logging.getLogger(__name__)

_RATIO_HELP = (
    "fraction of the target linears' parameters removed; each layer keeps rank "
    "r = floor((1-ratio)*d_out*d_in/(d_out+d_in))"
)


@dataclass
class LowRankOptions(PassConfig):
    ratio: float = option(0.2, _RATIO_HELP, min=0.0, max=1.0, min_open=True, max_open=True)
    targets: str = targets_option()


@dataclass
class SVDConfig(LowRankOptions):
    """Options of svd."""


@dataclass
class ASVDConfig(SVDConfig):
    alpha: float = option(0.5, "exponent α of the activation scaling diag(s^α)", min=0.0, max=4.0)
    statistic: str = option(
        "abs_mean", "per-input-channel activation statistic s", choices=("abs_mean", "rms", "abs_max")
    )


@dataclass
class SVDLLMConfig(SVDConfig):
    """Same options as svd."""


@dataclass
class LoRDConfig(LowRankOptions):
    ratio: float = option(
        0.2,
        "fraction of the target linears' parameters removed in total; per-layer ranks are allocated globally",
        min=0.0,
        max=1.0,
        min_open=True,
        max_open=True,
    )


L = TypeVar("L", bound=LowRankOptions)


class _LowRankPass(LinearPass[L]):
    """Shared apply step: factorize W with the pass's scaling and build a LowRankLinear."""

    error_metric: ClassVar[str] = "rel_weight_err"
    accepts_reason = "it factorizes dense weights"

    def produces(self, kinds: frozenset[str]) -> frozenset[str]:
        return frozenset({"LowRankLinear", "Linear"})  # a layer whose rank would not save parameters stays dense

    def rank(self, name: str, d_out: int, d_in: int) -> int | None:
        return rank_for_ratio(d_out, d_in, self.config.ratio)

    def stored_bits(self, d_out: int, d_in: int, dtype: torch.dtype, before: Stored | None = None) -> int | None:
        r = rank_for_ratio(d_out, d_in, self.config.ratio)
        if not saves_parameters(d_out, d_in, r):
            return dense_bits(d_out, d_in, dtype)
        return meta_storage_bits(LowRankLinear, d_in, d_out, r, dtype=dtype)

    def scaling(self, name: str, stats: LinearStats | None) -> dict[str, torch.Tensor]:
        return {}

    def work(self, d_out: int, d_in: int, tokens: int) -> float | None:
        # statistics, a whitening factor and one SVD in float64
        return tokens * d_in**2 + d_in**3 + 12.0 * d_out * d_in * min(d_out, d_in)

    def apply(self, name: str, module: nn.Module, stats: LinearStats | None, ctx: LayerContext) -> PassResult:
        assert isinstance(module, nn.Linear)
        W = module.weight.data  # (d_out, d_in)
        d_out, d_in = W.shape
        r = self.rank(name, d_out, d_in)
        if r is None or not saves_parameters(d_out, d_in, r):
            why = f"rank {r} would not save parameters" if r is not None else "budget allocation kept it dense"
            logger.info("%s left dense: %s", name, why)
            return PassResult(None, {"kept_dense": why})
        scale = self.scaling(name, stats)
        f = factorize(W, r, **scale)
        new = LowRankLinear.from_factors(f.B, f.A, module.bias.data if module.bias is not None else None, like=W)
        info: dict[str, Any] = {"rank": f.rank}
        if stats is not None and stats.gram is not None:
            info["error"] = relative_output_error(W, f.B @ f.A, stats.gram)
            info["error_metric"] = "rel_output_err"
        else:
            total = float(f.sigma.double().square().sum().clamp_min(1e-300))
            info["error"] = f.truncation_loss() / total
            info["error_metric"] = self.error_metric
        return PassResult(new, info)


@register_pass
class SVDPass(_LowRankPass[SVDConfig]):
    """Truncated SVD of the weight (data-free)."""

    name = "svd"


@register_pass
class ASVDPass(_LowRankPass[ASVDConfig]):
    """ASVD: activation-aware diagonal scaling before the SVD."""

    name = "asvd"
    error_metric = "rel_scaled_err"

    def capabilities(self) -> Capabilities:
        return Capabilities(requires_calibration=True, statistics=frozenset({self.config.statistic}))

    def scaling(self, name: str, stats: LinearStats | None) -> dict[str, torch.Tensor]:
        assert stats is not None
        cfg = self.config
        if cfg.statistic == "abs_mean":
            s = stats.mean_abs
        elif cfg.statistic == "rms":
            s = stats.rms_value
        else:
            assert stats.abs_max is not None
            s = stats.abs_max
        # channels that never fire would give an infinite S⁻¹: floor them relative to the largest
        s = s.clamp_min(float(s.max()) * 1e-6 + 1e-12)
        return {"diag": s.pow(cfg.alpha)}


@register_pass
class SVDLLMPass(_LowRankPass[SVDLLMConfig]):
    """SVD-LLM: truncation-aware Cholesky whitening."""

    name = "svd-llm"

    def capabilities(self) -> Capabilities:
        return Capabilities(requires_calibration=True, statistics=frozenset({"gram"}))

    def scaling(self, name: str, stats: LinearStats | None) -> dict[str, torch.Tensor]:
        assert stats is not None and stats.gram is not None
        L, _ = cholesky_psd(stats.gram, name)
        return {"chol": L}


@register_pass
class LoRDPass(_LowRankPass[LoRDConfig]):
    """LoRD: data-free low-rank decomposition with globally budgeted ranks."""

    name = "lord"

    def capabilities(self) -> Capabilities:
        return Capabilities(reads_all_weights=True)

    def prepare(self, model: nn.Module, adapter: ModelAdapter, plan: PassPlan) -> None:
        names: list[str] = []
        spectra: list[torch.Tensor] = []
        shapes: list[tuple[int, int]] = []
        for full, mod in self.iter_targets(model, adapter):
            assert isinstance(mod, nn.Linear)
            names.append(full)
            spectra.append(torch.linalg.svdvals(mod.weight.data.float()))
            shapes.append((mod.out_features, mod.in_features))
        budget = (1.0 - self.config.ratio) * sum(m * n for m, n in shapes)
        self._ranks = dict(zip(names, allocate_ranks(spectra, shapes, budget)))

    def rank(self, name: str, d_out: int, d_in: int) -> int | None:
        return self._ranks[name]

    def stored_bits(self, d_out: int, d_in: int, dtype: torch.dtype, before: Stored | None = None) -> int | None:
        return None  # the ranks come from a global allocation over every layer's spectrum
