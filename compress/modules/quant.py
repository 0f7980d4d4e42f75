"""QuantLinear: uniform-quantized weights stored packed, with a reference forward that dequantizes.

Storage (buffers, all in the checkpoint):
- ``qweight``: uint8, the d_out·d_in integer codes of W in (d_out, d_in) row-major order, packed
  densely with ``bits`` bits per code (see :mod:`compress.solvers.packing`; 3-bit codes take 3 bits).
- ``scales``: float16, per group. ``dim="oc"``: (d_out, d_in/g), group k of row i covers inputs
  [k·g, (k+1)·g). ``dim="ic"``: (d_in, d_out/g), group k of input column j covers outputs [k·g, (k+1)·g).
- ``qzeros``: uint8, the integer zero-points in the same layout as ``scales``, packed with ``bits``
  bits each (row-major); empty for symmetric quantization (zero = 2^(bits−1)).
- ``bias``: in the compute dtype, if the layer had one.
W = (q − zero)·scale.
"""

from __future__ import annotations

from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from ..dtypes import spec_dtype
from ..solvers.packing import pack_bits, packed_nbytes, unpack_bits
from ..solvers.quant import SCALE_DTYPE, Quantized, QuantSpec, dequantize
from .base import CompressedLinear, cached_dense_weight, cached_kernel_layout, dense_cache_enabled


