"""BCQLinear: binary-coding-quantized weights (the layout the LUT-GEMM kernel reads).

Layout (buffers):
- ``planes``: uint8 (q, d_out, d_in/8). Byte [i, m, k] holds the signs of plane i for inputs
  8k … 8k+7 of output row m; bit t (least significant first) is 1 for b = +1 and 0 for b = −1 at
  input 8k + t. The packed dimension is the input dimension, so one byte indexes a 256-entry table
  of ±-sums of 8 consecutive activations.
- ``alpha``: float16 (q, d_out, d_in/g): α of plane i for output row m and input group k
  (inputs [k·g, (k+1)·g)).
- ``offset``: float32 (d_out, d_in/g): β per output row and input group.
W[m, j] = β[m, j//g] + Σ_i α[i, m, j//g]·(2·bit_i(m, j) − 1). Requires d_in and g divisible by 8.

The forward pass calls ``compress::bcq_linear`` (LUT-GEMM on CUDA, decode + matmul elsewhere) on the
kernel's tiled layout (:mod:`compress.kernels.layout`), built from these buffers once per device
and rebuilt whenever a buffer changes.
"""

from __future__ import annotations

from typing import Any

import torch
from torch import nn

from ..dtypes import spec_dtype
from ..kernels.layout import bcq_kernel_layout
from ..kernels.ops import bcq_linear
from ..solvers.bcq import ALPHA_DTYPE, BCQ, OFFSET_DTYPE
from ..solvers.packing import pack_signs, unpack_signs
from .base import CompressedLinear, cached_kernel_layout


class BCQLinear(CompressedLinear):
    weights_in_buffers = True
    # buffers (registered in __init__)
    planes: torch.Tensor
    alpha: torch.Tensor
    offset: torch.Tensor

    def __init__(
        self, in_features: int, out_features: int, bits: int, group_size: int, bias: bool = False,
        dtype: torch.dtype = torch.float32, device: torch.device | str | None = None,
    ) -> None:
        super().__init__()
        if in_features % 8 or group_size % 8:
            raise ValueError(f"BCQ needs d_in ({in_features}) and the group size ({group_size}) divisible by 8")
        self.in_features, self.out_features, self.bits, self.group_size = in_features, out_features, bits, group_size
        self.compute_dtype = dtype
        n = in_features // group_size
        self.register_buffer("planes", torch.zeros(bits, out_features, in_features // 8, dtype=torch.uint8, device=device))
        self.register_buffer("alpha", torch.zeros(bits, out_features, n, dtype=ALPHA_DTYPE, device=device))
        self.register_buffer("offset", torch.zeros(out_features, n, dtype=OFFSET_DTYPE, device=device))
        self.bias = nn.Parameter(torch.zeros(out_features, dtype=dtype, device=device)) if bias else None

    @classmethod
    def from_bcq(cls, b: BCQ, bias: torch.Tensor | None, like: torch.Tensor) -> "BCQLinear":
        q, d_out, d_in = b.signs.shape
        mod = cls(d_in, d_out, q, b.group_size, bias is not None, dtype=like.dtype, device=like.device)
        with torch.no_grad():
            mod.planes.copy_(pack_signs(b.signs))
            mod.alpha.copy_(b.alpha)
            mod.offset.copy_(b.offset)
            if bias is not None:
                assert mod.bias is not None
                mod.bias.copy_(bias)
        return mod

    def to_bcq(self) -> BCQ:
        return BCQ(signs=unpack_signs(self.planes), alpha=self.alpha, offset=self.offset, group_size=self.group_size)

    def dense_weight(self) -> torch.Tensor:
        return self.to_bcq().dequantize().to(self.compute_dtype)

    def kernel_layout(self) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        return cached_kernel_layout(self, ("planes", "alpha", "offset"), lambda: bcq_kernel_layout(self.planes, self.alpha, self.offset))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        kplanes, alpha_t, offset_t = self.kernel_layout()
        return bcq_linear(x, kplanes, alpha_t, offset_t, self.in_features, self.bias, self.kernels())

    def num_weights(self) -> int:
        return self.in_features * self.out_features

    def storage_bits(self) -> int:
        return 8 * self.planes.numel() + 16 * self.alpha.numel() + 32 * self.offset.numel()

    def spec(self) -> dict[str, Any]:
        return {
            "in_features": self.in_features, "out_features": self.out_features, "bits": self.bits,
            "group_size": self.group_size, "bias": self.bias is not None,
            "compute_dtype": str(self.compute_dtype).replace("torch.", ""),
        }

    @classmethod
    def from_spec(cls, spec: dict[str, Any], dtype: torch.dtype, device: torch.device | str = "cpu") -> "BCQLinear":
        return cls(
            spec["in_features"], spec["out_features"], spec["bits"], spec["group_size"], spec["bias"],
            dtype=spec_dtype(spec.get("compute_dtype", ""), dtype), device=device,
        )

    def extra_repr(self) -> str:
        return f"in_features={self.in_features}, out_features={self.out_features}, bits={self.bits}, group={self.group_size}"
