"""``bcq``: binary-coding quantization, the format of the LUT-GEMM kernel (Park et al., arXiv 2206.09557).

Each weight group is Σ_i α_i·b_i + β with q binary planes b_i ∈ {−1, +1}. The pass starts from
round-to-nearest uniform codes converted exactly (``init=uniform``, so it is never worse than RTN at
the same bits and groups) or from LUT-GEMM's greedy planes (``init=greedy``), then alternates
refinement rounds, each kept only where it lowers the error weighted by the calibration inputs'
energy diag(XᵀX) (``weighted``; data-free without it). The math is in :mod:`compress.solvers.bcq`;
the result is a :class:`~compress.modules.bcq.BCQLinear`.

Example::

    compress run MODEL --pass bcq:bits=3,group=64 --out out/bcq3
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch
from torch import nn

from ..config import PassConfig, option, targets_option
from ..errors import ConfigError
from ..modules.bcq import BCQLinear
from ..pipeline.stats import LinearStats
from ..registry import register_pass
from ..solvers.bcq import bcq_gptq, bcq_quantize
from ..solvers.gptq import FactorCache, gptq_work
from ..solvers.metrics import relative_output_error
from .base import Capabilities, LayerContext, LinearPass, PassResult, Stored, meta_storage_bits


@dataclass
class BCQConfig(PassConfig):
    bits: int = option(3, "binary planes per weight", min=1, max=4)
    group: int = option(128, "inputs per scale group (multiple of 8; 0 = whole row)", min=0)
    rounds: int = option(15, "alternating refinement rounds after the start", min=0)
    init: str = option("uniform", "start: round-to-nearest uniform codes converted exactly ('uniform'; never worse than RTN at the "
                       "same bits and groups) or LUT-GEMM's greedy planes ('greedy')", choices=("uniform", "greedy"))
    weighted: bool = option(True, "weight the error by the calibration inputs' energy diag(XᵀX) (needs calibration data)")
    feedback: bool = option(True, "GPTQ's error feedback under the full calibration Gram XᵀX: the grid from the refinement above, "
                            "then a column sweep that feeds each weight's error forward, and refits of (α, β) for the swept signs; "
                            "false: the refinement alone; weighted=false (data-free) skips it too")
    refits: int = option(2, "feedback: rounds of (α, β) least squares under the full Gram, each followed by a new sweep", min=0)
    damp: float = option(0.01, "feedback: damping added to diag(XᵀX), as a fraction of its mean", min=0.0, max=1.0)
    actorder: bool = option(True, "feedback: sweep the columns in order of decreasing diag(XᵀX)")
    targets: str = targets_option("quantize")


#: multiply-adds one refinement round costs per weight in time (measured: element-wise, memory bound)
BCQ_ROUND = 10000.0


@register_pass
class BCQPass(LinearPass[BCQConfig]):
    """Binary-coding quantization (LUT-GEMM's format): greedy + alternating refinement, data-free."""

    name = "bcq"
    accepts_reason = "it quantizes dense weights"

    def __init__(self, config: BCQConfig) -> None:
        super().__init__(config)
        self._factors = FactorCache()  # q/k/v (and gate/up) have equal Grams: factor once

    def work(self, d_out: int, d_in: int, tokens: int) -> float | None:
        c = self.config
        # each refinement round is element-wise work on every weight (least squares per group, nearest of 2^q values)
        base = BCQ_ROUND * c.rounds * d_out * d_in
        if not (c.feedback and c.weighted):
            return base
        return base + gptq_work(d_out, d_in, tokens) * (1 + c.refits) + c.refits * (c.bits + 1) * d_out * d_in**2

    def faster(self) -> str | None:
        return "refits=0, or feedback=false (no error feedback: lower quality)"

    def capabilities(self) -> Capabilities:
        c = self.config
        if c.feedback and c.weighted:
            return Capabilities(requires_calibration=True, statistics=frozenset({"gram"}), observe_once=True)
        return Capabilities(requires_calibration=True, statistics=frozenset({"rms"})) if c.weighted else Capabilities()

    def produces(self, kinds: frozenset[str]) -> frozenset[str]:
        return frozenset({"BCQLinear"})

    def check_target(self, d_out: int, d_in: int, stored: Any = None) -> str | None:
        g = self.config.group or d_in
        if d_in % g or g % 8:
            ok = [s for s in range(8, min(d_in, 256) + 1, 8) if d_in % s == 0]
            return (f"BCQ group size {g} must divide the input dimension {d_in} and be a multiple of 8 "
                    f"(sizes that work: {', '.join(map(str, ok)) or 'none'}; group=0 is the whole row)")
        return None

    def stored_bits(self, d_out: int, d_in: int, dtype: torch.dtype, before: Stored | None = None) -> int | None:
        c = self.config
        return meta_storage_bits(BCQLinear, d_in, d_out, c.bits, c.group or d_in, dtype=dtype)

    def apply(self, name: str, module: nn.Module, stats: LinearStats | None, ctx: LayerContext) -> PassResult:
        assert isinstance(module, nn.Linear)
        c = self.config
        W = module.weight.data
        d_out, d_in = W.shape
        why = self.check_target(d_out, d_in)
        if why is not None:
            raise ConfigError(f"{name} ({d_out}x{d_in}): {why}")
        g = c.group or d_in
        bias = module.bias.data if module.bias is not None else None
        if c.feedback and c.weighted:
            assert stats is not None and stats.gram is not None
            H = stats.gram.float()
            b, _ = bcq_gptq(W.float().cpu(), H.cpu(), c.bits, g, rounds=c.rounds, refits=c.refits, damp=c.damp,
                            actorder=c.actorder, name=name, cache=self._factors)
            new = BCQLinear.from_bcq(b, bias, like=W)
            info = {"bits": c.bits, "group": g, "feedback": True, "error": relative_output_error(W, new.dense_weight(), H),
                    "error_metric": "rel_output_err", "bits_per_weight": new.storage_bits() / new.num_weights()}
            return PassResult(new, info)
        hdiag = stats.sq_sum if (c.weighted and stats is not None) else None
        b = bcq_quantize(W, c.bits, g, c.rounds, hdiag=hdiag, init=c.init)
        new = BCQLinear.from_bcq(b, bias, like=W)
        Wq = b.dequantize().to(W.device)
        if hdiag is not None:  # the weighted error the solver minimized, relative to the weight's
            hd = hdiag.to(W.device, torch.float64)
            err = float((((W.double() - Wq.double()) ** 2) * hd).sum() / (W.double() ** 2 * hd).sum().clamp_min(1e-300)) ** 0.5
        else:
            err = relative_output_error(W, Wq, None)
        info = {
            "bits": c.bits, "group": g, "init": c.init, "error": err,
            "error_metric": "rel_diagH_weighted_err" if hdiag is not None else "rel_weight_err",
            "bits_per_weight": new.storage_bits() / new.num_weights(),
        }
        return PassResult(new, info)
