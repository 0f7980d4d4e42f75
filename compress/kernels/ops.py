"""``torch.library`` ops used by the compressed modules.

Each op has a default implementation in plain PyTorch that runs on any device (CPU CI runs product
code through it), a CUDA implementation that calls the kernels of ``csrc/`` when they apply, and a
fake implementation so that ``torch.compile`` can trace it. Callers always go through the op; the
dispatcher picks the device.

Kernel preference: every op takes it as an argument; the compressed modules pass their own
(``module.kernel_preference``, set on a whole model with :func:`compress.modules.base.use_kernels`, else
``COMPRESS_KERNELS=auto|torch|cuda``, else ``auto``). ``auto`` uses a kernel where it applies and the
PyTorch path elsewhere (one log line per unsupported shape); ``torch`` always takes the PyTorch path;
``cuda`` raises where the kernel cannot run, naming why.

- ``compress::bcq_linear(x, kplanes, alpha_t, offset_t, in_features, bias)``: BCQ weights in the
  LUT-GEMM layout (:mod:`compress.kernels.layout`). Kernel: float16/bfloat16 activations, at most
  :data:`LUT_MAX_TOKENS` rows of x, 1–4 bit-planes, group size a multiple of 8.
- ``compress::sparse24_linear(x, values, meta, bias)``: 2:4 weights (values + 2-bit positions).
  Kernel: float16/bfloat16, at most :data:`SPARSE24_MAX_TOKENS` rows, K % 32 == 0. Larger batches
  use cuBLAS on the decompressed weight (the crossover to PyTorch's semi-structured path is to be
  measured by bench/kernels.py on a GPU).
"""

from __future__ import annotations

import logging
import os
from typing import Any

import torch
import torch.nn.functional as F

from ..errors import ConfigError
from ..solvers.dictionary import decode_coefficients
from ..solvers.sparse24 import unpack_24
from .layout import dense_from_kernel_layout

logger = logging.getLogger(__name__)

LUT_MAX_TOKENS = 8
SPARSE24_MAX_TOKENS = 16
CHOICES = ("auto", "torch", "cuda")
_warned: set[tuple] = set()


def default_preference() -> str:
    """The preference of modules that set none: ``COMPRESS_KERNELS``, else ``auto``."""
    p = os.environ.get("COMPRESS_KERNELS", "auto")
    if p not in CHOICES:
        raise ConfigError(f"COMPRESS_KERNELS={p!r}: use one of {', '.join(CHOICES)}")
    return p


def check_preference(p: str) -> str:
    if p not in CHOICES:
        raise ConfigError(f"kernel preference {p!r}: use one of {', '.join(CHOICES)}")
    return p


def _fallback(op: str, why: str, key: tuple, preference: str) -> None:
    """Called where a kernel cannot run: an error under preference 'cuda', else one log line per key."""
    if preference == "cuda":
        raise RuntimeError(f"{op}: the CUDA kernel cannot run here ({why}); use COMPRESS_KERNELS=auto to fall back")
    if key not in _warned:
        _warned.add(key)
        logger.info("%s: %s; using the PyTorch implementation", op, why)


def _extension(preference: str) -> Any:
    if check_preference(preference) == "torch":
        return None
    from .build import load, status

    ext = load()
    if ext is None:
        _fallback("compress kernels", status().reason, ("build",), preference)
    return ext


# ---------------------------------------------------------------- BCQ (LUT-GEMM)


def _bcq_reference(x: torch.Tensor, kplanes: torch.Tensor, alpha_t: torch.Tensor, offset_t: torch.Tensor, in_features: int,
                   bias: torch.Tensor | None) -> torch.Tensor:
    W = dense_from_kernel_layout(kplanes, alpha_t, offset_t, in_features).to(x.dtype)
    return F.linear(x, W, None if bias is None else bias.to(x.dtype))


@torch.library.custom_op("compress::bcq_linear", mutates_args=())
def bcq_linear(x: torch.Tensor, kplanes: torch.Tensor, alpha_t: torch.Tensor, offset_t: torch.Tensor, in_features: int,
               bias: torch.Tensor | None, preference: str) -> torch.Tensor:
    """y = x Wᵀ + bias with W in BCQ (LUT-GEMM layout); reference: decode then matmul."""
    return _bcq_reference(x, kplanes, alpha_t, offset_t, in_features, bias)


@bcq_linear.register_fake
def _bcq_linear_fake(x, kplanes, alpha_t, offset_t, in_features, bias, preference):
    return x.new_empty(*x.shape[:-1], kplanes.shape[2])


