"""Weight quantization passes: ``rtn`` and ``gptq`` with per-OC, per-IC or adaptive (AdaDim) groups.

- ``rtn``: round-to-nearest on the uniform grid (data-free unless ``dim=ada`` or ``clip`` asks for
  calibration).
- ``gptq``: GPTQ (Frantar et al., arXiv 2210.17323): Hessian H = XᵀX from the layer inputs, damping
  ``damp``·mean(diag H), Cholesky of H⁻¹ in float64, column-block sweep with error feedback, optional
  activation order and static groups (see :mod:`compress.solvers.gptq`).
- ``dim``: ``oc`` groups along the input dimension of each output row (the usual layout), ``ic``
  groups along the output dimension within each input column (per-IC, Heo et al., arXiv 2309.15531),
  ``ada`` (AdaDim): quantize both ways and keep the one with the lower output error on the
  calibration inputs of the sub-block that owns the linear (q/k/v through the attention block,
  gate/up through the MLP, o/down on their own outputs). The choice is recorded per layer.

A compressed module that offers quantizable parts (a dictionary layer's atoms and coefficient
values, see :class:`~compress.modules.base.QuantPart`) is quantized part by part: a part that
multiplies the layer's input with per-output-channel groups along it (GPTQ with the layer's input
Gram), the others round to nearest in rows of ``group`` values.

Lifecycle: observe XᵀX (gptq, ada, clip), apply: quantize one linear into a packed
:class:`~compress.modules.quant.QuantLinear`.

Example recipe::

    passes:
      - pass: gptq
        bits: 3
        group: 64
        dim: ada
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from typing import Any, TypeVar

import torch
from torch import nn

from ..config import PassConfig, check_propagate, option, propagate_option, targets_option
from ..errors import ConfigError
from ..modules.base import MODULE_TYPES, CompressedLinear
from ..modules.ggml import GGMLLinear
from ..modules.quant import QuantLinear
from ..pipeline.stats import LinearStats
from ..registry import register_pass
from ..solvers import ggml
from ..solvers.ggml import TYPES as GGML_TYPES
from ..solvers.gptq import FactorCache, gptq_ggml, gptq_quantize, gptq_work
from ..solvers.metrics import relative_output_error
from ..solvers.quant import SUPPORTED_BITS, Quantized, QuantSpec, group_error_check, quantize_rtn
from .base import LINEAR, QUANTIZABLE, Capabilities, LayerContext, LinearPass, PassResult, Stored, layer_relative_name, meta_storage_bits

logger = logging.getLogger(__name__)

#: a linear with at least this fraction of exact zeros is treated as pruned: GPTQ keeps its zeros
PRUNED_FRACTION = 0.25


@dataclass
class RTNConfig(PassConfig):
    bits: int = option(4, "bits per weight code", choices=SUPPORTED_BITS)
    group: int = option(128, "group size along the grouped dimension (0 = whole channel)", min=0)
    dim: str = option("oc", "grouping: oc (per-output-channel), ic (per-input-channel), ada (AdaDim: per layer, lower output error)", choices=("oc", "ic", "ada"))
    sym: bool = option(False, "symmetric quantization (no zero-point stored)")
    clip: bool = option(False, "search a range shrink per group minimizing the (diag-H weighted) error")
    targets: str = targets_option("quantize")
    format: str = option("int", "storage grid: int (bits/group/sym as given) or one of llama.cpp's block types, stored byte for byte "
                         "as a GGUF file holds them (q8_0, q4_0, q5_0, q4_1, iq4_nl, q6_k, q4_k, q3_k, q2_k; bits/group/sym "
                         "then come from the type; k-quants fall back as llama.cpp does where 256 does not divide a width)",
                         choices=("int", *GGML_TYPES))
    sequential: bool = option(False, "observe each sub-group's inputs after the sub-groups before it in the layer were quantized "
                              "(one forward per sub-group); false: every sub-group's from one forward of the layer as the pass finds it "
                              "(faster; equal quality measured, bench/results/speed.md)")
    propagate: str = propagate_option()


    def validate(self) -> None:
        super().validate()
        check_propagate(self)
        if self.propagate == "dense" and self.pass_name == "rtn" and not (self.clip or self.dim == "ada"):
            raise ConfigError("pass 'rtn': propagate=dense takes the outputs of the statistics forward, which rtn runs only with "
                              "clip=true or dim=ada; add clip=true or drop propagate=dense")
        if self.format != "int" and self.dim != "oc":
            raise ConfigError(f"pass '{self.pass_name}': format={self.format} groups along the input of each output row; "
                              f"dim={self.dim} cannot apply: use dim=oc or format=int")


@dataclass
class GPTQConfig(RTNConfig):
    clip: bool = option(True, "search a range shrink per group minimizing the diag(H)-weighted error (SmolLM2 W3 g64 with "
                        "activation order: 35.2 vs 42.6 without, bench/results/quant.md)")
    damp: float = option(0.01, "damping added to diag(H), as a fraction of its mean", min=0.0, max=1.0)
    propagate: str = propagate_option("compressed")
    blocksize: int = option(128, "columns per lazy-update block", min=1)
    actorder: bool = option(True, "quantize columns in order of decreasing diag(H), group parameters from the original weights "
                            "(static groups); SmolLM2 W3 g64: 42.6 vs 59.8 without (bench/results/quant.md)")
    static_groups: bool = option(False, "compute per-OC group parameters from the original weights up front")


Q = TypeVar("Q", bound=RTNConfig)


class _QuantPass(LinearPass[Q]):
    """Shared apply: choose the grouping (fixed or AdaDim), quantize, pack; a module with
    quantizable parts is quantized part by part."""

    accepts = frozenset({LINEAR, QUANTIZABLE})
    accepts_reason = "it quantizes dense weights and modules with quantizable parts; prune unstructured or 4:8 (stored dense, zeros kept) before quantizing"

    def produces(self, kinds: frozenset[str]) -> frozenset[str]:
        out = {q for k in kinds if (q := _quantized_as(k))}
        if any(_quantized_as(k) is None for k in kinds):
            out.add("QuantLinear" if self.config.format == "int" else "GGMLLinear")
        return frozenset(out)

    def check_target(self, d_out: int, d_in: int, stored: Stored | None) -> str | None:
        parted = sorted(k for k in (stored.kinds if stored is not None else ()) if _quantized_as(k))
        if parted and self.config.format != "int":
            return (f"a {parted[0]}'s parts are quantized on the integer grid; format={self.config.format} holds whole "
                    "linears only: use format=int")
        if parted and self.config.dim != "oc":
            return (f"a {parted[0]}'s parts are quantized with per-output-channel groups (along the input); "
                    f"dim={self.config.dim} cannot apply to them: use dim=oc")
        return self.check_shape(d_out, d_in)

    def check_shape(self, d_out: int, d_in: int) -> str | None:
        if self.config.format != "int":
            if ggml.type_for(self.config.format, d_in) is None:
                t = ggml.TYPES[self.config.format]
                fb = ggml.FALLBACK.get(t.name)
                sizes = f"{t.block}" + (f" (or {ggml.TYPES[fb].block} for its fallback {fb})" if fb else "")
                return f"format={t.name} needs an input width divisible by {sizes}; this linear's is {d_in}: use format=int"
            return None
        dims = ["oc", "ic"] if self.config.dim == "ada" else [self.config.dim]
        why = [group_error_check(self._spec(dim), d_out, d_in) for dim in dims]
        return None if any(w is None for w in why) else f"{why[0]}; choose another group size"

    def stored_bits(self, d_out: int, d_in: int, dtype: torch.dtype, before: Stored | None = None) -> int | None:
        c = self.config
        if c.format != "int":
            t = ggml.type_for(c.format, d_in)
            return None if t is None else meta_storage_bits(GGMLLinear, d_in, d_out, t.name, dtype=dtype)
        dims = [d for d in (["oc", "ic"] if c.dim == "ada" else [c.dim]) if group_error_check(self._spec(d), d_out, d_in) is None]
        if not dims:
            return None
        # AdaDim picks per layer; the larger of the two layouts bounds what is stored
        return max(meta_storage_bits(QuantLinear, d_in, d_out, c.bits, c.group, dim=d, sym=c.sym, dtype=dtype) for d in dims)

    def targets(self, name: str, module: nn.Module) -> bool:
        if getattr(module, "is_sparse_24", False) and super().targets(name, _LINEAR_PROBE):
            raise ConfigError(
                f"'{name}' is stored 2:4-compressed ({type(module).__name__}); quantizing its kept values into a "
                "packed 2:4 form is not supported yet and densifying it would lose the format: quantize without the 2:4 "
                "pass, or prune unstructured/4:8 (stored dense) before quantizing"
            )
        return super().targets(name, module)

    def _spec(self, dim: str) -> QuantSpec:
        c = self.config
        return QuantSpec(bits=c.bits, group_size=c.group, sym=c.sym, dim=dim, clip=c.clip)

    def quantize(self, name: str, W: torch.Tensor, spec: QuantSpec, stats: LinearStats | None) -> Quantized:
        raise NotImplementedError

    def quantize_ggml(self, name: str, W: torch.Tensor, t: ggml.GGMLType, stats: LinearStats | None) -> torch.Tensor:
        """The stored bytes of W on llama.cpp block type ``t``."""
        raise NotImplementedError

    def _apply_ggml(self, name: str, module: nn.Linear, stats: LinearStats | None) -> PassResult:
        W = module.weight.data
        d_out, d_in = W.shape
        t = ggml.type_for(self.config.format, d_in)
        if t is None:
            raise ConfigError(f"{name} ({d_out}x{d_in}): {self.check_shape(d_out, d_in)}")
        if float((W == 0).float().mean()) >= PRUNED_FRACTION:
            raise ConfigError(f"{name} is pruned ({float((W == 0).float().mean()):.0%} zeros); format={self.config.format} "
                              "does not keep exact zeros through the sweep: use format=int after pruning")
        bias = module.bias.data if module.bias is not None else None
        new = GGMLLinear.from_blocks(self.quantize_ggml(name, W, t, stats), t.name, d_in, bias, like=W)
        H = stats.gram if stats is not None else None
        info: dict[str, Any] = {"format": self.config.format, "type": t.name, "bits_per_weight": new.storage_bits() / new.num_weights()}
        info["error"] = relative_output_error(W, new.dense_weight(), H)
        info["error_metric"] = "rel_output_err" if H is not None else "rel_weight_err"
        return PassResult(new, info)

    def apply(self, name: str, module: nn.Module, stats: LinearStats | None, ctx: LayerContext) -> PassResult:
        if isinstance(module, CompressedLinear):
            return self._apply_parts(name, module, stats)
        assert isinstance(module, nn.Linear)
        if self.config.format != "int":
            return self._apply_ggml(name, module, stats)
        W = module.weight.data
        d_out, d_in = W.shape
        dims = ["oc", "ic"] if self.config.dim == "ada" else [self.config.dim]
        why = {dim: group_error_check(self._spec(dim), d_out, d_in) for dim in dims}
        feasible = [dim for dim in dims if why[dim] is None]
        if not feasible:
            raise ConfigError(f"{name} ({d_out}x{d_in}): {why[dims[0]]}; choose another group size")
        if len(feasible) < len(dims):
            logger.info("%s: AdaDim considers only dim=%s (%s)", name, feasible[0], why[[d for d in dims if d not in feasible][0]])
        dims = feasible
        bias = module.bias.data if module.bias is not None else None
        candidates = {dim: self.quantize(name, W, self._spec(dim), stats) for dim in dims}
        info: dict[str, Any] = {"bits": self.config.bits, "group": self.config.group}
        H = stats.gram if stats is not None else None
        if len(candidates) == 1:
            dim = dims[0]
        else:
            errors = self._ada_errors(name, candidates, bias, W, H, ctx)
            dim = min(errors, key=lambda k: errors[k])
            info["ada_errors"] = errors
        qz = candidates[dim]
        info["dim"] = dim
        info["error"] = relative_output_error(W, qz.dequantize(), H)
        info["error_metric"] = "rel_output_err" if H is not None else "rel_weight_err"
        new = QuantLinear.from_quantized(qz, bias, like=W)
        info["bits_per_weight"] = new.storage_bits() / new.num_weights()
        return PassResult(new, info)

    def _apply_parts(self, name: str, module: CompressedLinear, stats: LinearStats | None) -> PassResult:
        """Quantize each part the module offers: parts reading the layer's input with the pass's own
        method and the input statistics, the others round to nearest in rows of ``group`` values."""
        c = self.config
        W = module.dense_weight()
        g = c.group or 128
        info: dict[str, Any] = {"bits": c.bits, "group": c.group, "dim": "oc"}
        quantized: dict[str, nn.Module] = {}
        for part in module.quantizable_parts():
            M = part.matrix(g)
            if part.reads_input:
                qz = self.quantize(name, M, self._spec("oc"), stats)
            else:
                qz = quantize_rtn(M, QuantSpec(bits=c.bits, group_size=g, sym=c.sym, dim="oc"))
                info[f"{part.name}_group"] = g
            quantized[part.name] = QuantLinear.from_quantized(qz, None, like=M)
        new = module.with_quantized_parts(quantized)
        H = stats.gram if stats is not None else None
        info["error"] = relative_output_error(W, new.dense_weight(), H)
        info["error_metric"] = "rel_output_err" if H is not None else "rel_weight_err"
        info["bits_per_weight"] = new.storage_bits() / (module.in_features * module.out_features)
        return PassResult(new, info)

    def _ada_errors(
        self, name: str, candidates: dict[str, Quantized], bias: torch.Tensor | None, W: torch.Tensor,
        H: torch.Tensor | None, ctx: LayerContext | None,
    ) -> dict[str, float]:
        """AdaDim: output error of each candidate through the owning sub-block, else on the layer's own output."""
        rel = name.split(".", 3)[-1] if ctx is None else layer_relative_name(name, ctx.adapter.layers_path)
        block = ctx.adapter.block_of(rel) if ctx is not None else None
        errors = {}
        for dim, qz in candidates.items():
            if block is not None and ctx is not None:
                errors[dim] = ctx.block_error(block, {rel: QuantLinear.from_quantized(qz, bias, like=W)})
            else:
                errors[dim] = relative_output_error(W, qz.dequantize(), H)
        return errors


