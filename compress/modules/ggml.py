"""GGMLLinear: a linear whose weight is stored as llama.cpp's block bytes (q4_0, q4_k, …).

Storage (all in the checkpoint):
- ``blocks``: uint8 (d_out, d_in/block·type_size), each row of W as consecutive blocks of the GGML
  type, byte for byte what a GGUF file holds for this tensor (see :mod:`compress.solvers.ggml`);
- ``bias``: in the compute dtype, if the layer had one.
The GGUF export copies ``blocks`` unchanged, so llama.cpp computes with exactly this checkpoint's weights.
"""

from __future__ import annotations

from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from ..dtypes import spec_dtype
from ..solvers import ggml
from .base import CompressedLinear, cached_dense_weight, cached_kernel_layout, dense_cache_enabled


class GGMLLinear(CompressedLinear):
    weights_in_buffers = True
    blocks: torch.Tensor

    def __init__(self, in_features: int, out_features: int, ggml_type: str, bias: bool = False,
                 dtype: torch.dtype = torch.float32, device: torch.device | str | None = None) -> None:
        super().__init__()
        if ggml_type not in ggml.TYPES:
            raise ValueError(f"unknown GGML type {ggml_type!r}; known: {', '.join(ggml.TYPES)}")
        self.in_features, self.out_features = in_features, out_features
        self.gtype = ggml.TYPES[ggml_type]
        if in_features % self.gtype.block:
            raise ValueError(f"{ggml_type} needs an input width divisible by {self.gtype.block}, got {in_features}")
        self.compute_dtype = dtype
        self.register_buffer("blocks", torch.zeros(out_features, self.gtype.row_bytes(in_features), dtype=torch.uint8, device=device))
        self.bias = nn.Parameter(torch.zeros(out_features, dtype=dtype, device=device)) if bias else None

    @classmethod
    def from_blocks(cls, blocks: torch.Tensor, ggml_type: str, in_features: int, bias: torch.Tensor | None,
                    like: torch.Tensor) -> "GGMLLinear":
        mod = cls(in_features, blocks.shape[0], ggml_type, bias is not None, dtype=like.dtype, device=like.device)
        with torch.no_grad():
            mod.blocks.copy_(blocks)
            if bias is not None:
                assert mod.bias is not None
                mod.bias.copy_(bias)
        return mod

    def dense_weight(self) -> torch.Tensor:
        return ggml.decode(self.blocks.cpu(), self.gtype, self.out_features, self.in_features).to(
            device=self.blocks.device, dtype=self.compute_dtype)

    def cpu_kernel(self) -> str | None:
        """"int4" where the type's 4-bit codes fit PyTorch's int4 CPU matmul (q4_0, q4_1, q4_k: one scale
        and offset per 32 values), else None (the layer dequantizes)."""
        from ..kernels import cpu

        ok = self.gtype.name in ("q4_0", "q4_1", "q4_k") and cpu.int4_fits(self.out_features, self.in_features, 32)
        return "int4" if ok else None

    def _cpu_layout(self) -> tuple[torch.Tensor, torch.Tensor]:
        """S·(c − zero) or S·c − M as (c − 8)·S + t: t = (8 − zero)·S, or 8·S − M (rounded once in float32)."""
        from ..kernels import cpu

        c, S, M = ggml.unpack(self.blocks.cpu(), self.gtype, self.out_features, self.in_features)
        t = (8.0 - self.gtype.zero) * S if self.gtype.form == "zero" else 8.0 * S - M
        return cpu.int4_layout(c, S, t)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        from ..kernels import cpu

        if cpu.applies(x, dense_cache_enabled(self), self.kernels()) and (kind := self.cpu_kernel()):
            packed, scales = cached_kernel_layout(self, ("blocks",), self._cpu_layout)
            return cpu.linear(x, kind, 32, packed, scales, self.bias)
        return F.linear(x, cached_dense_weight(self, ("blocks",)).to(x.dtype), self.bias)

    def num_weights(self) -> int:
        return self.in_features * self.out_features

    def storage_bits(self) -> int:
        return 8 * self.blocks.numel()

    def spec(self) -> dict[str, Any]:
        return {
            "in_features": self.in_features, "out_features": self.out_features, "ggml_type": self.gtype.name,
            "bias": self.bias is not None, "compute_dtype": str(self.compute_dtype).replace("torch.", ""),
        }

    @classmethod
    def from_spec(cls, spec: dict[str, Any], dtype: torch.dtype, device: torch.device | str = "cpu") -> "GGMLLinear":
        return cls(spec["in_features"], spec["out_features"], spec["ggml_type"], spec["bias"],
                   dtype=spec_dtype(spec.get("compute_dtype", ""), dtype), device=device)

    def extra_repr(self) -> str:
        return f"in_features={self.in_features}, out_features={self.out_features}, type={self.gtype.name}"
