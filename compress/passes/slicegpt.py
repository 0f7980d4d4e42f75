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

``sparsity`` is the fraction of the embedding dimension removed (the paper's definition); d′ is
rounded to a multiple of ``round_to``. The report gives the fraction of all parameters removed,
shortcut matrices included.
"""

from __future__ import annotations

import logging
import math
import time
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn

from ..adapters.base import ModelAdapter
from ..config import PassConfig, option
from ..errors import ConfigError
from ..modules.sliced import MixedHead, make_sliced, scale_norm_eps
from ..pipeline.sequential import Batch, ModuleRecord, _run_layer, _with_hidden, calibration_forward_context, capture_layer0_inputs, map_tensors
from ..registry import register_pass
from ..solvers.pca import pca
from .base import Pass

logger = logging.getLogger(__name__)


@dataclass
class SliceGPTConfig(PassConfig):
    sparsity: float = option(0.25, "fraction of the embedding (hidden) dimension removed", min=0.0, max=1.0, max_open=True)
    round_to: int = option(8, "round the kept dimension to a multiple of this (hardware-friendly sizes)", min=1)
    tied_basis: str = option(
        "joint", "tied embedding/head: the kept subspace of the shared matrix comes from the PCA of the layer-0 input and of "
        "what the head reads together ('joint'), or of the layer-0 input alone as the paper does ('embedding')", choices=("joint", "embedding"))
    head_weight: float = option(10.0, "joint basis: weight of the head's trace-normalized Gram against the embedding's", min=0.0)


def _gram(xs: list[torch.Tensor]) -> torch.Tensor:
    G = None
    for x in xs:
        f = x.reshape(-1, x.shape[-1]).double()
        G = f.T @ f if G is None else G + f.T @ f
    assert G is not None
    return G


def _set_weight(linear: nn.Module, W: torch.Tensor) -> None:
    assert isinstance(linear, nn.Linear)
    linear.weight = nn.Parameter(W.to(linear.weight.dtype).contiguous(), requires_grad=False)
    linear.out_features, linear.in_features = W.shape


@register_pass
class SliceGPTPass(Pass):
    """SliceGPT: rotate the residual stream by PCA and delete its least important directions."""

    name = "slicegpt"
    config_cls = SliceGPTConfig
    requires_calibration = True
    granularity = "model"
    dense_exportable = False

    def kept_dim(self, d: int) -> int:
        c = self.config
        assert isinstance(c, SliceGPTConfig)
        if c.sparsity == 0:
            return d
        k = int(round((1 - c.sparsity) * d / c.round_to)) * c.round_to
        return min(d, max(c.round_to, k))

    def _check_shrinks(self, model: nn.Module, adapter: ModelAdapter, d: int, d_new: int, tied: bool) -> None:
        """Refuse a slicing whose shortcut matrices add more parameters than the deleted rows and
        columns remove (the sliced model would be larger than the dense one)."""
        if d_new == d:
            return  # sparsity 0: a pure rotation, kept for invariance checks
        vocab = model.get_submodule(adapter.embed).weight.shape[0]
        per_dim = vocab * (1 if tied else 2) + 1  # embedding (+ untied head) and the final norm
        for layer in adapter.layers(model):
            per_dim += sum(layer.get_submodule(n).out_features for n in adapter.attn_inputs + adapter.mlp_inputs)
            per_dim += sum(layer.get_submodule(n).in_features for n in (adapter.attn_output, adapter.mlp_output)) + 2
        n_layers = len(adapter.layers(model))

        def net_removed(k: int) -> int:
            return (d - k) * per_dim - (2 * n_layers + (1 if tied else 0)) * k * k

        if net_removed(d_new) > 0:
            return
        r = self.config.round_to  # type: ignore[attr-defined]
        shrinking = [k for k in range(d - r, 0, -r) if net_removed(k) > 0]
        hint = (f"use sparsity >= {1 - shrinking[0] / d:.3f} (hidden {shrinking[0]}), the least that makes it smaller"
                if shrinking else "no sparsity shrinks this model")
        raise ConfigError(
            f"slicegpt:sparsity={self.config.sparsity} (hidden {d} -> {d_new}) would make the model larger than the dense one: "  # type: ignore[attr-defined]
            f"its {2 * n_layers} shortcut matrices of {d_new}x{d_new}{' and the tied head mix' if tied else ''} "
            f"add {(d - d_new) * per_dim - net_removed(d_new):,} parameters "
            f"and slicing removes only {(d - d_new) * per_dim:,}; {hint}"
        )

    def run_model(
        self, model: nn.Module, adapter: ModelAdapter, input_ids: torch.Tensor, *, device: torch.device, batch_size: int = 8,
        on_layer: Any = None,
    ) -> list[ModuleRecord]:
        missing = adapter.missing_residual_layout()
        if missing:
            raise ConfigError(
                f"slicegpt needs the residual layout of the architecture, which adapter '{adapter.name}' does not describe "
                f"(missing: {', '.join(missing)}); supported families: llama, mistral, qwen2, qwen3"
            )
        emb = model.get_submodule(adapter.embed)
        head = model.get_submodule(adapter.lm_head)
        final_norm = model.get_submodule(adapter.final_norm)
        d = emb.weight.shape[1]
        d_new = self.kept_dim(d)
        tied = head.weight is emb.weight
        layers = adapter.layers(model)
        self._check_shrinks(model, adapter, d, d_new, tied)
        records: list[ModuleRecord] = []
        scale = math.sqrt(d / d_new)
        with calibration_forward_context(model), torch.no_grad():
            # 1. norm fusion
            for layer in layers:
                for norm_name, readers in ((adapter.attn_norm, adapter.attn_inputs), (adapter.mlp_norm, adapter.mlp_inputs)):
                    norm = layer.get_submodule(norm_name)
                    for n in readers:
                        lin = layer.get_submodule(n)
                        _set_weight(lin, lin.weight.double() * norm.weight.double()[None, :])
                    norm.weight.fill_(1.0)
            gamma_final = final_norm.weight.detach().double().clone()
            if not tied:
                _set_weight(head, head.weight.double() * gamma_final[None, :])
                final_norm.weight.fill_(1.0)
            # 2. the embedding's basis
            inputs = capture_layer0_inputs(model, adapter, input_ids, batch_size, device)
            basis = self.config.tied_basis if tied else "embedding"  # type: ignore[attr-defined]
            use_head = basis == "joint" and self.config.head_weight > 0  # type: ignore[attr-defined]
            G_head = _head_input_gram(layers, final_norm, inputs, device) if use_head else None
            hidden = [_hidden(b).to(device) for b in inputs]
            G_first = _gram(hidden)
            if G_head is not None:  # one matrix serves the embedding and the head: keep what both read
                G_head = _onto_row_space(G_head, emb.weight)
                G_first = G_first / G_first.trace() + self.config.head_weight * G_head / G_head.trace()  # type: ignore[attr-defined]
            _, Q = pca(G_first)
            Q_first = Q[:, :d_new].to(device)
            emb.weight = nn.Parameter((emb.weight.double() @ Q_first.to(emb.weight.device)).to(emb.weight.dtype), requires_grad=False)
            emb.embedding_dim = d_new
            X = [(h.double() @ Q_first).float() for h in hidden]
            Q_in = Q_first
            for i, layer in enumerate(layers):
                t0 = time.perf_counter()
                home = next(layer.parameters()).device
                layer.to(device)
                before = {n: layer.get_submodule(n).weight.numel() for n in adapter.attn_inputs + adapter.mlp_inputs + (adapter.attn_output, adapter.mlp_output)}
                # attention reads the stream in basis Q_in
                for n in adapter.attn_inputs:
                    lin = layer.get_submodule(n)
                    _set_weight(lin, lin.weight.double() @ Q_in)
                attn_norm = layer.get_submodule(adapter.attn_norm)
                attn_norm.weight = nn.Parameter(torch.full((d_new,), scale, dtype=attn_norm.weight.dtype, device=device), requires_grad=False)
                scale_norm_eps(attn_norm, d / d_new)
                attn = layer.get_submodule(adapter.attn_output.rsplit(".", 1)[0])
                mids = []
                for x, b in zip(X, inputs):
                    kwargs = {k: v for k, v in map_tensors(b[1], lambda t: t.to(device)).items() if k != "hidden_states"}
                    out = attn(hidden_states=attn_norm(x.to(attn_norm.weight.dtype)), **kwargs)[0]
                    mids.append(x.double() @ Q_in.T + out.double())
                _, Q = pca(_gram(mids))
                Q_mid = Q[:, :d_new]
                o = layer.get_submodule(adapter.attn_output)
                _set_weight(o, Q_mid.T @ o.weight.double())
                S_attn = Q_in.T @ Q_mid
                X_mid = [(m @ Q_mid).float() for m in mids]
                # the MLP reads the stream in basis Q_mid
                for n in adapter.mlp_inputs:
                    lin = layer.get_submodule(n)
                    _set_weight(lin, lin.weight.double() @ Q_mid)
                mlp_norm = layer.get_submodule(adapter.mlp_norm)
                mlp_norm.weight = nn.Parameter(torch.full((d_new,), scale, dtype=mlp_norm.weight.dtype, device=device), requires_grad=False)
                scale_norm_eps(mlp_norm, d / d_new)
                mlp = layer.get_submodule(adapter.mlp_output.rsplit(".", 1)[0])
                outs = [x.double() @ Q_mid.T + mlp(mlp_norm(x.to(mlp_norm.weight.dtype))).double() for x in X_mid]
                _, Q = pca(_gram(outs))
                Q_out = Q[:, :d_new]
                down = layer.get_submodule(adapter.mlp_output)
                _set_weight(down, Q_out.T @ down.weight.double())
                S_mlp = Q_mid.T @ Q_out
                dtype = o.weight.dtype
                make_sliced(layer, S_attn.to(dtype), S_mlp.to(dtype))
                X = [(m @ Q_out).float() for m in outs]
                Q_in = Q_out
                layer.to(home)
                secs = time.perf_counter() - t0
                for n, numel in before.items():
                    lin = layer.get_submodule(n)
                    records.append(ModuleRecord(
                        layer=i, name=f"{adapter.layers_path}.{i}.{n}", pass_name=self.name, module_type="Linear",
                        shape=(lin.out_features, lin.in_features), params_before=numel, params_after=lin.weight.numel(),
                        seconds=secs / len(before), info={"hidden": d_new, "hidden_before": d, "sparsity": self.config.sparsity},  # type: ignore[attr-defined]
                        bits_before=numel * 8 * lin.weight.element_size(), bits_after=lin.weight.numel() * 8 * lin.weight.element_size(),
                    ))
                if on_layer is not None:
                    on_layer(i, len(layers), secs)
            # 4. final norm and head
            final_norm.weight = nn.Parameter(torch.full((d_new,), scale, dtype=final_norm.weight.dtype, device=final_norm.weight.device),
                                             requires_grad=False)
            scale_norm_eps(final_norm, d / d_new)
            Q_last = Q_in.to(head.weight.device)
            if tied:
                mix = Q_last.T @ torch.diag(gamma_final.to(Q_last.device)) @ Q_first.to(Q_last.device)
                new_head = MixedHead(emb.weight, mix.to(emb.weight.dtype))
                parent, _, child = adapter.lm_head.rpartition(".")
                setattr(model.get_submodule(parent) if parent else model, child, new_head)
            else:
                _set_weight(head, head.weight.double() @ Q_last)
        model.config.compress_sliced_hidden = d_new  # recorded for the checkpoint; transformers ignores it
        model.config.compress_sliced_eps_scale = d / d_new
        logger.info("slicegpt: hidden %d -> %d (sparsity %.3f requested, %.4f used after rounding to a multiple of %d)",
                    d, d_new, self.config.sparsity, 1 - d_new / d, self.config.round_to)  # type: ignore[attr-defined]
        return records


def _onto_row_space(G: torch.Tensor, E: torch.Tensor) -> torch.Tensor:
    """P·G·P with P the projector onto the row space of ``E``: the head's logits see only the
    part of its input that the (tied) vocabulary matrix can read."""
    K = E.detach().double().T @ E.detach().double()
    lam, V = torch.linalg.eigh(K.to(G.device))
    V = V[:, lam > lam.max() * 1e-10]
    P = V @ V.T
    return P @ G @ P


def _head_input_gram(layers: nn.ModuleList, final_norm: nn.Module, inputs: list[Batch], device: torch.device) -> torch.Tensor:
    """Gram matrix (float64) of what the LM head reads (the final norm's output) on the calibration
    set, from one layer-by-layer forward of the not yet sliced model."""
    hs = [_hidden(b) for b in inputs]
    for layer in layers:
        home = next(layer.parameters()).device
        layer.to(device)
        hs = [_run_layer(layer, _with_hidden(b, h), device).cpu() for b, h in zip(inputs, hs)]
        layer.to(home)
    home = final_norm.weight.device
    final_norm.to(device)
    G = _gram([final_norm(h.to(device)) for h in hs])
    final_norm.to(home)
    return G


def _hidden(batch: Batch) -> torch.Tensor:
    args, kwargs = batch
    return args[0] if args else kwargs["hidden_states"]


__all__ = ["SliceGPTPass", "_with_hidden", "_run_layer"]
