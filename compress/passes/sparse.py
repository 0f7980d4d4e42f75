"""Pruning passes: ``magnitude``, ``wanda``, ``sparsegpt`` (N:M or unstructured) and ``armor`` (2:4).

- ``magnitude``: score |W| (data-free); unstructured masks are chosen per layer.
- ``wanda`` (Sun et al., arXiv 2306.11695): score |W_ij|·‖X_j‖₂, compared within each output row.
- ``sparsegpt`` (Frantar & Alistarh, arXiv 2301.00774): OBS column sweep with weight updates
  (:func:`compress.solvers.sparse.sparsegpt_prune`), sharing GPTQ's sweep.
- ``armor`` (arXiv 2510.05528): 2:4 core wrapped by block-diagonal matrices
  (:func:`compress.solvers.armor.armor`); per layer the iteration count and the proxy loss
  (initial = NoWag-P, final) are recorded.

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
from typing import Any

import torch
from torch import nn

from ..config import PassConfig, option
from ..errors import ConfigError
from ..modules.sparse import ArmorLinear, Sparse24Linear
from ..pipeline.stats import LinearStats
from ..registry import register_pass
from ..solvers.armor import armor
from ..solvers.lowrank import relative_output_error
from ..solvers.sparse import nm_mask, parse_pattern, sparsegpt_prune, unstructured_mask
from .base import Capabilities, Pass, PassResult, dense_bits, meta_storage_bits

logger = logging.getLogger(__name__)
_TARGETS_HELP = "which linears of each decoder layer to prune: glob(s) on names like 'mlp.down_proj', '|'-separated"


@dataclass
class _PruneOptions(PassConfig):
    pattern: str = option("", "N:M (N kept of every M consecutive inputs), or 'unstructured' with sparsity "
                          "(default: 2:4, or unstructured when sparsity is given)")
    sparsity: float | None = option(None, "fraction of weights removed, unstructured (given alone, selects unstructured)",
                                    min=0.0, max=1.0, min_open=True, max_open=True)
    targets: str = option("*", _TARGETS_HELP)

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


@dataclass
class MagnitudeConfig(_PruneOptions):
    """Options of magnitude pruning."""


@dataclass
class WandaConfig(_PruneOptions):
    """Options of Wanda."""

    sequential: bool = option(False, "observe each sub-group's inputs after the sub-groups before it in the layer were pruned "
                              "(one forward per sub-group); false: every sub-group's from one forward of the layer as the pass finds it")


@dataclass
class SparseGPTConfig(_PruneOptions):
    damp: float = option(0.01, "damping added to diag(H), as a fraction of its mean", min=0.0, max=1.0)
    blocksize: int = option(128, "columns per mask-selection / lazy-update block", min=1)
    sequential: bool = option(False, "observe each sub-group's inputs after the sub-groups before it in the layer were pruned "
                              "(one forward per sub-group); false: every sub-group's from one forward of the layer as the pass finds it")


class _PrunePass(Pass):
    """Shared apply: check shapes, compute a mask (or a pruned weight), store the result."""

    accepts_reason = "it prunes dense weights"

    @classmethod
    def produces(cls, config: PassConfig) -> frozenset[str]:
        assert isinstance(config, _PruneOptions)
        # 2:4 is stored packed where the input dimension allows it; other patterns stay dense with zeros
        return frozenset({"Sparse24Linear", "Linear"}) if config.nm == (2, 4) else frozenset({"Linear"})

    def check_shape(self, d_out: int, d_in: int) -> str | None:
        cfg = self.config
        assert isinstance(cfg, _PruneOptions)
        nm = cfg.nm
        if nm is not None and d_in % nm[1]:
            return f"input dimension {d_in} is not divisible by M = {nm[1]} of pattern {cfg.pattern}; choose another pattern"
        return None

    def stored_bits(self, d_out: int, d_in: int, dtype: torch.dtype) -> int | None:
        if self.config.nm == (2, 4) and d_in % 8 == 0:  # type: ignore[attr-defined]
            return meta_storage_bits(Sparse24Linear, d_in, d_out, dtype=dtype)
        return dense_bits(d_out, d_in, dtype)  # other patterns keep a dense weight holding the zeros

    def _check(self, name: str, d_out: int, d_in: int) -> tuple[int, int] | None:
        why = self.check_shape(d_out, d_in)
        if why is not None:
            raise ConfigError(f"{name} ({d_out}x{d_in}): {why}")
        return self.config.nm  # type: ignore[attr-defined]

    def prune(self, name: str, W: torch.Tensor, stats: LinearStats | None, nm: tuple[int, int] | None) -> torch.Tensor:
        raise NotImplementedError

    def apply(self, name: str, module: nn.Module, stats: LinearStats | None, context: Any = None) -> PassResult:
        assert isinstance(module, nn.Linear)
        W = module.weight.data
        d_out, d_in = W.shape
        nm = self._check(name, d_out, d_in)
        pruned = self.prune(name, W, stats, nm).to(W.dtype)
        H = stats.gram if stats is not None else None
        info: dict[str, Any] = {
            "pattern": self.config.pattern,  # type: ignore[attr-defined]
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
class MagnitudePass(_PrunePass):
    """Magnitude pruning: keep the largest |W| (data-free)."""

    name = "magnitude"
    config_cls = MagnitudeConfig

    def prune(self, name: str, W: torch.Tensor, stats: LinearStats | None, nm: tuple[int, int] | None) -> torch.Tensor:
        score = W.abs().float()
        keep = nm_mask(score, *nm) if nm else unstructured_mask(score, self.config.sparsity, per_row=False)  # type: ignore[attr-defined]
        return W * keep


@register_pass
class WandaPass(_PrunePass):
    """Wanda: keep the largest |W_ij|·‖X_j‖₂ within each output row."""

    name = "wanda"
    config_cls = WandaConfig

    @classmethod
    def capabilities(cls, config: PassConfig) -> Capabilities:
        assert isinstance(config, WandaConfig)
        return Capabilities(requires_calibration=True, statistics=frozenset({"rms"}), observe_once=not config.sequential)

    def prune(self, name: str, W: torch.Tensor, stats: LinearStats | None, nm: tuple[int, int] | None) -> torch.Tensor:
        assert stats is not None and stats.sq_sum is not None
        score = W.abs().float() * stats.sq_sum.sqrt().float()[None, :]
        keep = nm_mask(score, *nm) if nm else unstructured_mask(score, self.config.sparsity, per_row=True)  # type: ignore[attr-defined]
        return W * keep


@register_pass
class SparseGPTPass(_PrunePass):
    """SparseGPT: OBS pruning with weight reconstruction (shares GPTQ's column sweep)."""

    name = "sparsegpt"
    config_cls = SparseGPTConfig

    @classmethod
    def capabilities(cls, config: PassConfig) -> Capabilities:
        assert isinstance(config, SparseGPTConfig)
        return Capabilities(requires_calibration=True, statistics=frozenset({"gram"}), observe_once=not config.sequential)

    def prune(self, name: str, W: torch.Tensor, stats: LinearStats | None, nm: tuple[int, int] | None) -> torch.Tensor:
        assert stats is not None and stats.gram is not None
        c = self.config
        assert isinstance(c, SparseGPTConfig)
        pruned, _, _ = sparsegpt_prune(W, stats.gram, sparsity=c.sparsity, nm=nm, blocksize=c.blocksize, damp=c.damp, name=name)
        return pruned


@dataclass
class ArmorConfig(PassConfig):
    block: int = option(64, "size of the blocks of the block-diagonal wrappers (divides d_in and d_out; multiple of 4)", min=4)
    iters: int = option(2000, "block coordinate descent iterations per layer", min=1)
    lr: float = option(1e-4, "Adam learning rate of the continuous step", min=0.0, min_open=True)
    patience: int = option(100, "stop after this many iterations without improvement", min=1)
    seed: int = option(0, "seed of the group sampling")
    targets: str = option("*", _TARGETS_HELP)


@register_pass
class ArmorPass(Pass):
    """ARMOR: 2:4 core wrapped by block-diagonal matrices, by block coordinate descent."""

    name = "armor"
    config_cls = ArmorConfig
    accepts_reason = "it prunes dense weights"

    @classmethod
    def capabilities(cls, config: PassConfig) -> Capabilities:
        return Capabilities(requires_calibration=True, statistics=frozenset({"rms"}))

    @classmethod
    def produces(cls, config: PassConfig) -> frozenset[str]:
        return frozenset({"ArmorLinear"})

    def check_shape(self, d_out: int, d_in: int) -> str | None:
        b = self.config.block  # type: ignore[attr-defined]
        if b % 4 or d_in % b or d_out % b or d_in % 8:
            ok = [s for s in (16, 32, 64, 128, 256) if d_in % s == 0 and d_out % s == 0]
            return (f"block size {b} must be a multiple of 4 dividing both dimensions "
                    f"(block sizes that work: {', '.join(map(str, ok)) or 'none'})")
        return None

    def stored_bits(self, d_out: int, d_in: int, dtype: torch.dtype) -> int | None:
        return meta_storage_bits(ArmorLinear, d_in, d_out, self.config.block, dtype=dtype)  # type: ignore[attr-defined]

    def apply(self, name: str, module: nn.Module, stats: LinearStats | None, context: Any = None) -> PassResult:
        assert isinstance(module, nn.Linear) and stats is not None and stats.sq_sum is not None
        c = self.config
        assert isinstance(c, ArmorConfig)
        W = module.weight.data
        d_out, d_in = W.shape
        why = self.check_shape(d_out, d_in)
        if why is not None:
            raise ConfigError(f"{name} ({d_out}x{d_in}): {why}")
        b = c.block
        res = armor(W, stats.sq_sum, block=b, iters=c.iters, lr=c.lr, patience=c.patience, seed=c.seed)
        bias = module.bias.data if module.bias is not None else None
        new = ArmorLinear.from_factors(res.A, res.core, res.B, res.keep, bias, like=W)
        info = {
            "pattern": "2:4",
            "iterations": res.iterations,
            "proxy_loss_init": res.losses[0],
            "proxy_loss": res.losses[-1],
            "extra_params": new.extra_params(),
            "extra_fraction": new.extra_params() / (d_out * d_in),
            "error": relative_output_error(W, new.dense_weight(), None),
            "error_metric": "rel_weight_err",
        }
        logger.info("%s: ARMOR proxy loss %.4g -> %.4g in %d iterations", name, res.losses[0], res.losses[-1], res.iterations)
        return PassResult(new, info)
