"""Pruning passes: ``magnitude``, ``wanda``, ``sparsegpt`` (N:M or unstructured).

- ``magnitude``: score |W| (data-free); unstructured masks are chosen per layer.
- ``wanda`` (Sun et al., arXiv 2306.11695): score |W_ij|·‖X_j‖₂, compared within each output row.
- ``sparsegpt`` (Frantar & Alistarh, arXiv 2301.00774): OBS column sweep with weight updates
  (:func:`compress.solvers.sparse.sparsegpt_prune`), sharing GPTQ's sweep.

``pattern=N:M`` keeps N of every M consecutive inputs; ``sparsity=s`` alone selects unstructured
pruning of a fraction s. 2:4 layers are stored compressed (:class:`Sparse24Linear`); other patterns
keep a dense ``nn.Linear`` holding the zeros, and a later quantization pass keeps them at zero.

Example recipe::

    passes:
      - pass: sparsegpt
        pattern: "2:4"
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from typing import Any, TypeVar

import torch
from torch import nn

from ..config import PassConfig, check_propagate, option, propagate_option, targets_option
from ..errors import ConfigError
from ..modules.sparse import Sparse24Linear
from ..pipeline.stats import LinearStats
from ..registry import register_pass
from ..solvers.gptq import gptq_work
from ..solvers.metrics import relative_output_error
from ..solvers.sparse import nm_mask, parse_pattern, sparsegpt_prune, unstructured_mask
from .base import Capabilities, LayerContext, LinearPass, PassResult, Stored, dense_bits, meta_storage_bits

logger = logging.getLogger(__name__)


@dataclass
class PruneOptions(PassConfig):
    pattern: str = option("", "N:M (N kept of every M consecutive inputs), or 'unstructured' with sparsity "
                          "(default: 2:4, or unstructured when sparsity is given)")
    sparsity: float | None = option(None, "fraction of weights removed, unstructured (given alone, selects unstructured)",
                                    min=0.0, max=1.0, min_open=True, max_open=True)
    targets: str = targets_option("prune")

    def validate(self) -> None:
        if not self.pattern:
            self.pattern = "unstructured" if self.sparsity is not None else "2:4"
        super().validate()
        if self.pattern == "unstructured":
            if self.sparsity is None:
                raise ConfigError(f"pass '{self.pass_name}': pattern=unstructured needs sparsity=S (e.g. 0.5)")
        else:
            parse_pattern(self.pattern)
            if self.sparsity is not None:
                raise ConfigError(f"pass '{self.pass_name}': give pattern=N:M or sparsity=S, not both")

    @property
    def nm(self) -> tuple[int, int] | None:
        return None if self.pattern == "unstructured" else parse_pattern(self.pattern)

    @property
    def unstructured_sparsity(self) -> float:
        """``sparsity`` of the unstructured pattern (which :meth:`validate` requires it for)."""
        assert self.sparsity is not None
        return self.sparsity


@dataclass
class MagnitudeConfig(PruneOptions):
    """Options of magnitude pruning."""


@dataclass
class WandaConfig(PruneOptions):
    """Options of Wanda."""

    sequential: bool = option(False, "observe each sub-group's inputs after the sub-groups before it in the layer were pruned "
                              "(one forward per sub-group); false: every sub-group's from one forward of the layer as the pass finds it")
    propagate: str = propagate_option()

    def validate(self) -> None:
        super().validate()
        check_propagate(self)


@dataclass
class SparseGPTConfig(PruneOptions):
    damp: float = option(0.01, "damping added to diag(H), as a fraction of its mean", min=0.0, max=1.0)
    blocksize: int = option(128, "columns per mask-selection / lazy-update block", min=1)
    sequential: bool = option(False, "observe each sub-group's inputs after the sub-groups before it in the layer were pruned "
                              "(one forward per sub-group); false: every sub-group's from one forward of the layer as the pass finds it")
    propagate: str = propagate_option()

    def validate(self) -> None:
        super().validate()
        check_propagate(self)


P = TypeVar("P", bound=PruneOptions)


class PrunePass(LinearPass[P]):
    """Shared apply of the pruning passes: check shapes, compute a pruned weight (:meth:`prune`),
    store it (packed 2:4 where the input dimension allows it, else a dense linear holding the zeros)."""

    accepts_reason = "it prunes dense weights"

    def produces(self, kinds: frozenset[str]) -> frozenset[str]:
        # 2:4 is stored packed where the input dimension allows it; other patterns stay dense with zeros
        return frozenset({"Sparse24Linear", "Linear"}) if self.config.nm == (2, 4) else frozenset({"Linear"})

    def check_target(self, d_out: int, d_in: int, stored: Stored | None = None) -> str | None:
        cfg = self.config
        nm = cfg.nm
        if nm is not None and d_in % nm[1]:
            return f"input dimension {d_in} is not divisible by M = {nm[1]} of pattern {cfg.pattern}; choose another pattern"
        return None

    def stored_bits(self, d_out: int, d_in: int, dtype: torch.dtype, before: Stored | None = None) -> int | None:
        if self.config.nm == (2, 4) and d_in % 8 == 0:
            return meta_storage_bits(Sparse24Linear, d_in, d_out, dtype=dtype)
        return dense_bits(d_out, d_in, dtype)  # other patterns keep a dense weight holding the zeros

    def _check(self, name: str, d_out: int, d_in: int) -> tuple[int, int] | None:
        why = self.check_target(d_out, d_in)
        if why is not None:
            raise ConfigError(f"{name} ({d_out}x{d_in}): {why}")
        return self.config.nm

    def prune(self, name: str, W: torch.Tensor, stats: LinearStats | None, nm: tuple[int, int] | None) -> torch.Tensor:
        raise NotImplementedError

    def apply(self, name: str, module: nn.Module, stats: LinearStats | None, ctx: LayerContext) -> PassResult:
        assert isinstance(module, nn.Linear)
        W = module.weight.data
        d_out, d_in = W.shape
        nm = self._check(name, d_out, d_in)
        pruned = self.prune(name, W, stats, nm).to(W.dtype)
        H = stats.gram if stats is not None else None
        info: dict[str, Any] = {
            "pattern": self.config.pattern,
            "sparsity": float((pruned == 0).float().mean()),
            "error": relative_output_error(W, pruned, H),
            "error_metric": "rel_output_err" if H is not None else "rel_weight_err",
        }
        bias = module.bias.data if module.bias is not None else None
        if nm == (2, 4) and d_in % 8 == 0:
            return PassResult(Sparse24Linear.from_dense(pruned, bias), info)
        if nm == (2, 4):
            info["storage"] = f"dense: input dimension {d_in} is not a multiple of 8"
        new = nn.Linear(d_in, d_out, bias=bias is not None, dtype=W.dtype, device=W.device)
        with torch.no_grad():
            new.weight.copy_(pruned)
            if bias is not None:
                new.bias.copy_(bias)
        return PassResult(new, info)


@register_pass
class MagnitudePass(PrunePass[MagnitudeConfig]):
    """Magnitude pruning: keep the largest |W| (data-free)."""

    name = "magnitude"

    def work(self, d_out: int, d_in: int, tokens: int) -> float | None:
        return 8.0 * d_out * d_in

    def prune(self, name: str, W: torch.Tensor, stats: LinearStats | None, nm: tuple[int, int] | None) -> torch.Tensor:
        score = W.abs().float()
        keep = nm_mask(score, *nm) if nm else unstructured_mask(score, self.config.unstructured_sparsity, per_row=False)
        return W * keep


@register_pass
class WandaPass(PrunePass[WandaConfig]):
    """Wanda: keep the largest |W_ij|·‖X_j‖₂ within each output row."""

    name = "wanda"

    def capabilities(self) -> Capabilities:
        return Capabilities(requires_calibration=True, statistics=frozenset({"rms"}), observe_once=not self.config.sequential,
                            propagate_dense=self.config.propagate == "dense")

    def work(self, d_out: int, d_in: int, tokens: int) -> float | None:
        return tokens * d_in + 8.0 * d_out * d_in

    def prune(self, name: str, W: torch.Tensor, stats: LinearStats | None, nm: tuple[int, int] | None) -> torch.Tensor:
        assert stats is not None and stats.sq_sum is not None
        score = W.abs().float() * stats.sq_sum.sqrt().float()[None, :]
        keep = nm_mask(score, *nm) if nm else unstructured_mask(score, self.config.unstructured_sparsity, per_row=True)
        return W * keep


@register_pass
class SparseGPTPass(PrunePass[SparseGPTConfig]):
    """SparseGPT: OBS pruning with weight reconstruction (shares GPTQ's column sweep)."""

    name = "sparsegpt"

    def capabilities(self) -> Capabilities:
        return Capabilities(requires_calibration=True, statistics=frozenset({"gram"}), observe_once=not self.config.sequential,
                            propagate_dense=self.config.propagate == "dense")

    def work(self, d_out: int, d_in: int, tokens: int) -> float | None:
        return gptq_work(d_out, d_in, tokens)

    def prune(self, name: str, W: torch.Tensor, stats: LinearStats | None, nm: tuple[int, int] | None) -> torch.Tensor:
        assert stats is not None and stats.gram is not None
        c = self.config
        pruned, _, _ = sparsegpt_prune(W, stats.gram, sparsity=c.sparsity, nm=nm, blocksize=c.blocksize, damp=c.damp, name=name)
        return pruned
