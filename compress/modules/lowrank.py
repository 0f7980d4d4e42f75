"""LowRankLinear: y = B (A x) + bias, two small matmuls in place of one d_out × d_in matmul."""

from __future__ import annotations

from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from .base import CompressedLinear


class LowRankLinear(CompressedLinear):
    """A linear layer stored as ``weight_out`` (B, d_out × r) @ ``weight_in`` (A, r × d_in)."""

    def __init__(
        self,
        in_features: int,
        out_features: int,
        rank: int,
        bias: bool = False,
        dtype: torch.dtype | None = None,
        device: torch.device | str | None = None,
    ) -> None:
        super().__init__()
        self.in_features = in_features
        self.out_features = out_features
        self.rank = rank
        self.weight_in = nn.Parameter(torch.empty(rank, in_features, dtype=dtype, device=device))
        self.weight_out = nn.Parameter(torch.empty(out_features, rank, dtype=dtype, device=device))
        self.bias = nn.Parameter(torch.empty(out_features, dtype=dtype, device=device)) if bias else None

    @classmethod
    def from_factors(cls, B: torch.Tensor, A: torch.Tensor, bias: torch.Tensor | None, like: torch.Tensor) -> "LowRankLinear":
        """Build from factors B (d_out × r) and A (r × d_in), cast to ``like``'s dtype and device."""
        mod = cls(A.shape[1], B.shape[0], A.shape[0], bias is not None, dtype=like.dtype, device=like.device)
        with torch.no_grad():
            mod.weight_in.copy_(A)
            mod.weight_out.copy_(B)
            if bias is not None:
                assert mod.bias is not None
                mod.bias.copy_(bias)
        return mod

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.linear(F.linear(x, self.weight_in), self.weight_out, self.bias)

    def dense_weight(self) -> torch.Tensor:
        """B @ A, the weight of the equivalent nn.Linear."""
        return self.weight_out @ self.weight_in

    def spec(self) -> dict[str, Any]:
        return {
            "in_features": self.in_features,
            "out_features": self.out_features,
            "rank": self.rank,
            "bias": self.bias is not None,
        }

    @classmethod
    def from_spec(cls, spec: dict[str, Any], dtype: torch.dtype, device: torch.device | str = "cpu") -> "LowRankLinear":
        return cls(spec["in_features"], spec["out_features"], spec["rank"], spec["bias"], dtype=dtype, device=device)

    def extra_repr(self) -> str:
        return f"in_features={self.in_features}, out_features={self.out_features}, rank={self.rank}, bias={self.bias is not None}"
