"""``lq-lora`` (LQ-LoRA, arXiv 2311.12023): W ≈ Q + L₁L₂, a quantized matrix plus a low-rank term, by
alternating SVD and quantization (:func:`compress.solvers.lqlora.lq_decompose`), NormalFloat or
uniform levels.

``budget=`` chooses per matrix the (bits, group) configuration, and with ``rank_choice`` whether to
keep the low-rank term, by an integer program (:func:`compress.solvers.allocate.integer_program`)
under an average bits-per-weight budget that includes scales and the low-rank term. For the
allocation the error of each configuration is estimated with one alternation (rank-r SVD of W, then
quantization of the remainder) as an output error tr(Δ H Δᵀ) on the layer's calibration Gram H
(gathered over the model before the pass, one forward per layer), relative to the matrix's output
energy (``objective=relative``); the chosen configuration then runs the full alternation.

Example::

    compress run MODEL --pass lq-lora:bits=3,rank=32 --out out/lq3       # or lq-lora:budget=2.75
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn

from ..config import PassConfig, option, targets_option
from ..dtypes import element_bits
from ..errors import ConfigError
from ..modules.base import weight_of
from ..modules.lora import LoRALinear, branch_bits, branch_factor
from ..modules.quant import QuantLinear
from ..pipeline.stats import LinearStats
from ..registry import register_pass
from ..solvers.allocate import integer_program
from ..solvers.gptq import FactorCache, gptq_quantize, gptq_work
from ..solvers.lqlora import FEEDBACK_BITS, feedback_errors, lq_decompose, one_alternation_errors
from ..solvers.metrics import relative_output_error
from ..solvers.packing import packed_nbytes
from ..solvers.quant import SUPPORTED_BITS, Quantized, QuantSpec, group_error_check, quantize_rtn
from .base import Capabilities, LayerContext, LinearPass, PassPlan, PassResult, Stored

logger = logging.getLogger(__name__)

_GRID_BITS = (2, 3, 4, 8)
#: alternations the cost estimate assumes per matrix
LQ_ALTERNATIONS = 30
_GRID_GROUPS = (32, 64, 128)


@dataclass
class LQLoRAConfig(PassConfig):
    bits: int = option(3, "bits of the quantized part Q (ignored with budget=)", choices=SUPPORTED_BITS)
    group: int = option(64, "group size of Q along the input dimension (ignored with budget=)", min=0)
    rank: int = option(32, "rank of L1·L2", min=1)
    levels: str = option("nf", "quantization levels of Q: nf (NormalFloat, as the paper) or uniform", choices=("nf", "uniform"))
    iters: int = option(100, "maximum alternations (stops earlier when the error rises or stalls)", min=1)
    tol: float = option(1e-4, "stop when an alternation improves the reconstruction error by less than this (relative)", min=0.0)
    budget: float | None = option(None, "average bits per weight including scales and the low-rank term; chooses (bits, group) "
                                  "per matrix by an integer program", min=0.0, min_open=True)
    rank_choice: bool = option(True, "budget=: a matrix may also go without the low-rank term (rank 0) where those bits buy more "
                               "as codes; false keeps rank r on every matrix (the paper's setting, branches to fine-tune)")
    objective: str = option("relative", "budget's error per matrix: its output error tr(ΔHΔᵀ) relative to its output energy "
                            "tr(WHWᵀ) ('relative'), or absolute ('output')", choices=("relative", "output"))
    feedback: bool = option(True, "quantize Q with GPTQ's error feedback under the layer's calibration Gram XᵀX (static groups, "
                            "activation order) at 2-4 bits, after the alternation has chosen L1·L2; the budget's estimate uses "
                            "the same quantizer. false: round to nearest, as the paper (data-free)")
    data_aware: bool = option(False, "weight the decomposition by each input channel's activation RMS (calibration Gram diagonal)")
    branch_bits: int = option(0, "store L1 and L2 quantized to this many bits per row (0 = the model's dtype)", choices=(0, 4, 8))
    targets: str = targets_option("decompose")


def _q_bits(d_out: int, d_in: int, bits: int, group: int, levels: str) -> int:
    """Stored bits of a QuantLinear: packed codes + float16 scales + packed zero-points (uniform)."""
    g = group or d_in
    n_scales = d_out * (d_in // g)
    zeros = 0 if levels == "nf" else 8 * packed_nbytes(n_scales, bits)
    return 8 * packed_nbytes(d_out * d_in, bits) + 16 * n_scales + zeros


@register_pass
class LQLoRAPass(LinearPass[LQLoRAConfig]):
    """LQ-LoRA: quantized matrix plus a low-rank term, optionally under a bits budget (integer program)."""

    name = "lq-lora"
    accepts_reason = "it decomposes dense weights"

    def __init__(self, config: LQLoRAConfig) -> None:
        super().__init__(config)
        self._factors = FactorCache()  # q/k/v (and gate/up) have equal Grams: factor once
        self._choice: dict[str, tuple[int, int, int]] = {}

    def capabilities(self) -> Capabilities:
        c = self.config
        # the budget's errors are output errors: every layer's input Gram of the model as it is before the pass
        stats = ({"rms"} if c.data_aware else set()) | ({"gram"} if c.feedback else set())
        return Capabilities(requires_calibration=c.data_aware or c.feedback or c.budget is not None,
                            statistics=frozenset(stats), observe_once=True,
                            profile=frozenset({"gram"}) if c.budget is not None else frozenset())

    def produces(self, kinds: frozenset[str]) -> frozenset[str]:
        c = self.config
        return frozenset({"LoRALinear", "QuantLinear"}) if c.budget is not None and c.rank_choice else frozenset({"LoRALinear"})

    def work(self, d_out: int, d_in: int, tokens: int) -> float | None:
        c = self.config
        svd = 12.0 * d_out * d_in * min(d_out, d_in)
        # the alternations (about 30 measured), each a subspace iteration of width rank + 8 with its QR
        # factorizations and a round to nearest (constants set against bench/results/layer_cost.md)
        w = svd + LQ_ALTERNATIONS * (8.0 * d_out * d_in * (c.rank + 8) + 3000.0 * d_out * d_in)
        if c.budget is not None:
            w += svd + (gptq_work(d_out, d_in, tokens) if c.feedback else 0.0) + 24 * 2 * d_out * d_in**2
        return w + (gptq_work(d_out, d_in, tokens) if c.feedback else 0.0)

    def stored_bits(self, d_out: int, d_in: int, dtype: torch.dtype, before: Stored | None = None) -> int | None:
        """The codes with their scales (and zero-points) plus the low-rank term; a budget decides per matrix at run time."""
        c = self.config
        if c.budget is not None:
            return None
        return _q_bits(d_out, d_in, c.bits, c.group, c.levels) + branch_bits(d_out, d_in, c.rank, c.branch_bits, element_bits(dtype))

    def check_target(self, d_out: int, d_in: int, stored: Stored | None) -> str | None:
        c = self.config
        if c.rank >= min(d_out, d_in):
            return f"lq-lora rank {c.rank} must be below {min(d_out, d_in)}; lower rank="
        if c.budget is not None:
            if not any(d_in % g == 0 for g in _GRID_GROUPS):
                return f"no group size of {_GRID_GROUPS} divides its input dimension {d_in}"
            return None
        why = group_error_check(QuantSpec(bits=c.bits, group_size=c.group, levels=c.levels), d_out, d_in)
        return None if why is None else f"{why}; choose another group size"

    def prepare(self, model: nn.Module, adapter: Any, plan: PassPlan) -> None:
        self._adapter = adapter
        self._names: list[str] = []
        self._errors: list[list[float]] = []
        self._costs: list[list[float]] = []
        self._options: list[list[tuple[int, int, int]]] = []
        self._total = 0

    def profile_layer(self, index: int, layer: nn.Module, stats: Any) -> None:
        """Budget mode: each (bits, group, rank) option's output error tr(Δ H Δᵀ) on the calibration
        Gram H, with Δ = W − L − Q(W − L) and L the rank-r SVD of W (one alternation; r is the
        configured rank, or 0 with ``rank_choice``); divided by the matrix's output energy tr(W H Wᵀ)
        with ``objective=relative``."""
        c = self.config
        for group in self._adapter.groups(layer):
            for n in group:
                mod = layer.get_submodule(n)
                if not self.targets(n, mod):
                    continue
                full = f"{self._adapter.layers_path}.{index}.{n}"
                W = weight_of(mod).data.float().cpu()
                d_out, d_in = W.shape
                H = stats.linears[n].gram.float()
                grid = [(b, g) for b in _GRID_BITS for g in _GRID_GROUPS if d_in % g == 0]
                ranks = (c.rank, 0) if c.rank_choice else (c.rank,)
                estimate = feedback_errors if c.feedback else one_alternation_errors
                table = estimate(W, H, ranks, grid, c.levels, c.objective == "relative") if grid else []
                elt = 8 * weight_of(mod).element_size()
                opts = [o for o, _ in table]
                errs = [e for _, e in table]
                cst: list[float] = [_q_bits(d_out, d_in, b, g, c.levels) + (branch_bits(d_out, d_in, r, c.branch_bits, elt) if r else 0) for b, g, r in opts]
                if not opts:
                    raise ConfigError(f"{full}: no group size of {_GRID_GROUPS} divides its input dimension {d_in}")
                self._names.append(full)
                self._errors.append(errs)
                self._costs.append(cst)
                self._options.append(opts)
                self._total += d_out * d_in

    def profile_done(self) -> None:
        c = self.config
        assert c.budget is not None
        try:
            picks = integer_program(self._errors, self._costs, c.budget * self._total)
        except ValueError:
            minimum = sum(min(k) for k in self._costs) / self._total
            what = ("2-bit codes and scales, no low-rank term" if c.rank_choice
                    else f"2-bit codes, scales and the rank-{c.rank} term; lower rank=, set branch_bits= or rank_choice=true")
            raise ConfigError(
                f"lq-lora budget {c.budget} bits per weight is below the smallest reachable {minimum:.3f} ({what}); raise budget="
            ) from None
        self._choice = {n: self._options[k][p] for k, (n, p) in enumerate(zip(self._names, picks))}
        used = sum(self._costs[k][p] for k, p in enumerate(picks)) / self._total
        dropped = sum(1 for o in self._choice.values() if o[2] == 0)
        logger.info("lq-lora budget %.3f bits/weight: allocation uses %.4f (%d of %d matrices without the low-rank term)",
                    c.budget, used, dropped, len(self._choice))

    def apply(self, name: str, module: nn.Module, stats: LinearStats | None, ctx: LayerContext) -> PassResult:
        assert isinstance(module, nn.Linear)
        c = self.config
        W = module.weight.data
        d_out, d_in = W.shape
        bits, group, rank = self._choice.get(name, (c.bits, c.group, c.rank))
        spec = QuantSpec(bits=bits, group_size=group, levels=c.levels)
        why = group_error_check(spec, d_out, d_in)
        if why is not None:
            raise ConfigError(f"{name} ({d_out}x{d_in}): {why}; choose another group size")
        bias = module.bias.data if module.bias is not None else None
        H = stats.gram.float().cpu() if c.feedback and stats is not None and stats.gram is not None else None
        metric = {"error_metric": "rel_output_err" if H is not None else "rel_weight_err"}

        def codes(R: torch.Tensor) -> Quantized:
            if H is None or bits not in FEEDBACK_BITS:
                return quantize_rtn(R, spec)
            return gptq_quantize(R, H, spec, actorder=True, static_groups=True, name=name, cache=self._factors)[0]

        if rank == 0:  # budget mode chose codes over the low-rank term for this matrix
            q = QuantLinear.from_quantized(codes(W.float().cpu()), bias, like=W)
            info = {"bits": bits, "group": group, "rank": 0, "levels": c.levels, "feedback": H is not None,
                    "error": relative_output_error(W, q.dense_weight().detach(), H), **metric,
                    "bits_per_weight": q.storage_bits() / q.num_weights()}
            return PassResult(q, info)
        if c.rank >= min(d_out, d_in):
            raise ConfigError(f"{name} ({d_out}x{d_in}): lq-lora rank {c.rank} must be below {min(d_out, d_in)}")
        col_w = None
        if c.data_aware:
            assert stats is not None
            col_w = stats.rms_value
        res = lq_decompose(W, rank, spec, iters=c.iters, tol=c.tol, col_weight=col_w)
        qz = res.q if H is None else codes(W.float().cpu() - res.L1 @ res.L2)
        base = QuantLinear.from_quantized(qz, bias, like=W)
        lora = LoRALinear(base, branch_factor(res.L2, W, c.branch_bits), branch_factor(res.L1, W, c.branch_bits))
        info = {
            "bits": bits, "group": group, "rank": rank, "levels": c.levels, "iterations": len(res.errors), "feedback": H is not None,
            "errors": [round(e, 6) for e in res.errors],
            "error": relative_output_error(W, lora.dense_weight().detach(), H), **metric,
            "bits_per_weight": lora.storage_bits() / lora.num_weights(),
        }
        return PassResult(lora, info)