def _quantized_as(kind: str) -> str | None:
    cls = MODULE_TYPES.get(kind)
    return cls.quantized_as if cls is not None else None


#: a stand-in nn.Linear to ask the name filter about a non-linear module
_LINEAR_PROBE = nn.Linear(1, 1, bias=False, device="meta")


@register_pass
class RTNPass(_QuantPass[RTNConfig]):
    """Round-to-nearest uniform quantization (per-OC / per-IC / AdaDim groups)."""

    name = "rtn"

    def capabilities(self) -> Capabilities:
        c = self.config
        needs = c.dim == "ada" or c.clip
        # AdaDim runs sub-blocks on the layer's inputs
        return Capabilities(requires_calibration=needs, statistics=frozenset({"gram"}) if needs else frozenset(),
                            uses_layer_inputs=c.dim == "ada", observe_once=not c.sequential,
                            propagate_dense=c.propagate == "dense")

    def work(self, d_out: int, d_in: int, tokens: int) -> float | None:
        c = self.config
        return (tokens * d_in**2 if c.clip or c.dim == "ada" else 0.0) + 12.0 * d_out * d_in

    def quantize(self, name: str, W: torch.Tensor, spec: QuantSpec, stats: LinearStats | None) -> Quantized:
        hdiag = stats.gram.diagonal() if stats is not None and stats.gram is not None else None
        return quantize_rtn(W, spec, hdiag)

    def quantize_ggml(self, name: str, W: torch.Tensor, t: ggml.GGMLType, stats: LinearStats | None) -> torch.Tensor:
        hdiag = stats.gram.diagonal() if stats is not None and stats.gram is not None else None
        return ggml.quantize(W, t, hdiag)


