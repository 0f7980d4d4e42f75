"""LoRALinear: any (compressed) base module plus a low-rank branch, y = base(x) + B(A x).

The branch factors are modules themselves: ``lora_A`` (d_in → r) and ``lora_B`` (r → d_out), plain
bias-free ``nn.Linear`` or :class:`QuantLinear` when the branch is quantized. The checkpoint spec
nests the base's and the factors' own specs, so any base type composes.
"""

from __future__ import annotations

from typing import Any

import torch
from torch import nn


def _spec_of(m: nn.Module) -> dict[str, Any]:
    if isinstance(m, nn.Linear):
        return {"type": "Linear", "spec": {"in_features": m.in_features, "out_features": m.out_features, "bias": m.bias is not None}}
    return {"type": type(m).__name__, "spec": m.spec()}  # type: ignore[operator]


def _build(entry: dict[str, Any], dtype: torch.dtype, device: torch.device | str) -> nn.Module:
    from . import MODULE_TYPES

    if entry["type"] == "Linear":
        s = entry["spec"]
        return nn.Linear(s["in_features"], s["out_features"], bias=s["bias"], dtype=dtype, device=device)
    return MODULE_TYPES[entry["type"]].from_spec(entry["spec"], dtype=dtype, device=device)  # type: ignore[attr-defined]


def _dense(m: nn.Module) -> torch.Tensor:
    return m.weight if isinstance(m, nn.Linear) else m.dense_weight()  # type: ignore[operator]


def _bits(m: nn.Module) -> int:
    from . import storage_bits

    return storage_bits(m)


class LoRALinear(nn.Module):
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
        return _dense(self.lora_A), _dense(self.lora_B)

    def dense_weight(self) -> torch.Tensor:
        A, B = self.branch_weights()
        return _dense(self.base) + B @ A

    @property
    def bias(self) -> torch.Tensor | None:
        return getattr(self.base, "bias", None)

    def num_weights(self) -> int:
        return self.in_features * self.out_features

    def storage_bits(self) -> int:
        """Base + branch; the base's bias is not counted."""
        base_bits = _bits(self.base)
        return base_bits + _bits(self.lora_A) + _bits(self.lora_B)

    def spec(self) -> dict[str, Any]:
        return {"base": _spec_of(self.base), "lora_A": _spec_of(self.lora_A), "lora_B": _spec_of(self.lora_B), "rank": self.rank}

    @classmethod
    def from_spec(cls, spec: dict[str, Any], dtype: torch.dtype, device: torch.device | str = "cpu") -> "LoRALinear":
        return cls(_build(spec["base"], dtype, device), _build(spec["lora_A"], dtype, device), _build(spec["lora_B"], dtype, device))
