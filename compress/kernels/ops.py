"""``torch.library`` ops used by the compressed modules. Each has a default implementation in plain
PyTorch that runs on any device, and a fake implementation so that ``torch.compile`` can trace it.
Callers always go through the op; faster device implementations register for their dispatch key."""

from __future__ import annotations

import torch
import torch.nn.functional as F

from ..solvers.sparse24 import unpack_24


@torch.library.custom_op("compress::sparse24_linear", mutates_args=())
def sparse24_linear(x: torch.Tensor, values: torch.Tensor, meta: torch.Tensor, bias: torch.Tensor | None) -> torch.Tensor:
    """y = x Wᵀ + bias with W in compressed 2:4 form (values, meta); reference: decompress then matmul."""
    W = unpack_24(values, meta).to(x.dtype)
    return F.linear(x, W, None if bias is None else bias.to(x.dtype))


@sparse24_linear.register_fake
def _sparse24_linear_fake(x: torch.Tensor, values: torch.Tensor, meta: torch.Tensor, bias: torch.Tensor | None) -> torch.Tensor:
    return x.new_empty(*x.shape[:-1], values.shape[0])
