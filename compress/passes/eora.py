"""``eora`` (EoRA, arXiv 2410.21271): low-rank compensation of an earlier pass's error.

For each layer an earlier pass of the recipe compressed, the error Δ = W − W_c is approximated by a
rank-r branch in the eigenspace of the layer's input Gram matrix (:func:`compress.solvers.eora.compensate`);
the layer becomes :class:`~compress.modules.lora.LoRALinear` (the compressed module plus the branch).
``calib=`` takes the eigenspace statistics from another text source (task-specific compensation);
``variant=svd|act`` are the ablations; ``branch_bits=4|8`` quantizes the branch factors. A branch that
costs more bits than the earlier passes saved on a layer is refused before any compute.

Example recipe::

    passes:
      - pass: gptq
        bits: 3
        group: 64
      - pass: eora
        rank: 32
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn

from ..config import PassConfig, option, targets_option
from ..errors import ConfigError
from ..modules.base import dense_weight_of, storage_bits
from ..modules.lora import LoRALinear, branch_bits, branch_factor
from ..pipeline.stats import LinearStats
from ..registry import register_pass
from ..solvers.eora import compensate
from ..solvers.metrics import relative_output_error
from .base import ANY, Capabilities, LayerContext, LinearPass, PassResult, Stored, layer_relative_name


@dataclass
class EoRAConfig(PassConfig):
    rank: int = option(32, "rank of the compensation branch", min=1)
    variant: str = option("eigen", "eigen (EoRA), svd (plain SVD of the error; ablation), act (diagonal activation scaling; ablation)",
                          choices=("eigen", "svd", "act"))
    calib: str = option("", "text source of the eigenspace statistics (c4, wikitext2, ptb or a file); empty = the recipe's calibration")
    branch_bits: int = option(0, "quantize the branch factors to this many bits (0 = the model's dtype)", choices=(0, 4, 8))
    targets: str = targets_option("compensate")


@register_pass
class EoRAPass(LinearPass[EoRAConfig]):
    """EoRA: eigenspace low-rank compensation of an earlier pass's error."""

    name = "eora"
    consumes_previous = True
    accepts = frozenset({ANY})

    def work(self, d_out: int, d_in: int, tokens: int) -> float | None:
        return tokens * d_in**2 + 9.0 * d_in**3 + 2.0 * d_out * d_in**2  # Gram, its eigenbasis, the projected error

    def capabilities(self) -> Capabilities:
        c = self.config
        calib = c.variant != "svd"  # the plain-SVD ablation is data-free
        return Capabilities(requires_calibration=calib, statistics=frozenset({"gram"}) if calib else frozenset(),
                            needs_original=True, calib_source=(c.calib or None) if calib else None)

    def produces(self, kinds: frozenset[str]) -> frozenset[str]:
        return frozenset({"LoRALinear", "Linear"})  # a layer no earlier pass changed stays as it is

    def stored_bits(self, d_out: int, d_in: int, dtype: torch.dtype, before: Stored | None = None) -> int | None:
        """What the earlier passes store plus the branch (a target they left untouched stays as it is)."""
        if before is None or before.bits is None:
            return None
        if before.by is None:
            return before.bits
        return before.bits + branch_bits(d_out, d_in, self.config.rank, self.config.branch_bits, before.elt_bits)

    def _rank_check(self, d_out: int, d_in: int) -> str | None:
        if self.config.rank >= min(d_out, d_in):
            return f"eora rank {self.config.rank} must be below {min(d_out, d_in)}; lower rank="
        return None

    def check_target(self, d_out: int, d_in: int, stored: Stored | None) -> str | None:
        why = self._rank_check(d_out, d_in)
        if why is not None or stored is None or stored.by is None or stored.bits is None:
            return why  # untouched targets are left alone; an allocation known only at run time is checked then
        return self._cost_check(d_out, d_in, stored.elt_bits * d_out * d_in - stored.bits, stored.elt_bits, stored.by)

    def _cost_check(self, d_out: int, d_in: int, saved: int, elt_bits: int, by: str) -> str | None:
        """Why a branch of the configured rank does not pay for itself on a target that ``by`` left
        ``saved`` bits smaller than dense (None: it does)."""
        r, bb = self.config.rank, self.config.branch_bits
        cost = branch_bits(d_out, d_in, r, bb, elt_bits)
        if cost < saved:
            return None
        fits = [k for k in range(r - 1, 0, -1) if branch_bits(d_out, d_in, k, bb, elt_bits) < saved]
        fix = f"use rank={fits[0]} or lower" if fits else f"no rank pays for itself here; narrow eora with targets= or compress more with {by}"
        if not bb and branch_bits(d_out, d_in, r, 8, elt_bits) < saved:
            fix += " (or branch_bits=8)"
        return f"an eora branch of rank {r} costs {cost:,} bits, more than the {max(saved, 0):,} bits saved on this layer by {by}; {fix}"

    def apply(self, name: str, module: nn.Module, stats: LinearStats | None, ctx: LayerContext) -> PassResult:
        rel = layer_relative_name(name, ctx.adapter.layers_path)
        W = ctx.original(rel)
        Wc = dense_weight_of(module).detach().to(W.dtype)
        delta = (W - Wc).double()
        d_out, d_in = W.shape
        if float(delta.abs().max()) == 0.0:
            return PassResult(None, {"eora": "layer unchanged by earlier passes: nothing to compensate"})
        r = self.config.rank
        if r >= min(d_out, d_in):
            raise ConfigError(f"{name} ({d_out}x{d_in}): eora rank {r} must be below {min(d_out, d_in)}")
        why = self._cost_check(d_out, d_in, 8 * W.element_size() * d_out * d_in - storage_bits(module), 8 * W.element_size(), "the earlier passes")
        if why is not None:  # checked up front where the earlier passes' storage was known; here after a global allocation
            raise ConfigError(f"{name}: {why}")
        H = stats.gram if stats is not None else None
        B, A, _ = compensate(delta, r, H=H, variant=self.config.variant, n_tokens=stats.n_tokens if stats else 1)
        lora = LoRALinear(module, branch_factor(A, W, self.config.branch_bits), branch_factor(B, W, self.config.branch_bits))
        a_used, b_used = lora.branch_weights()
        info = {
            "rank": r, "variant": self.config.variant, "branch_bits": self.config.branch_bits,
            "error_before": relative_output_error(W, Wc, H),
            "error": relative_output_error(W, Wc + (b_used @ a_used).to(W.dtype), H),
            "error_metric": "rel_output_err" if H is not None else "rel_weight_err",
        }
        return PassResult(lora, info)
