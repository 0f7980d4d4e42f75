"""Modules of a sliced (SliceGPT) model.

A sliced decoder layer keeps every submodule of the original layer (only their shapes shrink) and
gains two d′ × d′ shortcut matrices on the residual path: the residual entering the attention block
is multiplied by ``attn_shortcut`` (Q_inᵀQ_mid) and the one entering the MLP by ``mlp_shortcut``
(Q_midᵀQ_out), because consecutive blocks use different rotations of the residual stream. The class
of the layer is swapped for a subclass with the forward below; that forward is the pre-norm decoder
forward (attention norm → attention → residual → MLP norm → MLP → residual) over the pieces the
family's adapter names (:class:`SlicedLayout`), with the two products added, and it is tested
against the upstream forward with identity shortcuts.

``MixedHead`` keeps a tied embedding/head tied after rotation: logits = (x·mix)·Tᵀ with T the
(rotated, sliced) embedding and mix = Q_lastᵀ·diag(γ_final)·Q_first.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, ClassVar

import torch
import torch.nn.functional as F
from torch import nn

#: why a model holding these modules has no plain transformers equivalent (read by the dense export)
_NO_DENSE = "a sliced (SliceGPT) model has residual shortcut matrices that plain transformers cannot express"


@dataclass(frozen=True)
class SlicedLayout:
    """The pieces of a pre-norm decoder layer, relative to it (from the family's adapter)."""

    attn_norm: str
    attention: str
    mlp_norm: str
    mlp: str


class SlicedLayerMixin:
    """Forward of a pre-norm decoder layer with residual shortcut matrices."""

    dense_export_blocker = _NO_DENSE
    sliced_layout: ClassVar[SlicedLayout]

    attn_shortcut: nn.Parameter
    mlp_shortcut: nn.Parameter

    def forward(
        self, hidden_states: torch.Tensor, attention_mask: Any = None, position_ids: Any = None,
        past_key_values: Any = None, use_cache: bool | None = False, position_embeddings: Any = None, **kwargs: Any,
    ) -> torch.Tensor:
        n = self.sliced_layout
        part = self.get_submodule  # type: ignore[attr-defined]
        if past_key_values is not None:
            kwargs["past_key_values"] = past_key_values
        residual = hidden_states @ self.attn_shortcut.to(hidden_states.dtype)
        h = part(n.attn_norm)(hidden_states)
        h, _ = part(n.attention)(
            hidden_states=h, attention_mask=attention_mask, position_ids=position_ids, use_cache=use_cache,
            position_embeddings=position_embeddings, **kwargs,
        )
        hidden_states = residual + h
        residual = hidden_states @ self.mlp_shortcut.to(hidden_states.dtype)
        h = part(n.mlp)(part(n.mlp_norm)(hidden_states))
        return residual + h


_SLICED_CLASSES: dict[tuple[type, SlicedLayout], type] = {}


def make_sliced(layer: nn.Module, attn_shortcut: torch.Tensor, mlp_shortcut: torch.Tensor, layout: SlicedLayout) -> None:
    """Turn ``layer`` (in place) into its sliced subclass with the given shortcut matrices."""
    cls = type(layer)
    if not isinstance(layer, SlicedLayerMixin):
        key = (cls, layout)
        if key not in _SLICED_CLASSES:
            _SLICED_CLASSES[key] = type(f"Sliced{cls.__name__}", (SlicedLayerMixin, cls), {"sliced_layout": layout})
        layer.__class__ = _SLICED_CLASSES[key]
    layer.attn_shortcut = nn.Parameter(attn_shortcut.contiguous(), requires_grad=False)
    layer.mlp_shortcut = nn.Parameter(mlp_shortcut.contiguous(), requires_grad=False)


def scale_norm_eps(norm: nn.Module, factor: float) -> None:
    """Scale an RMSNorm's epsilon so that, normalizing d′ values with scale √(d/d′), it still computes
    x·√d / √(‖x‖² + d·eps) exactly as the unsliced norm did."""
    for attr in ("variance_epsilon", "eps"):
        if isinstance(getattr(norm, attr, None), float):
            setattr(norm, attr, getattr(norm, attr) * factor)
            return


class MixedHead(nn.Module):
    """LM head sharing the embedding matrix: logits = (x · mix) · weightᵀ."""

    dense_export_blocker = _NO_DENSE

    def __init__(self, weight: nn.Parameter, mix: torch.Tensor) -> None:
        super().__init__()
        self.weight = weight
        self.mix = nn.Parameter(mix.contiguous(), requires_grad=False)
        self.in_features, self.out_features = mix.shape[0], weight.shape[0]

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.linear(x @ self.mix.to(x.dtype), self.weight.to(x.dtype))
