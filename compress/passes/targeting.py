"""Helpers that passes and the planner share about targets: name matching, module types, sizes, and
the one-line refusal of a layout an adapter does not describe."""

from __future__ import annotations

import fnmatch
import re
from typing import TYPE_CHECKING, Any

import torch
from torch import nn

from ..dtypes import element_bits
from ..errors import ConfigError
from .context import ANY, LINEAR, QUANTIZABLE

if TYPE_CHECKING:
    from ..adapters.base import ModelAdapter


def require_layout(pass_name: str, adapter: "ModelAdapter", what: str, missing: list[str],
                   fix: str = "a per-linear pass (see 'compress ls passes') works on any layout") -> None:
    """Refuse, in one line, an architecture whose adapter leaves the fields ``missing`` empty."""
    if not missing:
        return
    if adapter.model_types:  # a declared family whose layout fuses or lacks these pieces
        raise ConfigError(f"{pass_name} needs the {what} of the architecture as separate modules, which the '{adapter.name}' layout "
                          f"does not have (missing: {', '.join(missing)}); {fix}")
    from ..adapters import supported_model_types

    raise ConfigError(
        f"{pass_name} needs the {what} of the architecture, which adapter '{adapter.name}' does not describe "
        f"(missing: {', '.join(missing)}); supported families: {', '.join(supported_model_types())}"
    )


def dense_bits(d_out: int, d_in: int, dtype: torch.dtype) -> int:
    """Bits of a plain d_out × d_in weight in ``dtype``."""
    return d_out * d_in * element_bits(dtype)


def meta_storage_bits(module_cls: Any, *args: Any, **kwargs: Any) -> int:
    """Stored bits of a compressed module of these constructor arguments, from an instance on the
    meta device (exact, and no memory is allocated)."""
    return int(module_cls(*args, device="meta", **kwargs).storage_bits())


def layer_relative_name(name: str, layers_path: str) -> str:
    """'model.layers.3.self_attn.q_proj' → 'self_attn.q_proj'."""
    return split_index(layer_indexed_name(name, layers_path))[1]


def layer_indexed_name(name: str, layers_path: str) -> str:
    """'model.layers.3.self_attn.q_proj' → '3.self_attn.q_proj'."""
    prefix = layers_path + "."
    return name[len(prefix):] if name.startswith(prefix) else name


#: a ``targets=`` pattern narrowed to decoder layers: '3.mlp.down_proj', '0-5.self_attn.*'
_LAYERS = re.compile(r"^(\d+)(?:-(\d+))?\.(.+)$")


def split_index(name: str) -> tuple[int | None, str]:
    """'3.mlp.down_proj' → (3, 'mlp.down_proj'); 'mlp.down_proj' → (None, 'mlp.down_proj')."""
    head, _, rest = name.partition(".")
    return (int(head), rest) if head.isdigit() and rest else (None, name)


def matches(name: str, pattern: str) -> bool:
    """Whether a linear name matches a ``targets=`` glob list ('|'-separated). ``name`` is relative to
    its decoder layer ('mlp.down_proj') or carries the layer's index ('3.mlp.down_proj'); a pattern
    part that starts with an index or a range of them ('3.mlp.*', '0-5.self_attn.q_proj') matches only
    in those layers, and only names that carry an index."""
    index, rel = split_index(name)
    for part in str(pattern).split("|"):
        part = part.strip()
        m = _LAYERS.match(part)
        if m:
            lo = int(m.group(1))
            hi = int(m.group(2)) if m.group(2) else lo
            if index is None or not lo <= index <= hi:
                continue
            part = m.group(3)
        if fnmatch.fnmatchcase(rel, part):
            return True
    return False


def layer_qualified(pattern: str) -> bool:
    """Whether some part of a ``targets=`` pattern names decoder layers."""
    return any(_LAYERS.match(p.strip()) for p in str(pattern).split("|"))


def kind_of(module: nn.Module) -> str:
    """The module type name used in ``accepts``/``produces``."""
    return LINEAR if type(module) is nn.Linear else type(module).__name__


def accepts_kind(accepts: frozenset[str], kind: str) -> bool:
    """Whether a pass accepting ``accepts`` can take a target of module type ``kind``."""
    if ANY in accepts or kind in accepts:
        return True
    if QUANTIZABLE in accepts:
        from ..modules.base import MODULE_TYPES

        cls = MODULE_TYPES.get(kind)
        return cls is not None and cls.quantized_as is not None
    return False
