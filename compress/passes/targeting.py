"""Helpers that passes and the planner share about targets: name matching, module types, sizes, and
the one-line refusal of a layout an adapter does not describe."""

from __future__ import annotations

import fnmatch
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
    prefix = layers_path + "."
    rest = name[len(prefix):] if name.startswith(prefix) else name
    return rest.split(".", 1)[1] if "." in rest else rest


def matches(name: str, pattern: str) -> bool:
    """Whether a layer-relative linear name matches a ``targets=`` glob list ('|'-separated)."""
    return any(fnmatch.fnmatchcase(name, p.strip()) for p in str(pattern).split("|"))


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
