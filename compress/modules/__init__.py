"""Compressed modules. Each one can describe itself (:meth:`spec`), be rebuilt empty from that
description (``from_spec``) for checkpoint loading, and multiply itself out (:meth:`dense_weight`)
for the dense export."""

from __future__ import annotations

from torch import nn

from .lowrank import LowRankLinear

#: compressed module types by name, as written in the checkpoint manifest
MODULE_TYPES: dict[str, type[nn.Module]] = {"LowRankLinear": LowRankLinear}

__all__ = ["MODULE_TYPES", "LowRankLinear"]
