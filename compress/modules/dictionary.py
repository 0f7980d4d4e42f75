"""DictLinear: y = C·(A·x) + bias with a dense dictionary A and sparse coefficients C (CoSpaDi).

Stored: ``atoms`` (A, k × d_in, the model's dtype), ``values`` (the non-zeros of C, row-major) and
the support of C — a packed k-bit mask per output row, or packed ⌈log₂ k⌉-bit column indices with
int32 row offsets ``crow``, whichever is smaller (:mod:`compress.solvers.dictionary`). The forward
goes through the ``compress::dict_linear`` op (dense dictionary product, then the sparse
coefficients); nothing dense is kept between calls.
"""

from __future__ import annotations

from typing import Any

import torch
from torch import nn

from ..kernels.ops import dict_linear
from ..solvers.dictionary import decode_coefficients, encode_coefficients, index_bits
from .base import CompressedLinear, QuantPart, build_module, dense_weight_of, module_spec, storage_bits


class DictLinear(CompressedLinear):
    """A linear layer stored as a dictionary (k atoms) and a sparse coefficient matrix.

    ``shared``: how many modules hold this very ``atoms`` tensor (a dictionary shared across layers,
    stored once in the checkpoint); each counts its share of it in :meth:`num_weights` and
    :meth:`storage_bits`, so that sums over the model count the dictionary once."""

    #: the weight is held in buffers (dictionary, values, support), not parameters
    weights_in_buffers = True
    #: a quantization pass quantizes its atoms and coefficient values (see :meth:`quantizable_parts`)
    quantized_as = "QuantDictLinear"
    # buffers (registered in __init__)
    atoms: torch.Tensor
    values: torch.Tensor
    support: torch.Tensor
    crow: torch.Tensor

    def __init__(
        self,
        in_features: int,
        out_features: int,
        atoms: int,
        nnz: int,
        fmt: str = "mask",
        bias: bool = False,
        shared: int = 1,
        dtype: torch.dtype | None = None,
        device: torch.device | str | None = None,
    ) -> None:
        super().__init__()
        if fmt not in ("full", "mask", "index"):
            raise ValueError(f"unknown support format {fmt!r}")
        self.in_features, self.out_features, self.n_atoms, self.nnz, self.fmt = in_features, out_features, atoms, nnz, fmt
        self.shared = shared
        self.register_buffer("atoms", torch.empty(atoms, in_features, dtype=dtype, device=device))
        self.register_buffer("values", torch.empty(nnz, dtype=dtype, device=device))
        if fmt == "full":
            self.register_buffer("support", torch.zeros(0, dtype=torch.uint8, device=device))
            self.register_buffer("crow", torch.zeros(0, dtype=torch.int32, device=device))
        elif fmt == "mask":
            self.register_buffer("support", torch.zeros(out_features, -(-atoms // 8), dtype=torch.uint8, device=device))
            self.register_buffer("crow", torch.zeros(0, dtype=torch.int32, device=device))
        else:
            self.register_buffer("support", torch.zeros(-(-nnz * index_bits(atoms) // 8), dtype=torch.uint8, device=device))
            self.register_buffer("crow", torch.zeros(out_features + 1, dtype=torch.int32, device=device))
        self.bias = nn.Parameter(torch.empty(out_features, dtype=dtype, device=device)) if bias else None

    @classmethod
    def from_factors(
        cls, A: torch.Tensor, C: torch.Tensor, mask: torch.Tensor, bias: torch.Tensor | None, like: torch.Tensor, fmt: str | None = None,
        shared_atoms: torch.Tensor | None = None, shared: int = 1,
    ) -> "DictLinear":
        """From atoms A (k × d_in) and coefficients C (d_out × k) on ``mask``, cast to ``like``'s dtype.
        ``shared_atoms`` (already in that dtype) is held as is, the same tensor as in the other
        ``shared - 1`` modules that use it."""
        values, support, crow = encode_coefficients(C, mask, fmt)
        fmt = "index" if crow.numel() else ("mask" if support.numel() else "full")
        mod = cls(A.shape[1], C.shape[0], A.shape[0], values.numel(), fmt, bias is not None, shared=shared, dtype=like.dtype, device=like.device)
        with torch.no_grad():
            if shared_atoms is not None:
                mod.atoms = shared_atoms
            else:
                mod.atoms.copy_(A)
            mod.values.copy_(values)
            mod.support.copy_(support)
            mod.crow.copy_(crow)
            if bias is not None:
                assert mod.bias is not None
                mod.bias.copy_(bias)
        return mod

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return dict_linear(x, self.atoms, self.values, self.support, self.crow, self.n_atoms, self.out_features, self.bias)

    def coefficients(self) -> torch.Tensor:
        """The dense d_out × k coefficient matrix."""
        return decode_coefficients(self.values, self.support, self.crow, self.n_atoms, self.out_features)

    def dense_weight(self) -> torch.Tensor:
        return self.coefficients() @ self.atoms

    def _atoms_share(self) -> int:
        return -(-self.atoms.numel() // self.shared)

    def num_weights(self) -> int:
        """Dictionary entries (this module's share of a shared dictionary) and stored coefficients;
        the support is counted in bits, not weights."""
        return self._atoms_share() + self.values.numel()

    def storage_bits(self) -> int:
        elt = 8 * self.atoms.element_size()
        return (self._atoms_share() + self.values.numel()) * elt + 8 * self.support.numel() + 32 * self.crow.numel()

    def spec(self) -> dict[str, Any]:
        return {
            "in_features": self.in_features, "out_features": self.out_features, "atoms": self.n_atoms,
            "nnz": self.nnz, "format": self.fmt, "bias": self.bias is not None, "shared": self.shared,
        }

    @classmethod
    def from_spec(cls, spec: dict[str, Any], dtype: torch.dtype, device: torch.device | str = "cpu") -> "DictLinear":
        return cls(spec["in_features"], spec["out_features"], spec["atoms"], spec["nnz"], spec["format"], spec["bias"],
                   shared=spec.get("shared", 1), dtype=dtype, device=device)

    def quantizable_parts(self) -> list[QuantPart]:
        """The atoms (a k × d_in matrix applied to the layer's input: input statistics apply, groups per
        output channel along d_in) and the coefficient values (in rows of ``group`` consecutive
        non-zeros, the tail padded with zeros)."""

        def values(group: int) -> torch.Tensor:
            v = self.values
            pad = (-v.numel()) % group
            return torch.cat([v, v.new_zeros(pad)]).reshape(-1, group)

        return [QuantPart("atoms", lambda _group: self.atoms, reads_input=True), QuantPart("values", values, reads_input=False)]

    def with_quantized_parts(self, parts: dict[str, nn.Module]) -> "QuantDictLinear":
        return QuantDictLinear.from_parts(self, parts["atoms"], parts["values"])

    def extra_repr(self) -> str:
        return (f"in_features={self.in_features}, out_features={self.out_features}, atoms={self.n_atoms}, "
                f"nnz={self.nnz} ({self.nnz / max(self.out_features, 1):.1f}/row), support={self.fmt}, bias={self.bias is not None}")


class QuantDictLinear(CompressedLinear):
    """A dictionary layer whose atoms and coefficient values are quantized (cospadi, then rtn/gptq).

    ``atoms``: a quantized linear d_in → k (per-output-channel groups along d_in). ``values``: the
    non-zero coefficients in row-major order, held as a quantized ⌈nnz/g⌉ × g matrix (one scale and
    zero-point per g consecutive values, the tail padded). The support is stored as in DictLinear.
    """

    weights_in_buffers = True
    # buffers (registered in __init__)
    support: torch.Tensor
    crow: torch.Tensor

    def __init__(self, in_features: int, out_features: int, atoms: int, nnz: int, fmt: str, atoms_spec: dict[str, Any],
                 values_spec: dict[str, Any], bias: bool = False, dtype: torch.dtype | None = None,
                 device: torch.device | str | None = None) -> None:
        super().__init__()
        self.in_features, self.out_features, self.n_atoms, self.nnz, self.fmt = in_features, out_features, atoms, nnz, fmt
        dtype = dtype or torch.float32
        self.atoms = build_module(atoms_spec, dtype=dtype, device=device or "cpu")
        self.values = build_module(values_spec, dtype=dtype, device=device or "cpu")
        twin = DictLinear(in_features, out_features, atoms, nnz, fmt, device="meta")
        self.register_buffer("support", torch.zeros(twin.support.shape, dtype=torch.uint8, device=device))
        self.register_buffer("crow", torch.zeros(twin.crow.shape, dtype=torch.int32, device=device))
        self.bias = nn.Parameter(torch.empty(out_features, dtype=dtype, device=device)) if bias else None

    @classmethod
    def from_parts(cls, source: DictLinear, atoms: nn.Module, values: nn.Module) -> "QuantDictLinear":
        """``source``'s support and bias with quantized ``atoms`` and ``values`` modules."""
        mod = cls(source.in_features, source.out_features, source.n_atoms, source.nnz, source.fmt, module_spec(atoms), module_spec(values),
                  source.bias is not None, dtype=source.atoms.dtype, device=source.atoms.device)
        mod.atoms, mod.values = atoms, values
        with torch.no_grad():
            mod.support.copy_(source.support)
            mod.crow.copy_(source.crow)
            if source.bias is not None:
                assert mod.bias is not None
                mod.bias.copy_(source.bias)
        return mod

    def coefficients(self) -> torch.Tensor:
        v = dense_weight_of(self.values).reshape(-1)[: self.nnz]
        return decode_coefficients(v, self.support, self.crow, self.n_atoms, self.out_features)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        z = self.atoms(x)
        return torch.nn.functional.linear(z, self.coefficients().to(x.dtype), None if self.bias is None else self.bias.to(x.dtype))

    def dense_weight(self) -> torch.Tensor:
        return self.coefficients() @ dense_weight_of(self.atoms)

    def num_weights(self) -> int:
        return self.n_atoms * self.in_features + self.nnz

    def storage_bits(self) -> int:
        return storage_bits(self.atoms) + storage_bits(self.values) + 8 * self.support.numel() + 32 * self.crow.numel()

    def spec(self) -> dict[str, Any]:
        return {
            "in_features": self.in_features, "out_features": self.out_features, "atoms": self.n_atoms, "nnz": self.nnz,
            "format": self.fmt, "atoms_module": module_spec(self.atoms), "values_module": module_spec(self.values),
            "bias": self.bias is not None,
        }

    @classmethod
    def from_spec(cls, spec: dict[str, Any], dtype: torch.dtype, device: torch.device | str = "cpu") -> "QuantDictLinear":
        return cls(spec["in_features"], spec["out_features"], spec["atoms"], spec["nnz"], spec["format"], spec["atoms_module"],
                   spec["values_module"], spec["bias"], dtype=dtype, device=device)