@bcq_linear.register_kernel("cuda")
def _bcq_linear_cuda(x, kplanes, alpha_t, offset_t, in_features, bias, preference):
    ext = _extension(preference)
    if ext is None:
        return _bcq_reference(x, kplanes, alpha_t, offset_t, in_features, bias)
    x2 = x.reshape(-1, in_features)
    q, _, n, _ = kplanes.shape
    group = in_features // alpha_t.shape[1]
    why = None
    if x.dtype not in (torch.float16, torch.bfloat16):
        why = f"activations are {x.dtype}, the kernel takes float16/bfloat16"
    elif x2.shape[0] > LUT_MAX_TOKENS:
        why = f"{x2.shape[0]} tokens per call, the LUT kernel serves decode batches up to {LUT_MAX_TOKENS}"
    elif q > 4 or group % 8:
        why = f"{q} bit-planes / group {group}: the kernel takes 1-4 planes and groups that are multiples of 8"
    if why is not None:
        if x2.shape[0] <= LUT_MAX_TOKENS or preference == "cuda":
            _fallback("bcq_linear", why, ("bcq", n, in_features, q, group, x.dtype), preference)
        return _bcq_reference(x, kplanes, alpha_t, offset_t, in_features, bias)
    y = ext.lut_gemm(x2.contiguous(), kplanes, alpha_t, offset_t, in_features, group, torch.cuda.current_stream(x.device).cuda_stream)
    if bias is not None:
        y = y + bias.float()
    return y.to(x.dtype).reshape(*x.shape[:-1], n)


# ---------------------------------------------------------------- 2:4


def _sparse24_reference(x: torch.Tensor, values: torch.Tensor, meta: torch.Tensor, bias: torch.Tensor | None) -> torch.Tensor:
    W = unpack_24(values, meta).to(x.dtype)
    return F.linear(x, W, None if bias is None else bias.to(x.dtype))


@torch.library.custom_op("compress::sparse24_linear", mutates_args=())
def sparse24_linear(x: torch.Tensor, values: torch.Tensor, meta: torch.Tensor, bias: torch.Tensor | None, preference: str) -> torch.Tensor:
    """y = x Wᵀ + bias with W in compressed 2:4 form (values, meta); reference: decompress then matmul."""
    return _sparse24_reference(x, values, meta, bias)


@sparse24_linear.register_fake
def _sparse24_linear_fake(x: torch.Tensor, values: torch.Tensor, meta: torch.Tensor, bias: torch.Tensor | None, preference: str) -> torch.Tensor:
    return x.new_empty(*x.shape[:-1], values.shape[0])


@sparse24_linear.register_kernel("cuda")
def _sparse24_linear_cuda(x, values, meta, bias, preference):
    ext = _extension(preference)
    if ext is None:
        return _sparse24_reference(x, values, meta, bias)
    n, half = values.shape
    k = 2 * half
    x2 = x.reshape(-1, k)
    why = None
    if x.dtype not in (torch.float16, torch.bfloat16) or values.dtype != x.dtype:
        why = f"activations {x.dtype} / values {values.dtype}: the kernel takes float16/bfloat16 for both"
    elif k % 32:
        why = f"input dimension {k} is not a multiple of 32"
    elif x2.shape[0] > SPARSE24_MAX_TOKENS:
        why = f"{x2.shape[0]} tokens per call (kernel serves up to {SPARSE24_MAX_TOKENS})"
    if why is not None:
        if x2.shape[0] <= SPARSE24_MAX_TOKENS or preference == "cuda":
            _fallback("sparse24_linear", why, ("s24", n, k, x.dtype, values.dtype), preference)
        return _sparse24_reference(x, values, meta, bias)
    sms = torch.cuda.get_device_properties(x.device).multi_processor_count
    b = None if bias is None else bias.to(x.dtype).contiguous()
    y = ext.sparse24_gemm(x2.contiguous(), values.contiguous(), meta.contiguous(), b, sms, torch.cuda.current_stream(x.device).cuda_stream)
    return y.reshape(*x.shape[:-1], n)


# ---------------------------------------------------------------- dictionary (CoSpaDi)


@torch.library.custom_op("compress::dict_linear", mutates_args=())
def dict_linear(x: torch.Tensor, atoms: torch.Tensor, values: torch.Tensor, support: torch.Tensor, crow: torch.Tensor, n_atoms: int,
                out_features: int, bias: torch.Tensor | None) -> torch.Tensor:
    """y = C·(A·x) + bias with a dense dictionary A (k × d_in) and sparse coefficients C (values on
    a packed support, :mod:`compress.solvers.dictionary`); reference: the dictionary product, then
    the coefficient matrix decoded for this call."""
    C = decode_coefficients(values, support, crow, n_atoms, out_features).to(x.dtype)
    return F.linear(F.linear(x, atoms.to(x.dtype)), C, None if bias is None else bias.to(x.dtype))


@dict_linear.register_fake
def _dict_linear_fake(x, atoms, values, support, crow, n_atoms, out_features, bias):
    return x.new_empty(*x.shape[:-1], out_features)
