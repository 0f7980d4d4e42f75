"""Compressed modules. Each one can describe itself (:meth:`spec`), be rebuilt empty from that
description (``from_spec``) for checkpoint loading, and multiply itself out (:meth:`dense_weight`)
for the dense export."""

from __future__ import annotations

from torch import nn

from .bcq import BCQLinear
from .lora import LoRALinear
from .lowrank import LowRankLinear
from .quant import QuantLinear
from .sparse import ArmorLinear, Sparse24Linear

#: compressed module types by name, as written in the checkpoint manifest
MODULE_TYPES: dict[str, type[nn.Module]] = {
    "LowRankLinear": LowRankLinear,
    "QuantLinear": QuantLinear,
    "BCQLinear": BCQLinear,
    "Sparse24Linear": Sparse24Linear,
    "ArmorLinear": ArmorLinear,
    "LoRALinear": LoRALinear,
}


def weight_count(module: nn.Module) -> int:
    """Weights a (compressed) linear represents: parameters, or the codes of a quantized layer (bias excluded)."""
    if hasattr(module, "num_weights"):
        return int(module.num_weights())
    return sum(p.numel() for n, p in module.named_parameters() if not n.endswith("bias"))


def is_compressed(module: nn.Module) -> bool:
    return type(module).__name__ in MODULE_TYPES


def storage_bits(module: nn.Module) -> int:
    """Bits the weight of a (compressed) linear occupies as stored (bias excluded)."""
    if hasattr(module, "storage_bits"):
        return int(module.storage_bits())
    return sum(8 * p.numel() * p.element_size() for n, p in module.named_parameters() if not n.endswith("bias"))


__all__ = ["MODULE_TYPES", "ArmorLinear", "BCQLinear", "LoRALinear", "LowRankLinear", "Sparse24Linear", "QuantLinear", "storage_bits", "weight_count"]
