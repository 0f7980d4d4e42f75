"""Tensor-level helpers shared by the checkpoint writer and the transformers quantizer: tied tensors
found and re-tied, parameters resized to a checkpoint's shapes, pass-added structure rebuilt."""

from __future__ import annotations

from typing import Any

import torch
from torch import nn

from .errors import CompressError

STRUCTURE_ATTR = "compress_structure"


def dedupe(state: dict[str, torch.Tensor]) -> tuple[dict[str, torch.Tensor], dict[str, str]]:
    """Drop tensors that share storage with an earlier one (tied weights); return (tensors, alias → kept name)."""
    kept: dict[str, torch.Tensor] = {}
    aliases: dict[str, str] = {}
    by_ptr: dict[tuple[int, int | torch.SymInt, tuple[int, ...]], str] = {}
    # the input embedding is kept over a tied output head
    for name in sorted(state, key=lambda n: ("lm_head" in n, n)):
        t = state[name]
        key = (t.untyped_storage().data_ptr(), t.storage_offset(), tuple(t.shape))
        if t.numel() and key in by_ptr:
            aliases[name] = by_ptr[key]
            continue
        by_ptr[key] = name
        kept[name] = t.detach().to("cpu").contiguous()
    return kept, aliases


def rebuild_structure(model: nn.Module, structure: dict[str, Any], dtype: torch.dtype) -> None:
    """Let each pass that added structure rebuild it on a freshly built model, before the weights load."""
    from .adapters import get_adapter
    from .passes.base import ModelPass
    from .registry import get_pass

    if not structure:
        return
    adapter = get_adapter(model)
    for name, desc in structure.items():
        try:
            cls = get_pass(name)
        except CompressError:
            raise CompressError(f"the checkpoint's structure was made by pass '{name}', unknown to this version; upgrade compress") from None
        assert issubclass(cls, ModelPass)  # only model-level passes add structure
        cls.rebuild(model, adapter, desc, dtype)
    setattr(model.config, STRUCTURE_ATTR, dict(structure))


def resize_to(model: nn.Module, shapes: dict[str, tuple[int, ...]], device: torch.device | str = "cpu") -> None:
    """Reshape parameters and buffers whose saved shape differs (sliced models store smaller matrices)."""
    for name, shape in shapes.items():
        owner, _, attr = name.rpartition(".")
        try:
            mod = model.get_submodule(owner) if owner else model
        except AttributeError:
            continue  # not a tensor of this model: the loader reports it
        cur = getattr(mod, attr, None)
        if not isinstance(cur, torch.Tensor) or tuple(cur.shape) == tuple(shape):
            continue
        if attr in mod._parameters:
            mod._parameters[attr] = nn.Parameter(torch.empty(shape, dtype=cur.dtype, device=device), requires_grad=cur.requires_grad)
        else:
            mod._buffers[attr] = torch.empty(shape, dtype=cur.dtype, device=device)
        if isinstance(mod, nn.Linear) and attr == "weight":
            mod.out_features, mod.in_features = shape
        if isinstance(mod, nn.Embedding) and attr == "weight":
            mod.embedding_dim = shape[1]


def retie(model: nn.Module, tied: dict[str, str]) -> None:
    """Make each alias the very same parameter (or buffer) as its source (tied embeddings, a
    dictionary shared across layers)."""
    for alias, src in tied.items():
        owner, _, attr = alias.rpartition(".")
        s_owner, _, s_attr = src.rpartition(".")
        src_param = getattr(model.get_submodule(s_owner) if s_owner else model, s_attr)
        mod = model.get_submodule(owner) if owner else model
        if isinstance(src_param, nn.Parameter) and attr in mod._parameters:
            mod._parameters[attr] = src_param
        elif isinstance(src_param, torch.Tensor) and attr in mod._buffers:
            mod._buffers[attr] = src_param