@register_pass
class GPTQPass(_QuantPass[GPTQConfig]):
    """GPTQ: second-order error feedback (per-OC / per-IC / AdaDim groups)."""

    name = "gptq"

    def __init__(self, config: GPTQConfig) -> None:
        super().__init__(config)
        self._factors = FactorCache()  # q/k/v (and gate/up) have equal Grams: factor once

    def capabilities(self) -> Capabilities:
        c = self.config
        return Capabilities(requires_calibration=True, statistics=frozenset({"gram"}), uses_layer_inputs=c.dim == "ada",
                            observe_once=not c.sequential, propagate_dense=c.propagate == "dense")

    def work(self, d_out: int, d_in: int, tokens: int) -> float | None:
        return gptq_work(d_out, d_in, tokens) * (2 if self.config.dim == "ada" else 1)

    def quantize(self, name: str, W: torch.Tensor, spec: QuantSpec, stats: LinearStats | None) -> Quantized:
        assert stats is not None and stats.gram is not None
        c = self.config
        # a layer already pruned (stored dense with its zeros) keeps its mask through the updates
        zeros = W == 0
        keep = ~zeros if float(zeros.float().mean()) >= PRUNED_FRACTION else None
        qz, _ = gptq_quantize(
            W, stats.gram, spec, blocksize=c.blocksize, damp=c.damp, actorder=c.actorder,
            static_groups=c.static_groups, keep=keep, name=name, cache=self._factors,
        )
        return qz

    def quantize_ggml(self, name: str, W: torch.Tensor, t: ggml.GGMLType, stats: LinearStats | None) -> torch.Tensor:
        assert stats is not None and stats.gram is not None
        c = self.config
        blocks, _ = gptq_ggml(W, stats.gram, t, blocksize=c.blocksize, damp=c.damp, actorder=c.actorder, name=name,
                              cache=self._factors)
        return blocks