class QuantLinear(CompressedLinear):
    weights_in_buffers = True
    # buffers (registered in __init__)
    qweight: torch.Tensor
    scales: torch.Tensor
    qzeros: torch.Tensor

    def __init__(
        self,
        in_features: int,
        out_features: int,
        bits: int,
        group_size: int,
        dim: str = "oc",
        sym: bool = False,
        bias: bool = False,
        dtype: torch.dtype = torch.float32,
        device: torch.device | str | None = None,
        levels: str = "uniform",
    ) -> None:
        super().__init__()
        self.in_features, self.out_features = in_features, out_features
        self.qspec = QuantSpec(bits=bits, group_size=group_size, sym=sym, dim=dim, levels=levels)
        self.compute_dtype = dtype
        g, n = self.qspec.groups(out_features, in_features)
        channels = out_features if dim == "oc" else in_features
        self.register_buffer("qweight", torch.zeros(packed_nbytes(out_features * in_features, bits), dtype=torch.uint8, device=device))
        self.register_buffer("scales", torch.zeros(channels, n, dtype=SCALE_DTYPE, device=device))
        nz = 0 if (sym or levels == "nf") else packed_nbytes(channels * n, bits)
        self.register_buffer("qzeros", torch.zeros(nz, dtype=torch.uint8, device=device))
        self.bias = nn.Parameter(torch.zeros(out_features, dtype=dtype, device=device)) if bias else None

    @classmethod
    def from_quantized(cls, qz: Quantized, bias: torch.Tensor | None, like: torch.Tensor) -> "QuantLinear":
        s = qz.spec
        d_out, d_in = qz.q.shape
        mod = cls(d_in, d_out, s.bits, s.group_size, s.dim, s.sym, bias is not None, dtype=like.dtype, device=like.device,
                  levels=s.levels)
        with torch.no_grad():
            mod.qweight.copy_(pack_bits(qz.q.reshape(-1), s.bits))
            mod.scales.copy_(qz.scales)
            if mod.qzeros.numel():
                mod.qzeros.copy_(pack_bits(qz.zeros.reshape(-1), s.bits))
            if bias is not None:
                assert mod.bias is not None
                mod.bias.copy_(bias)
        return mod

    def codes(self) -> torch.Tensor:
        """The integer codes (d_out, d_in), uint8."""
        n = self.out_features * self.in_features
        return unpack_bits(self.qweight, self.qspec.bits, n).reshape(self.out_features, self.in_features)

    def zeros(self) -> torch.Tensor:
        if self.qspec.levels == "nf":
            return torch.zeros(self.scales.shape, dtype=torch.uint8, device=self.scales.device)
        if self.qspec.sym:
            return torch.full(self.scales.shape, (self.qspec.maxq + 1) // 2, dtype=torch.uint8, device=self.scales.device)
        return unpack_bits(self.qzeros, self.qspec.bits, self.scales.numel()).reshape(self.scales.shape)

    def dense_weight(self) -> torch.Tensor:
        return dequantize(self.codes(), self.scales, self.zeros(), self.qspec).to(self.compute_dtype)

    def lut_compatible(self) -> bool:
        """Per-OC uniform codes of 1-4 bits with groups of a multiple of 8 convert exactly to BCQ,
        so on CUDA the layer runs through the LUT-GEMM op."""
        s = self.qspec
        g = s.group_size or self.in_features
        return s.dim == "oc" and s.levels == "uniform" and s.bits <= 4 and g % 8 == 0 and self.in_features % 8 == 0

    def _bcq_kernel_layout(self) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        from ..kernels.layout import bcq_kernel_layout
        from ..solvers.bcq import bcq_from_uniform
        from ..solvers.packing import pack_signs

        b = bcq_from_uniform(Quantized(q=self.codes(), scales=self.scales, zeros=self.zeros(), spec=self.qspec))
        return bcq_kernel_layout(pack_signs(b.signs), b.alpha, b.offset)

    def cpu_kernel(self) -> str | None:
        """PyTorch's weight-only CPU matmul these codes fit exactly (:mod:`compress.kernels.cpu`): "int4"
        (4-bit groups of 32–256 along the input), "int8" (8-bit symmetric, one scale per output channel), or None."""
        from ..kernels import cpu

        s = self.qspec
        if s.dim != "oc" or s.levels != "uniform":
            return None
        g = s.group_size or self.in_features
        if s.bits == 4 and cpu.int4_fits(self.out_features, self.in_features, g):
            return "int4"
        if s.bits == 8 and s.sym and g == self.in_features:
            return "int8"
        return None

    def _cpu_layout(self) -> tuple[torch.Tensor, torch.Tensor]:
        """int4 computes (c − 8)·s + t per group, so t = (8 − z)·s (exact in float32); int8 (c − 128)·s."""
        from ..kernels import cpu

        q, s = self.codes(), self.scales.float()
        if self.cpu_kernel() == "int8":
            return cpu.int8_layout(q.to(torch.int16) - 128, s[:, 0])
        return cpu.int4_layout(q, s, (8.0 - self.zeros().float()) * s)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        from ..kernels import cpu

        if cpu.applies(x, dense_cache_enabled(self), self.kernels()) and (kind := self.cpu_kernel()):
            packed, scales = cached_kernel_layout(self, ("qweight", "scales", "qzeros"), self._cpu_layout)
            return cpu.linear(x, kind, self.qspec.group_size or self.in_features, packed, scales, self.bias)
        if x.is_cuda and self.lut_compatible():
            from ..kernels.ops import bcq_linear

            kp, a, o = cached_kernel_layout(self, ("qweight", "scales", "qzeros"), self._bcq_kernel_layout)
            return bcq_linear(x, kp, a, o, self.in_features, self.bias, self.kernels())
        return F.linear(x, cached_dense_weight(self, ("qweight", "scales", "qzeros")).to(x.dtype), self.bias)

    def num_weights(self) -> int:
        return self.in_features * self.out_features

    def storage_bits(self) -> int:
        """Bits of the stored weight: packed codes + float16 scales + packed zeros (bias excluded)."""
        return 8 * (self.qweight.numel() + self.qzeros.numel()) + 16 * self.scales.numel()

    def spec(self) -> dict[str, Any]:
        return {
            "in_features": self.in_features,
            "out_features": self.out_features,
            "bits": self.qspec.bits,
            "group_size": self.qspec.group_size,
            "dim": self.qspec.dim,
            "sym": self.qspec.sym,
            "bias": self.bias is not None,
            "compute_dtype": str(self.compute_dtype).replace("torch.", ""),
            "levels": self.qspec.levels,
        }

    @classmethod
    def from_spec(cls, spec: dict[str, Any], dtype: torch.dtype, device: torch.device | str = "cpu") -> "QuantLinear":
        return cls(
            spec["in_features"], spec["out_features"], spec["bits"], spec["group_size"], spec["dim"], spec["sym"],
            spec["bias"], dtype=spec_dtype(spec.get("compute_dtype", ""), dtype), device=device,
            levels=spec.get("levels", "uniform"),
        )

    def extra_repr(self) -> str:
        s = self.qspec
        return f"in_features={self.in_features}, out_features={self.out_features}, bits={s.bits}, group={s.group_size}, dim={s.dim}, sym={s.sym}"
