"""SliceGPT (Ashkboos et al., arXiv 2401.15024): rotate the residual stream onto its principal
directions and delete the least important ones — rows of the weights that read the stream and
columns of the weights that write it — so the hidden dimension shrinks from d to d′.

Steps (a model-level pass: it changes the embedding, every layer and the head):
1. Norm fusion: each RMSNorm scale γ is folded into the linears that read the norm's output
   (q/k/v, gate/up, and an untied head), leaving γ = 1, which makes the network invariant to an
   orthogonal rotation of the residual stream. A tied head keeps γ_final (see 4).
2. Layer by layer, on the calibration inputs: PCA of the residual stream entering the layer, between
   attention and MLP, and leaving the layer (Gram matrices of the full-dimension signals, float64);
   the leading d′ eigenvectors Q are the new bases. Attention/MLP input weights become W·Q_in/W·Q_mid,
   output weights Q_midᵀ·W/Q_outᵀ·W, and the residual path gets the shortcut matrices
   Q_inᵀQ_mid and Q_midᵀQ_out (d′ × d′; :mod:`compress.modules.sliced`).
3. Each RMSNorm now normalizes d′ values; its scale is set to √(d/d′) and its epsilon multiplied by
   d/d′, so that it computes x·√d/√(‖x‖² + d·eps) exactly as the unsliced norm did (SliceGPT's RMSN
   divides by the RMS over the original d dimensions).
4. Embedding E ← E·Q_first. Untied head ← W·diag(γ)·Q_last. A tied head stays tied: it becomes
   ``MixedHead`` with mix = Q_lastᵀ·diag(γ_final)·Q_first (one d′ × d′ matrix instead of an untied
   vocab × d′ head). The shared matrix then serves two readers, so by default (``tied_basis=joint``)
   Q_first is the PCA of the layer-0 input's Gram plus ``head_weight`` times the Gram of what the
   head reads (the final norm's output, projected onto the row space of E; both trace-normalized),
   from one extra forward of the unsliced model. The paper's choice, the layer-0 input alone
   (``tied_basis=embedding``), keeps directions the embedding lookup needs but drops some the head
   needs: on SmolLM2-135M at sparsity 0.2, held-out PTB perplexity (3 windows of 2048) was 337 with
   it and 196 / 178 / 179 with head_weight 1 / 10 / 100 (dense 56.1), hence the default 10.

Lifecycle (a model-level pass of the engine): ``check`` refuses an architecture without a residual
layout and a sparsity that would enlarge the model; ``begin`` takes the first basis from the
layer-0 inputs (and the head's input) and rotates the embedding and the calibration stream;
``compress_layer`` fuses the layer's norms, observes the stream between attention and MLP and
leaving the layer through the engine (temporary rectangular shortcuts make the layer's own forward
produce those full-dimension signals), rotates and slices; ``finish`` slices the final norm and the
head. The math is in :mod:`compress.solvers.rotate`.

``sparsity`` is the fraction of the embedding dimension removed (the paper's definition); d′ is
rounded to a multiple of ``round_to``. The report gives the fraction of all parameters removed,
shortcut matrices included.
"""

from __future__ import annotations

import logging
import math
from dataclasses import dataclass
from typing import Any, cast

import torch
from torch import nn

from ..adapters.base import ModelAdapter
from ..config import PassConfig, option
from ..errors import ConfigError
from ..modules.base import CompressedLinear, set_linear_weight, weight_of
from ..modules.sliced import MixedHead, SlicedLayout, make_sliced, scale_norm_eps
from ..registry import register_pass
from ..solvers.rotate import joint_gram, kept_dim, net_removed, onto_row_space, principal_basis, rotate_inputs, rotate_outputs, scale_inputs
from .base import LAYER_OUTPUT, Capabilities, LayerContext, ModelContext, ModelPass, Shapes, Site, layer_relative_name, require_layout

logger = logging.getLogger(__name__)


@dataclass
class SliceGPTConfig(PassConfig):
    sparsity: float = option(0.25, "fraction of the embedding (hidden) dimension removed", min=0.0, max=1.0, max_open=True)
    round_to: int = option(8, "round the kept dimension to a multiple of this (hardware-friendly sizes)", min=1)
    tied_basis: str = option(
        "joint", "tied embedding/head: the kept subspace of the shared matrix comes from the PCA of the layer-0 input and of "
        "what the head reads together ('joint'), or of the layer-0 input alone as the paper does ('embedding')", choices=("joint", "embedding"))
    head_weight: float = option(10.0, "joint basis: weight of the head's trace-normalized Gram against the embedding's", min=0.0)


