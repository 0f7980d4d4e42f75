"""LoRALinear: any (compressed) base module plus a low-rank branch, y = base(x) + B(A x).

The branch factors are modules themselves: ``lora_A`` (d_in → r) and ``lora_B`` (r → d_out), plain
bias-free ``nn.Linear`` or :class:`QuantLinear` when the branch is quantized. The checkpoint spec
nests the base's and the factors' own specs, so any base type composes.
"""

from __future__ import annotations

from typing import Any

import torch
from torch import nn

from .base import CompressedLinear, build_module, dense_weight_of, module_spec
from .base import storage_bits as _bits


class LoRALinear(CompressedLinear):
    def __init__(self, base: nn.Module, lora_A: nn.Module, lora_B: nn.Module) -> None:
        super().__init__()
        self.base, self.lora_A, self.lora_B = base, lora_A, lora_B
        self.rank = int(getattr(lora_A, "out_features"))
        self.in_features = int(getattr(lora_A, "in_features"))
        self.out_features = int(getattr(lora_B, "out_features"))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.base(x) + self.lora_B(self.lora_A(x))

    def branch_weights(self) -> tuple[torch.Tensor, torch.Tensor]:
        """(A (r × d_in), B (d_out × r)) as used in the forward (dequantized if quantized)."""
        return dense_weight_of(self.lora_A), dense_weight_of(self.lora_B)

    def dense_weight(self) -> torch.Tensor:
        A, B = self.branch_weights()
        return dense_weight_of(self.base) + B @ A

    @property
    def bias(self) -> torch.Tensor | None:
        return getattr(self.base, "bias", None)

    def num_weights(self) -> int:
        return self.in_features * self.out_features

    def storage_bits(self) -> int:
        """Base + branch; the base's bias is not counted."""
        return _bits(self.base) + _bits(self.lora_A) + _bits(self.lora_B)

    def spec(self) -> dict[str, Any]:
        return {"base": module_spec(self.base), "lora_A": module_spec(self.lora_A), "lora_B": module_spec(self.lora_B), "rank": self.rank}

    @classmethod
    def from_spec(cls, spec: dict[str, Any], dtype: torch.dtype, device: torch.device | str = "cpu") -> "LoRALinear":
        return cls(build_module(spec["base"], dtype, device), build_module(spec["lora_A"], dtype, device), build_module(spec["lora_B"], dtype, device))
