"""Low-rank compensation passes: ``eora`` (after any compressing pass) and ``lq-lora``.

- ``eora`` (EoRA, arXiv 2410.21271): for each layer an earlier pass of the recipe compressed, the
  error Δ = W − W_c is approximated by a rank-r branch in the eigenspace of the layer's input Gram
  matrix (:func:`compress.solvers.eora.compensate`); the layer becomes
  :class:`~compress.modules.LoRALinear` (the compressed module plus the branch). ``calib=`` takes the
  eigenspace statistics from another text source (task-specific compensation); ``variant=svd|act``
  are the ablations; ``branch_bits=4|8`` quantizes the branch factors.
- ``lq-lora`` (arXiv 2311.12023): W ≈ Q + L₁L₂ by alternating SVD and quantization
  (:func:`compress.solvers.lqlora.lq_decompose`), NormalFloat or uniform levels; ``budget=`` chooses
  per matrix the (bits, group) configuration by an integer program under an average
  bits-per-weight budget that includes scales and the low-rank term. For the allocation the error of
  each configuration is estimated with one alternation (rank-r SVD of W, then quantization of the
  remainder) as an output error tr(Δ H Δᵀ) on the layer's calibration Gram H (gathered over the
  model before the pass, one forward per layer); the chosen configuration then runs the full
  alternation.

Example recipe::

    passes:
      - pass: gptq
        bits: 3
        group: 64
      - pass: eora
        rank: 32
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn

from ..config import PassConfig, option
from ..errors import ConfigError
from ..modules import LoRALinear, QuantLinear, storage_bits
from ..modules.base import dense_weight_of
from ..pipeline.stats import LinearStats
from ..registry import register_pass
from ..solvers.eora import compensate
from ..solvers.lowrank import relative_output_error
from ..solvers.lqlora import allocate, lq_decompose
from ..solvers.packing import packed_nbytes
from ..solvers.quant import SUPPORTED_BITS, QuantSpec, group_error_check, quantize_rtn
from .base import ANY, Capabilities, Pass, PassResult, Stored, layer_relative_name, matches

logger = logging.getLogger(__name__)
_TARGETS_HELP = "which linears of each decoder layer: glob(s) on names like 'mlp.down_proj', '|'-separated"


def _branch_cost(d_out: int, d_in: int, rank: int, bits: int, elt_bits: int) -> int:
    """Stored bits of a rank-r branch B (d_out × r) · A (r × d_in): plain factors at ``elt_bits`` each,
    or codes of ``bits`` with one float16 scale and one ``bits``-bit zero-point per factor row."""
    if not bits:
        return rank * (d_out + d_in) * elt_bits
    return rank * (d_out + d_in) * bits + (rank + d_out) * (16 + bits)


def _factor(weight: torch.Tensor, like: torch.Tensor, bits: int) -> nn.Module:
    """A bias-free linear holding one branch factor (out × in), quantized per row when bits > 0."""
    out_f, in_f = weight.shape
    if bits:
        return QuantLinear.from_quantized(quantize_rtn(weight.float(), QuantSpec(bits=bits, group_size=0)), None, like=like)
    lin = nn.Linear(in_f, out_f, bias=False, dtype=like.dtype, device=like.device)
    with torch.no_grad():
        lin.weight.copy_(weight)
    return lin


@dataclass
class EoRAConfig(PassConfig):
    rank: int = option(32, "rank of the compensation branch", min=1)
    variant: str = option("eigen", "eigen (EoRA), svd (plain SVD of the error; ablation), act (diagonal activation scaling; ablation)",
                          choices=("eigen", "svd", "act"))
    calib: str = option("", "text source of the eigenspace statistics (c4, wikitext2, ptb or a file); empty = the recipe's calibration")
    branch_bits: int = option(0, "quantize the branch factors to this many bits (0 = the model's dtype)", choices=(0, 4, 8))
    targets: str = option("*", _TARGETS_HELP)


@register_pass
class EoRAPass(Pass):
    """EoRA: eigenspace low-rank compensation of an earlier pass's error."""

    name = "eora"
    config_cls = EoRAConfig
    consumes_previous = True
    accepts = frozenset({ANY})

    def __init__(self, config: PassConfig) -> None:
        super().__init__(config)
        assert isinstance(config, EoRAConfig)
        self.cfg = config

    @classmethod
    def capabilities(cls, config: PassConfig) -> Capabilities:
        assert isinstance(config, EoRAConfig)
        calib = config.variant != "svd"  # the plain-SVD ablation is data-free
        return Capabilities(requires_calibration=calib, statistics=frozenset({"gram"}) if calib else frozenset(),
                            needs_original=True, calib_source=(config.calib or None) if calib else None)

    @classmethod
    def produces(cls, config: PassConfig) -> frozenset[str]:
        return frozenset({"LoRALinear", "Linear"})  # a layer no earlier pass changed stays as it is

    def check_shape(self, d_out: int, d_in: int) -> str | None:
        if self.cfg.rank >= min(d_out, d_in):
            return f"eora rank {self.cfg.rank} must be below {min(d_out, d_in)}; lower rank="
        return None

    def check_target(self, d_out: int, d_in: int, stored: Stored | None) -> str | None:
        why = self.check_shape(d_out, d_in)
        if why is not None or stored is None or stored.by is None or stored.bits is None:
            return why  # untouched targets are left alone; an allocation known only at run time is checked then
        return self._cost_check(d_out, d_in, stored.elt_bits * d_out * d_in - stored.bits, stored.elt_bits, stored.by)

    def _cost_check(self, d_out: int, d_in: int, saved: int, elt_bits: int, by: str) -> str | None:
        """Why a branch of the configured rank does not pay for itself on a target that ``by`` left
        ``saved`` bits smaller than dense (None: it does)."""
        r, bb = self.cfg.rank, self.cfg.branch_bits
        cost = _branch_cost(d_out, d_in, r, bb, elt_bits)
        if cost < saved:
            return None
        fits = [k for k in range(r - 1, 0, -1) if _branch_cost(d_out, d_in, k, bb, elt_bits) < saved]
        fix = f"use rank={fits[0]} or lower" if fits else f"no rank pays for itself here; narrow eora with targets= or compress more with {by}"
        if not bb and _branch_cost(d_out, d_in, r, 8, elt_bits) < saved:
            fix += " (or branch_bits=8)"
        return f"an eora branch of rank {r} costs {cost:,} bits, more than the {max(saved, 0):,} bits saved on this layer by {by}; {fix}"

    def targets(self, name: str, module: nn.Module) -> bool:
        return matches(name, self.cfg.targets)

    def apply(self, name: str, module: nn.Module, stats: LinearStats | None, context: Any = None) -> PassResult:
        rel = layer_relative_name(name, context.adapter.layers_path)
        W = context.original(rel)
        Wc = dense_weight_of(module).detach().to(W.dtype)
        delta = (W - Wc).double()
        d_out, d_in = W.shape
        if float(delta.abs().max()) == 0.0:
            return PassResult(None, {"eora": "layer unchanged by earlier passes: nothing to compensate"})
        r = self.cfg.rank
        if r >= min(d_out, d_in):
            raise ConfigError(f"{name} ({d_out}x{d_in}): eora rank {r} must be below {min(d_out, d_in)}")
        why = self._cost_check(d_out, d_in, 8 * W.element_size() * d_out * d_in - storage_bits(module), 8 * W.element_size(), "the earlier passes")
        if why is not None:  # checked up front where the earlier passes' storage was known; here after a global allocation
            raise ConfigError(f"{name}: {why}")
        H = stats.gram if stats is not None else None
        B, A, _ = compensate(delta, r, H=H, variant=self.cfg.variant, n_tokens=stats.n_tokens if stats else 1)
        lora = LoRALinear(module, _factor(A, W, self.cfg.branch_bits), _factor(B, W, self.cfg.branch_bits))
        a_used, b_used = lora.branch_weights()
        info = {
            "rank": r, "variant": self.cfg.variant, "branch_bits": self.cfg.branch_bits,
            "error_before": relative_output_error(W, Wc, H),
            "error": relative_output_error(W, Wc + (b_used @ a_used).to(W.dtype), H),
            "error_metric": "rel_output_err" if H is not None else "rel_weight_err",
        }
        return PassResult(lora, info)


