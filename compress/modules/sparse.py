"""2:4 modules: the compressed form is stored, not a dense masked matrix.

``Sparse24Linear``: buffers ``values`` (d_out × d_in/2, the kept weights) and ``meta`` (uint8,
d_out × d_in/8, two 4-bit position codes per byte; layout in :mod:`compress.solvers.sparse24`).
``ArmorLinear``: y = A·(core·(B·x)) with block-diagonal A and B stored as (n_blocks × b × b) buffers
and the 2:4 core stored as in Sparse24Linear. Both call the ``compress::sparse24_linear`` op.
"""

from __future__ import annotations

from typing import Any

import torch
from torch import nn

from ..dtypes import spec_dtype
from ..kernels.ops import sparse24_linear
from ..solvers.armor import bd_left, bd_right
from ..solvers.sparse24 import pack_24, unpack_24
from .base import CompressedLinear


class Sparse24Linear(CompressedLinear):
    #: the weight is held in buffers (codes, compressed values), not parameters
    weights_in_buffers = True

    is_sparse_24 = True
    # buffers (registered in __init__)
    values: torch.Tensor
    meta: torch.Tensor

    def __init__(self, in_features: int, out_features: int, bias: bool = False, dtype: torch.dtype = torch.float32,
                 device: torch.device | str | None = None) -> None:
        super().__init__()
        if in_features % 8:
            raise ValueError(f"2:4 storage needs the input dimension divisible by 8, got {in_features}")
        self.in_features, self.out_features = in_features, out_features
        self.register_buffer("values", torch.zeros(out_features, in_features // 2, dtype=dtype, device=device))
        self.register_buffer("meta", torch.zeros(out_features, in_features // 8, dtype=torch.uint8, device=device))
        self.bias = nn.Parameter(torch.zeros(out_features, dtype=dtype, device=device)) if bias else None

    @classmethod
    def from_dense(cls, W: torch.Tensor, bias: torch.Tensor | None, keep: torch.Tensor | None = None) -> "Sparse24Linear":
        """From a dense weight that satisfies 2:4 (ValueError otherwise)."""
        values, meta = pack_24(W, keep)
        mod = cls(W.shape[1], W.shape[0], bias is not None, dtype=W.dtype, device=W.device)
        with torch.no_grad():
            mod.values.copy_(values)
            mod.meta.copy_(meta)
            if bias is not None:
                assert mod.bias is not None
                mod.bias.copy_(bias)
        return mod

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return sparse24_linear(x, self.values, self.meta, self.bias, self.kernels())

    def dense_weight(self) -> torch.Tensor:
        return unpack_24(self.values, self.meta)

    def num_weights(self) -> int:
        return self.in_features * self.out_features

    def storage_bits(self) -> int:
        return 8 * (self.values.numel() * self.values.element_size() + self.meta.numel())

    def spec(self) -> dict[str, Any]:
        return {"in_features": self.in_features, "out_features": self.out_features, "bias": self.bias is not None,
                "dtype": str(self.values.dtype).replace("torch.", "")}

    @classmethod
    def from_spec(cls, spec: dict[str, Any], dtype: torch.dtype, device: torch.device | str = "cpu") -> "Sparse24Linear":
        return cls(spec["in_features"], spec["out_features"], spec["bias"], spec_dtype(spec.get("dtype", ""), dtype), device)


class ArmorLinear(CompressedLinear):
    #: the weight is held in buffers (codes, compressed values), not parameters
    weights_in_buffers = True

    is_sparse_24 = True
    # buffers (registered in __init__)
    A: torch.Tensor
    B: torch.Tensor
    values: torch.Tensor
    meta: torch.Tensor

    def __init__(self, in_features: int, out_features: int, block: int, bias: bool = False,
                 dtype: torch.dtype = torch.float32, device: torch.device | str | None = None) -> None:
        super().__init__()
        self.in_features, self.out_features, self.block = in_features, out_features, block
        self.register_buffer("A", torch.zeros(out_features // block, block, block, dtype=dtype, device=device))
        self.register_buffer("B", torch.zeros(in_features // block, block, block, dtype=dtype, device=device))
        self.register_buffer("values", torch.zeros(out_features, in_features // 2, dtype=dtype, device=device))
        self.register_buffer("meta", torch.zeros(out_features, in_features // 8, dtype=torch.uint8, device=device))
        self.bias = nn.Parameter(torch.zeros(out_features, dtype=dtype, device=device)) if bias else None

    @classmethod
    def from_factors(cls, A: torch.Tensor, core: torch.Tensor, B: torch.Tensor, keep: torch.Tensor,
                     bias: torch.Tensor | None, like: torch.Tensor) -> "ArmorLinear":
        d_out, d_in = core.shape
        mod = cls(d_in, d_out, A.shape[1], bias is not None, dtype=like.dtype, device=like.device)
        values, meta = pack_24(core.to(like.dtype), keep)
        with torch.no_grad():
            mod.A.copy_(A)
            mod.B.copy_(B)
            mod.values.copy_(values)
            mod.meta.copy_(meta)
            if bias is not None:
                assert mod.bias is not None
                mod.bias.copy_(bias)
        return mod

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        shape = x.shape
        nB, b = self.B.shape[0], self.block
        t = torch.einsum("...nk,njk->...nj", x.reshape(*shape[:-1], nB, b), self.B.to(x.dtype)).reshape(shape)  # B·x
        u = sparse24_linear(t, self.values, self.meta, None, self.kernels())  # core·(B·x)
        nA = self.A.shape[0]
        y = torch.einsum("...nk,njk->...nj", u.reshape(*shape[:-1], nA, b), self.A.to(x.dtype))
        y = y.reshape(*shape[:-1], self.out_features)
        return y if self.bias is None else y + self.bias.to(x.dtype)

    def dense_weight(self) -> torch.Tensor:
        return bd_right(bd_left(self.A, unpack_24(self.values, self.meta)), self.B)

    def num_weights(self) -> int:
        return self.in_features * self.out_features

    def extra_params(self) -> int:
        return self.A.numel() + self.B.numel()

    def storage_bits(self) -> int:
        return 8 * (self.values.numel() * self.values.element_size() + self.meta.numel()
                    + (self.A.numel() + self.B.numel()) * self.A.element_size())

    def spec(self) -> dict[str, Any]:
        return {"in_features": self.in_features, "out_features": self.out_features, "block": self.block,
                "bias": self.bias is not None, "dtype": str(self.values.dtype).replace("torch.", "")}

    @classmethod
    def from_spec(cls, spec: dict[str, Any], dtype: torch.dtype, device: torch.device | str = "cpu") -> "ArmorLinear":
        return cls(spec["in_features"], spec["out_features"], spec["block"], spec["bias"],
                   spec_dtype(spec.get("dtype", ""), dtype), device)
