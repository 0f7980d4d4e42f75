"""Attention with reduced head dimensions (MoDeGPT).

After MoDeGPT a Llama-family attention keeps its heads but each head's query/key vectors have
``qk_dim`` ≤ head_dim dimensions (whole rotary pairs of the original head, chosen per key-value
group) and its value/output vectors ``v_dim`` ≤ head_dim dimensions (a rank-``v_dim`` factorization
of each head's value–output product). The class of the attention module is swapped for a subclass
with the forward below, which is the upstream forward with three differences:

* q, k and v are split into heads of their own widths (``qk_dim`` for q and k, ``v_dim`` for v);
* the rotary embedding of the kept dimensions uses their original frequencies: ``rope_index``
  (n_kv_heads × qk_dim, a buffer saved with the weights) holds, for each key-value group, the
  original head dimensions its kept q/k dimensions came from, laid out as the kept first halves of
  the rotary pairs followed by their partners, so ``rotate_half`` pairs them as before;
* the softmax scale stays 1/√head_dim of the original model (q·k approximates the original dot
  product; it is not a dot product of a smaller model).

With every dimension kept (``rope_index`` = 0..head_dim−1 in every group) the forward is the
upstream one, which the tests check. The MLP needs no new module: its intermediate width is the
shape of its three linears.
"""

from __future__ import annotations

import sys
from typing import Any, ClassVar

import torch
from torch import nn

#: why a model holding this module has no plain transformers equivalent (read by the dense export)
NO_DENSE_REASON = ("MoDeGPT's attention keeps a different set of rotary dimensions per key-value group and a value width other than the "
             "query/key width, which a plain transformers config cannot express")


def _rotate_half(x: torch.Tensor) -> torch.Tensor:
    x1, x2 = x.chunk(2, dim=-1)
    return torch.cat((-x2, x1), dim=-1)


class ModularAttentionMixin:
    """Forward of a Llama-family attention whose q/k and v/o head widths were reduced."""

    dense_export_blocker = NO_DENSE_REASON
    #: the transformers modeling module of the attention class it extends (its attention functions)
    modeling: ClassVar[Any]
    #: the q, k, v and o projections, relative to the attention module (from the family's adapter)
    projections: ClassVar[tuple[str, str, str, str]]

    qk_dim: int
    v_dim: int
    rope_index: torch.Tensor

    def forward(
        self, hidden_states: torch.Tensor, position_embeddings: tuple[torch.Tensor, torch.Tensor] | None = None,
        attention_mask: torch.Tensor | None = None, **kwargs: Any,
    ) -> tuple[torch.Tensor, Any]:
        from transformers.modeling_utils import ALL_ATTENTION_FUNCTIONS

        eager_attention_forward = self.modeling.eager_attention_forward

        cache = kwargs.pop("cache", None)
        if cache is None:
            cache = kwargs.pop("past_key_values", None)
        kwargs.pop("past_key_values", None)
        input_shape = hidden_states.shape[:-1]
        q_proj, k_proj, v_proj, o_proj = (self.get_submodule(n) for n in self.projections)  # type: ignore[attr-defined]
        q = q_proj(hidden_states).view(*input_shape, -1, self.qk_dim)
        k = k_proj(hidden_states).view(*input_shape, -1, self.qk_dim)
        v = v_proj(hidden_states).view(*input_shape, -1, self.v_dim).transpose(1, 2)
        if getattr(self, "q_norm", None) is not None:  # per-head norms (Qwen3) are only kept at full width
            q, k = self.q_norm(q), self.k_norm(k)  # type: ignore[attr-defined]
        q, k = q.transpose(1, 2), k.transpose(1, 2)
        assert position_embeddings is not None
        cos, sin = position_embeddings  # (batch, seq, head_dim)
        idx = self.rope_index.to(cos.device)
        rep = q.shape[1] // k.shape[1]
        # (batch, heads, seq, qk_dim): each group's kept dimensions with their original frequencies
        for_k, for_q = idx.view(-1), idx.repeat_interleave(rep, dim=0).view(-1)
        n = cos.shape[:-1]
        cos_k, sin_k = (t[..., for_k].view(*n, k.shape[1], -1).transpose(1, 2).to(q.dtype) for t in (cos, sin))
        cos_q, sin_q = (t[..., for_q].view(*n, q.shape[1], -1).transpose(1, 2).to(q.dtype) for t in (cos, sin))
        q = q * cos_q + _rotate_half(q) * sin_q
        k = k * cos_k + _rotate_half(k) * sin_k
        if cache is not None:
            k, v = cache.update(k, v, self.layer_idx, kwargs=kwargs)  # type: ignore[attr-defined]
        impl = self.config._attn_implementation  # type: ignore[attr-defined]
        attention = ALL_ATTENTION_FUNCTIONS.get_interface(impl, eager_attention_forward) if impl != "eager" else eager_attention_forward
        out, weights = attention(
            self, q, k, v, attention_mask, dropout=0.0 if not self.training else self.attention_dropout,  # type: ignore[attr-defined]
            scaling=self.scaling, **kwargs,  # type: ignore[attr-defined]
        )
        out = out.reshape(*input_shape, -1).contiguous()
        return o_proj(out), weights


_MODULAR_CLASSES: dict[tuple[type, tuple[str, str, str, str]], type] = {}

#: the projections of a Llama-family attention, relative to it
LLAMA_PROJECTIONS = ("q_proj", "k_proj", "v_proj", "o_proj")


def make_modular(attn: nn.Module, qk_dim: int, v_dim: int, rope_index: torch.Tensor,
                 projections: tuple[str, str, str, str] = LLAMA_PROJECTIONS) -> None:
    """Turn ``attn`` (in place) into its reduced-width subclass; its linears must already have
    their new shapes. ``rope_index``: (n_kv_heads, qk_dim) original head dimensions of the kept q/k
    dimensions, first halves of the rotary pairs then their partners."""
    cls = type(attn)
    if not isinstance(attn, ModularAttentionMixin):
        key = (cls, projections)
        if key not in _MODULAR_CLASSES:
            body = {"modeling": sys.modules[cls.__module__], "projections": projections}
            _MODULAR_CLASSES[key] = type(f"Modular{cls.__name__}", (ModularAttentionMixin, cls), body)
        attn.__class__ = _MODULAR_CLASSES[key]
    assert isinstance(attn, ModularAttentionMixin)
    attn.qk_dim = int(qk_dim)
    attn.v_dim = int(v_dim)
    if "rope_index" in attn._buffers:
        del attn._buffers["rope_index"]
    attn.register_buffer("rope_index", rope_index.to(torch.long).contiguous())


def full_rope_index(n_kv: int, head_dim: int) -> torch.Tensor:
    """The index of an unreduced attention: every dimension of every group, in order."""
    return torch.arange(head_dim).repeat(n_kv, 1)