_GRID_BITS = (2, 3, 4, 8)
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
    data_aware: bool = option(False, "weight the decomposition by each input channel's activation RMS (calibration Gram diagonal)")
    branch_bits: int = option(0, "store L1 and L2 quantized to this many bits per row (0 = the model's dtype)", choices=(0, 4, 8))
    targets: str = option("*", _TARGETS_HELP)


def _q_bits(d_out: int, d_in: int, bits: int, group: int, levels: str) -> int:
    """Stored bits of a QuantLinear: packed codes + float16 scales + packed zero-points (uniform)."""
    g = group or d_in
    n_scales = d_out * (d_in // g)
    zeros = 0 if levels == "nf" else 8 * packed_nbytes(n_scales, bits)
    return 8 * packed_nbytes(d_out * d_in, bits) + 16 * n_scales + zeros


@register_pass
class LQLoRAPass(Pass):
    """LQ-LoRA: quantized matrix plus a low-rank term, optionally under a bits budget (integer program)."""

    name = "lq-lora"
    config_cls = LQLoRAConfig
    accepts_reason = "it decomposes dense weights"

    def __init__(self, config: PassConfig) -> None:
        super().__init__(config)
        assert isinstance(config, LQLoRAConfig)
        self.cfg = config
        self._choice: dict[str, tuple[int, int, int]] = {}

    @classmethod
    def capabilities(cls, config: PassConfig) -> Capabilities:
        assert isinstance(config, LQLoRAConfig)
        # the budget's errors are output errors: every layer's input Gram of the model as it is before the pass
        return Capabilities(requires_calibration=config.data_aware or config.budget is not None,
                            statistics=frozenset({"rms"}) if config.data_aware else frozenset(),
                            profile=frozenset({"gram"}) if config.budget is not None else frozenset())

    @classmethod
    def produces(cls, config: PassConfig) -> frozenset[str]:
        assert isinstance(config, LQLoRAConfig)
        return frozenset({"LoRALinear", "QuantLinear"}) if config.budget is not None and config.rank_choice else frozenset({"LoRALinear"})

    def check_shape(self, d_out: int, d_in: int) -> str | None:
        c = self.cfg
        if c.rank >= min(d_out, d_in):
            return f"lq-lora rank {c.rank} must be below {min(d_out, d_in)}; lower rank="
        if c.budget is not None:
            if not any(d_in % g == 0 for g in _GRID_GROUPS):
                return f"no group size of {_GRID_GROUPS} divides its input dimension {d_in}"
            return None
        why = group_error_check(QuantSpec(bits=c.bits, group_size=c.group, levels=c.levels), d_out, d_in)
        return None if why is None else f"{why}; choose another group size"

    def prepare(self, model: nn.Module, adapter: Any) -> None:
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
        c = self.cfg
        for group in self._adapter.groups(layer):
            for n in group:
                mod = layer.get_submodule(n)
                if not self.targets(n, mod):
                    continue
                full = f"{self._adapter.layers_path}.{index}.{n}"
                W = mod.weight.data.float().cpu()
                d_out, d_in = W.shape
                H = stats.linears[n].gram.float()
                U, S, Vh = torch.linalg.svd(W.double(), full_matrices=False)
                # absolute output errors are dominated by the few matrices with the largest activations
                # (measured: at 4.02 bits they sent both first layers to 2-bit codes); relative ones are not
                energy = max(float(((W @ H) * W).sum()), 1e-30) if c.objective == "relative" else 1.0
                opts, errs, cst = [], [], []
                for r in ((c.rank, 0) if c.rank_choice else (c.rank,)):
                    R = W - ((U[:, :r] * S[:r]) @ Vh[:r]).float() if r else W
                    branch = _branch_cost(d_out, d_in, r, c.branch_bits, 8 * mod.weight.element_size()) if r else 0
                    for b in _GRID_BITS:
                        for g in _GRID_GROUPS:
                            if d_in % g:
                                continue
                            D = R - quantize_rtn(R, QuantSpec(bits=b, group_size=g, levels=c.levels)).dequantize()
                            opts.append((b, g, r))
                            errs.append(float(((D @ H) * D).sum()) / energy)
                            cst.append(_q_bits(d_out, d_in, b, g, c.levels) + branch)
                if not opts:
                    raise ConfigError(f"{full}: no group size of {_GRID_GROUPS} divides its input dimension {d_in}")
                self._names.append(full)
                self._errors.append(errs)
                self._costs.append(cst)
                self._options.append(opts)
                self._total += d_out * d_in

    def profile_done(self) -> None:
        c = self.cfg
        assert c.budget is not None
        try:
            picks = allocate(self._errors, self._costs, c.budget * self._total)
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

    def apply(self, name: str, module: nn.Module, stats: LinearStats | None, context: Any = None) -> PassResult:
        assert isinstance(module, nn.Linear)
        c = self.cfg
        W = module.weight.data
        d_out, d_in = W.shape
        bits, group, rank = self._choice.get(name, (c.bits, c.group, c.rank))
        spec = QuantSpec(bits=bits, group_size=group, levels=c.levels)
        why = group_error_check(spec, d_out, d_in)
        if why is not None:
            raise ConfigError(f"{name} ({d_out}x{d_in}): {why}; choose another group size")
        bias = module.bias.data if module.bias is not None else None
        if rank == 0:  # budget mode chose codes over the low-rank term for this matrix
            q = QuantLinear.from_quantized(quantize_rtn(W.float(), spec), bias, like=W)
            info = {"bits": bits, "group": group, "rank": 0, "levels": c.levels,
                    "error": relative_output_error(W, q.dense_weight().detach(), None), "error_metric": "rel_weight_err",
                    "bits_per_weight": q.storage_bits() / q.num_weights()}
            return PassResult(q, info)
        if c.rank >= min(d_out, d_in):
            raise ConfigError(f"{name} ({d_out}x{d_in}): lq-lora rank {c.rank} must be below {min(d_out, d_in)}")
        col_w = None
        if c.data_aware:
            assert stats is not None
            col_w = stats.rms_value
        res = lq_decompose(W, rank, spec, iters=c.iters, tol=c.tol, col_weight=col_w)
        base = QuantLinear.from_quantized(res.q, bias, like=W)
        lora = LoRALinear(base, _factor(res.L2, W, c.branch_bits), _factor(res.L1, W, c.branch_bits))
        info = {
            "bits": bits, "group": group, "rank": rank, "levels": c.levels, "iterations": len(res.errors),
            "errors": [round(e, 6) for e in res.errors],
            "error": relative_output_error(W, lora.dense_weight().detach(), None), "error_metric": "rel_weight_err",
            "bits_per_weight": lora.storage_bits() / lora.num_weights(),
        }
        return PassResult(lora, info)