def _layout(adapter: ModelAdapter) -> SlicedLayout:
    return SlicedLayout(adapter.attn_norm, adapter.attention, adapter.mlp_norm, adapter.mlp)


def _set_norm(norm: nn.Module, d_new: int, scale: float, eps_factor: float) -> None:
    """An RMSNorm over d′ values with scale √(d/d′) (after norm fusion its γ is 1) and epsilon × d/d′."""
    w = weight_of(norm)
    norm.weight = nn.Parameter(torch.full((d_new,), scale, dtype=w.dtype, device=w.device), requires_grad=False)
    scale_norm_eps(norm, eps_factor)


@register_pass
class SliceGPTPass(ModelPass[SliceGPTConfig]):
    """SliceGPT: rotate the residual stream by PCA and delete its least important directions."""

    name = "slicegpt"
    accepts_reason = "it rotates dense weights"
    legacy_manifest_key = "sliced"

    def __init__(self, config: SliceGPTConfig) -> None:
        super().__init__(config)
        self._structure: dict[str, Any] | None = None

    def dense_blocker(self) -> str | None:
        return "the sliced model has residual shortcut matrices that plain transformers cannot express; load the output with compress.load(dir)"

    def capabilities(self) -> Capabilities:
        # the PCA bases are taken from the stream of the model as it is being sliced, so they can
        # never come from statistics profiled on the dense model
        return Capabilities(requires_calibration=True, uses_layer_inputs=True)

    def kept_dim(self, d: int) -> int:
        return kept_dim(d, self.config.sparsity, self.config.round_to)

    # -- before any compute ----------------------------------------------------------------------

    def check(self, site: Site) -> Shapes:
        model, adapter, shapes = site.model, site.adapter, site.shapes
        require_layout(self.name, adapter, "residual layout", adapter.missing_residual_layout())
        emb = model.get_submodule(adapter.embed)
        d = weight_of(emb).shape[1]
        d_new = self.kept_dim(d)
        self._check_shrinks(model, adapter, d, d_new, model.get_submodule(adapter.lm_head).weight is emb.weight)
        out = dict(shapes)
        for name, (o, i) in shapes.items():
            rel = layer_relative_name(name, adapter.layers_path)
            if rel in adapter.attn_inputs + adapter.mlp_inputs:
                out[name] = (o, d_new)
            elif rel in (adapter.attn_output, adapter.mlp_output):
                out[name] = (d_new, i)
        return out

    def _check_shrinks(self, model: nn.Module, adapter: ModelAdapter, d: int, d_new: int, tied: bool) -> None:
        """Refuse a slicing whose shortcut matrices add more parameters than the deleted rows and
        columns remove (the sliced model would be larger than the dense one)."""
        if d_new == d:
            return  # sparsity 0: a pure rotation, kept for invariance checks
        vocab = weight_of(model.get_submodule(adapter.embed)).shape[0]
        per_dim = vocab * (1 if tied else 2) + 1  # embedding (+ untied head) and the final norm
        for layer in adapter.layers(model):
            # the layer's linears, plain or compressed (both have in_features/out_features)
            per_dim += sum(cast("nn.Linear | CompressedLinear", layer.get_submodule(n)).out_features for n in adapter.attn_inputs + adapter.mlp_inputs)
            per_dim += sum(cast("nn.Linear | CompressedLinear", layer.get_submodule(n)).in_features for n in (adapter.attn_output, adapter.mlp_output)) + 2
        n_mats = 2 * len(adapter.layers(model)) + (1 if tied else 0)
        if net_removed(d, d_new, per_dim, n_mats) > 0:
            return
        r = self.config.round_to
        shrinking = [k for k in range(d - r, 0, -r) if net_removed(d, k, per_dim, n_mats) > 0]
        hint = (f"use sparsity >= {1 - shrinking[0] / d:.3f} (hidden {shrinking[0]}), the least that makes it smaller"
                if shrinking else "no sparsity shrinks this model")
        raise ConfigError(
            f"slicegpt:sparsity={self.config.sparsity} (hidden {d} -> {d_new}) would make the model larger than the dense one: "
            f"its {n_mats - (1 if tied else 0)} shortcut matrices of {d_new}x{d_new}{' and the tied head mix' if tied else ''} "
            f"add {(d - d_new) * per_dim - net_removed(d, d_new, per_dim, n_mats):,} parameters "
            f"and slicing removes only {(d - d_new) * per_dim:,}; {hint}"
        )

    # -- the lifecycle ---------------------------------------------------------------------------

    def begin(self, ctx: ModelContext) -> None:
        model, adapter = ctx.model, ctx.adapter
        emb = model.get_submodule(adapter.embed)
        head = model.get_submodule(adapter.lm_head)
        final_norm = model.get_submodule(adapter.final_norm)
        self._d = d = weight_of(emb).shape[1]
        self._d_new = d_new = self.kept_dim(d)
        self._tied = tied = head.weight is emb.weight
        with torch.no_grad():
            self._gamma_final = weight_of(final_norm).detach().double().clone()
            G = ctx.input_stats(frozenset({"gram"})).gram
            assert G is not None
            if tied and self.config.tied_basis == "joint" and self.config.head_weight > 0:
                # one matrix serves the embedding and the head: keep what both read
                G_head = ctx.head_input_stats(frozenset({"gram"})).gram
                assert G_head is not None
                G = joint_gram(G, onto_row_space(G_head, weight_of(emb)), self.config.head_weight)
            if not tied:
                set_linear_weight(head, scale_inputs(weight_of(head), self._gamma_final.to(weight_of(head).device)))
                weight_of(final_norm).fill_(1.0)
            Q_first = principal_basis(G, d_new)  # (d, d′) float64, CPU
            emb.weight = nn.Parameter(rotate_inputs(weight_of(emb), Q_first).to(weight_of(emb).dtype), requires_grad=False)
            cast(nn.Embedding, emb).embedding_dim = d_new
        ctx.map_hidden(lambda h: (h.double() @ Q_first.to(h.device)).to(h.dtype))
        self._Q_first = self._Q = Q_first

    def compress_layer(self, index: int, layer: nn.Module, ctx: LayerContext) -> dict[str, dict[str, Any]]:
        a = ctx.adapter
        d, d_new, dev = self._d, self._d_new, ctx.device
        scale, eps_factor = math.sqrt(d / d_new), d / d_new
        with torch.no_grad():
            # norm fusion: each norm's scale moves into the linears that read it, leaving γ = 1
            for norm_name, readers in ((a.attn_norm, a.attn_inputs), (a.mlp_norm, a.mlp_inputs)):
                norm = layer.get_submodule(norm_name)
                for n in readers:
                    lin = layer.get_submodule(n)
                    set_linear_weight(lin, scale_inputs(weight_of(lin), weight_of(norm)))
                weight_of(norm).fill_(1.0)
            Q_in = self._Q.to(dev)
            dtype = weight_of(layer.get_submodule(a.attn_output)).dtype
            # attention reads the stream in basis Q_in; with the shortcut Q_inᵀ (d′ × d) the layer's
            # forward writes the full-dimension stream between attention and MLP
            for n in a.attn_inputs:
                lin = layer.get_submodule(n)
                set_linear_weight(lin, rotate_inputs(weight_of(lin), Q_in))
            _set_norm(layer.get_submodule(a.attn_norm), d_new, scale, eps_factor)
            make_sliced(layer, Q_in.T.to(dtype), torch.eye(d, dtype=dtype, device=dev), _layout(a))
            G_mid = ctx.observe([a.mlp_norm], frozenset({"gram"})).linears[a.mlp_norm].gram
            assert G_mid is not None
            Q_mid = principal_basis(G_mid, d_new).to(dev)
            o = layer.get_submodule(a.attn_output)
            set_linear_weight(o, rotate_outputs(weight_of(o), Q_mid))
            S_attn = Q_in.T @ Q_mid
            # the MLP reads the stream in basis Q_mid; the shortcut Q_midᵀ gives the full-dimension output
            for n in a.mlp_inputs:
                lin = layer.get_submodule(n)
                set_linear_weight(lin, rotate_inputs(weight_of(lin), Q_mid))
            _set_norm(layer.get_submodule(a.mlp_norm), d_new, scale, eps_factor)
            make_sliced(layer, S_attn.to(dtype), Q_mid.T.to(dtype), _layout(a))
            G_out = ctx.observe([LAYER_OUTPUT], frozenset({"gram"})).linears[LAYER_OUTPUT].gram
            assert G_out is not None
            Q_out = principal_basis(G_out, d_new).to(dev)
            down = layer.get_submodule(a.mlp_output)
            set_linear_weight(down, rotate_outputs(weight_of(down), Q_out))
            make_sliced(layer, S_attn.to(dtype), (Q_mid.T @ Q_out).to(dtype), _layout(a))
        # the sliced layer writes the observed full-dimension output in basis Q_out: the engine
        # propagates that instead of running the layer once more
        Q_out_cpu = Q_out.cpu()
        ctx.map_outputs(lambda h: (h.double() @ Q_out_cpu).to(h.dtype))
        self._Q = Q_out_cpu
        info = {"hidden": d_new, "hidden_before": d, "sparsity": self.config.sparsity}
        return {n: dict(info) for n in a.attn_inputs + a.mlp_inputs + (a.attn_output, a.mlp_output)}

    def finish(self, ctx: ModelContext) -> None:
        model, adapter = ctx.model, ctx.adapter
        d, d_new = self._d, self._d_new
        final_norm = model.get_submodule(adapter.final_norm)
        head = model.get_submodule(adapter.lm_head)
        emb = model.get_submodule(adapter.embed)
        with torch.no_grad():
            _set_norm(final_norm, d_new, math.sqrt(d / d_new), d / d_new)
            Q_last = self._Q.to(weight_of(head).device)
            if self._tied:
                gamma = self._gamma_final.to(Q_last.device)
                mix = Q_last.T @ torch.diag(gamma) @ self._Q_first.to(Q_last.device)
                parent, _, child = adapter.lm_head.rpartition(".")
                tied_weight = emb.weight
                assert isinstance(tied_weight, nn.Parameter)
                setattr(model.get_submodule(parent) if parent else model, child, MixedHead(tied_weight, mix.to(weight_of(emb).dtype)))
            else:
                set_linear_weight(head, rotate_inputs(weight_of(head), Q_last))
        self._structure = {"hidden": d_new, "tied_mix": self._tied, "norm_eps_scale": d / d_new}
        logger.info("slicegpt: hidden %d -> %d (sparsity %.3f requested, %.4f used after rounding to a multiple of %d)",
                    d, d_new, self.config.sparsity, 1 - d_new / d, self.config.round_to)

    # -- structure -------------------------------------------------------------------------------

    def structure(self, model: nn.Module) -> dict[str, Any] | None:
        return self._structure

    @classmethod
    def rebuild(cls, model: nn.Module, adapter: ModelAdapter, structure: dict[str, Any], dtype: torch.dtype) -> None:
        hidden = int(structure["hidden"])
        eps_scale = float(structure.get("norm_eps_scale", 1.0))
        for layer in adapter.layers(model):
            make_sliced(layer, torch.zeros(hidden, hidden, dtype=dtype), torch.zeros(hidden, hidden, dtype=dtype), _layout(adapter))
            for norm in (adapter.attn_norm, adapter.mlp_norm):
                scale_norm_eps(layer.get_submodule(norm), eps_scale)
        scale_norm_eps(model.get_submodule(adapter.final_norm), eps_scale)
        if structure.get("tied_mix"):
            emb = model.get_submodule(adapter.embed)
            parent, _, child = adapter.lm_head.rpartition(".")
            tied_weight = emb.weight
            assert isinstance(tied_weight, nn.Parameter)
            setattr(model.get_submodule(parent) if parent else model, child, MixedHead(tied_weight, torch.zeros(hidden, hidden, dtype=dtype)))

    def notes(self, summary: dict[str, Any]) -> list[str]:
        """SliceGPT's accounting: the paper's sparsity (embedding dimension removed) beside the fraction of
        all parameters removed, shortcut and mixing matrices included."""
        if self._structure is None:
            return []
        d, d_new = self._d, self._d_new
        return [
            f"Slicing: hidden {d} -> {d_new}; sparsity {self.config.sparsity} requested, {1 - d_new / d:.4f} used "
            "(SliceGPT's definition: the fraction of the embedding dimension removed). Parameters removed from the whole model, "
            f"shortcut and head-mixing matrices included: {summary['model_ratio']:.4f} "
            f"({summary['model_params_before']:,} -> {summary['model_params_after']:,})."
        ]
