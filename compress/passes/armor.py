"""``armor`` (arXiv 2510.05528): a 2:4 core wrapped by block-diagonal matrices, W ≈ A·core·B, found by
block coordinate descent (:func:`compress.solvers.armor.armor`) on a proxy loss weighted by the
calibration inputs' energy. Per layer the iteration count and the proxy loss (initial = NoWag-P,
final) are recorded. The result is an :class:`~compress.modules.sparse.ArmorLinear`, whose core runs
through the ``compress::sparse24_linear`` op.

Example::

    compress run MODEL --pass armor:block=64,iters=2000 --out out/armor24
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn

from ..config import PassConfig, option, targets_option
from ..errors import ConfigError
from ..modules.sparse import ArmorLinear
from ..pipeline.stats import LinearStats
from ..registry import register_pass
from ..solvers.armor import armor
from ..solvers.metrics import relative_output_error
from .base import Capabilities, LayerContext, LinearPass, PassResult, Stored, meta_storage_bits

logger = logging.getLogger(__name__)


@dataclass
class ArmorConfig(PassConfig):
    block: int = option(64, "size of the blocks of the block-diagonal wrappers (divides d_in and d_out; multiple of 4)", min=4)
    iters: int = option(2000, "block coordinate descent iterations per layer", min=1)
    lr: float = option(1e-4, "Adam learning rate of the continuous step", min=0.0, min_open=True)
    patience: int = option(100, "stop after this many iterations without improvement", min=1)
    seed: int = option(0, "seed of the group sampling")
    targets: str = targets_option("prune")


@register_pass
class ArmorPass(LinearPass[ArmorConfig]):
    """ARMOR: 2:4 core wrapped by block-diagonal matrices, by block coordinate descent."""

    name = "armor"
    accepts_reason = "it prunes dense weights"

    def capabilities(self) -> Capabilities:
        return Capabilities(requires_calibration=True, statistics=frozenset({"rms"}))

    def produces(self, kinds: frozenset[str]) -> frozenset[str]:
        return frozenset({"ArmorLinear"})

    def check_target(self, d_out: int, d_in: int, stored: Any = None) -> str | None:
        b = self.config.block
        if b % 4 or d_in % b or d_out % b or d_in % 8:
            ok = [s for s in (16, 32, 64, 128, 256) if d_in % s == 0 and d_out % s == 0]
            return (f"block size {b} must be a multiple of 4 dividing both dimensions "
                    f"(block sizes that work: {', '.join(map(str, ok)) or 'none'})")
        return None

    def stored_bits(self, d_out: int, d_in: int, dtype: torch.dtype, before: Stored | None = None) -> int | None:
        return meta_storage_bits(ArmorLinear, d_in, d_out, self.config.block, dtype=dtype)

    def apply(self, name: str, module: nn.Module, stats: LinearStats | None, ctx: LayerContext) -> PassResult:
        assert isinstance(module, nn.Linear) and stats is not None and stats.sq_sum is not None
        c = self.config
        W = module.weight.data
        d_out, d_in = W.shape
        why = self.check_target(d_out, d_in)
        if why is not None:
            raise ConfigError(f"{name} ({d_out}x{d_in}): {why}")
        res = armor(W, stats.sq_sum, block=c.block, iters=c.iters, lr=c.lr, patience=c.patience, seed=c.seed)
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
