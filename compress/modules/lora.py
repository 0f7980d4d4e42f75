"""LoRALinear: any (compressed) base module plus a low-rank branch, y = base(x) + B(A x).

The branch factors are modules themselves: ``lora_A`` (d_in → r) and ``lora_B`` (r → d_out), plain
bias-free ``nn.Linear`` or :class:`QuantLinear` when the branch is quantized. The checkpoint spec
nests the base's and the factors' own specs, so any base type composes.
"""

from __future__ import annotations

from typing import Any

import torch
from torch import nn

from ..solvers.quant import QuantSpec, quantize_rtn
from .base import CompressedLinear, build_module, dense_weight_of, module_spec
from .base import storage_bits as _bits
from .quant import QuantLinear


def branch_bits(d_out: int, d_in: int, rank: int, bits: int, elt_bits: int) -> int:
    """Stored bits of a rank-r branch B (d_out × r) · A (r × d_in): plain factors at ``elt_bits`` each,
    or codes of ``bits`` with one float16 scale and one ``bits``-bit zero-point per factor row."""
    if not bits:
        return rank * (d_out + d_in) * elt_bits
    return rank * (d_out + d_in) * bits + (rank + d_out) * (16 + bits)


def branch_factor(weight: torch.Tensor, like: torch.Tensor, bits: int) -> nn.Module:
    """A bias-free linear holding one branch factor (out × in), quantized per row when bits > 0."""
    out_f, in_f = weight.shape
    if bits:
        return QuantLinear.from_quantized(quantize_rtn(weight.float(), QuantSpec(bits=bits, group_size=0)), None, like=like)
    lin = nn.Linear(in_f, out_f, bias=False, dtype=like.dtype, device=like.device)
    with torch.no_grad():
        lin.weight.copy_(weight)
    return lin


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
