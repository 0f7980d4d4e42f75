"""Compressed modules. Each one derives from :class:`~compress.modules.base.CompressedLinear`, which
registers it by class name: it can describe itself (``spec``), be rebuilt empty from that description
(``from_spec``) for checkpoint loading, and multiply itself out (``dense_weight``) for the dense
export. Importing this package imports every module type, so the registry is complete."""

from __future__ import annotations

from .base import MODULE_TYPES, CompressedLinear, is_compressed, storage_bits, weight_count
from .bcq import BCQLinear
from .dictionary import DictLinear, QuantDictLinear
from .lora import LoRALinear
from .lowrank import LowRankLinear
from .quant import QuantLinear
from .sparse import ArmorLinear, Sparse24Linear

__all__ = [
    "MODULE_TYPES", "ArmorLinear", "BCQLinear", "CompressedLinear", "DictLinear", "LoRALinear", "LowRankLinear", "Sparse24Linear", "QuantDictLinear", "QuantLinear",
    "is_compressed", "storage_bits", "weight_count",
]
