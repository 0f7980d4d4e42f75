"""PyTorch's own weight-only matmuls on the CPU, for quantized layers whose codes fit them exactly.

- int4 (``aten._weight_int4pack_mm_for_cpu``): 4-bit codes c in groups of 32, 64, 128 or 256 along
  the input, one float scale s and offset t per group: w = (c − 8)·s + t. Output width a multiple of 16.
- int8 (``aten._weight_int8pack_mm``): 8-bit signed codes, one scale per output channel: w = q·s.

A batch-1 decoding step then reads 4 (8) bits per weight instead of dequantizing every weight. The
ops are fast on the CPU only in bfloat16 (in float32 and float16 they run a slow generic loop, 10–60×
slower than a dense float32 matmul here), so the activations and the per-group scales and offsets go
in as bfloat16 and the result comes back in the input's dtype: the same codes, with scales rounded
to bfloat16's 8-bit significand (the effect on perplexity is measured in bench/results/cpu_decode.md).
Used only outside compress's own loops (calibration and evaluation keep a dense float cache of each
layer and compute exactly), on tensors that need no gradient, and not under the ``torch`` kernel
preference (``COMPRESS_KERNELS=torch``: the exact dequantizing path everywhere).
"""

from __future__ import annotations

import torch

INT4_GROUPS = (32, 64, 128, 256)


def int4_fits(out_features: int, in_features: int, group: int) -> bool:
    return group in INT4_GROUPS and out_features % 16 == 0 and in_features % group == 0


#: the dtype the ops compute in (see the module docstring)
COMPUTE = torch.bfloat16


def int4_layout(codes: torch.Tensor, scale: torch.Tensor, offset: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """codes (d_out, d_in) in [0, 15]; scale, offset (d_out, d_in/group) → the op's (packed, scales_and_zeros)."""
    packed = torch.ops.aten._convert_weight_to_int4pack_for_cpu(codes.to(torch.int32).contiguous(), 1)
    return packed, torch.stack([scale.float().T, offset.float().T], dim=2).to(COMPUTE).contiguous()


def int8_layout(q: torch.Tensor, scale: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """q (d_out, d_in) int8, scale (d_out,) → the op's (weight, scales)."""
    return q.to(torch.int8).contiguous(), scale.to(COMPUTE).contiguous()


def applies(x: torch.Tensor, dense_cached: bool, preference: str) -> bool:
    """The CPU ops run for input ``x`` of a module whose dense cache is (not) on, under kernel ``preference``."""
    return x.device.type == "cpu" and not x.requires_grad and not dense_cached and preference != "torch"


def linear(x: torch.Tensor, kind: str, group: int, packed: torch.Tensor, scales: torch.Tensor, bias: torch.Tensor | None) -> torch.Tensor:
    """y = x·Wᵀ (+ bias) through the op of ``kind`` with a layout from :func:`int4_layout` / :func:`int8_layout`."""
    d_out = packed.shape[0]
    x2 = x.reshape(-1, x.shape[-1]).to(COMPUTE).contiguous()
    if kind == "int4":
        y = torch.ops.aten._weight_int4pack_mm_for_cpu(x2, packed, group, scales)
    else:
        y = torch.ops.aten._weight_int8pack_mm(x2, packed, scales)
    y = y.to(x.dtype).reshape(*x.shape[:-1], d_out)
    return y + bias if bias is not None else y
