"""The one table of dtype names: what users type (``--dtype bf16``), what module specs record
(``"bfloat16"``) and what safetensors headers say (``"BF16"``)."""

from __future__ import annotations

import torch

from .errors import CompressError

#: names a user may give for a compute dtype
USER_DTYPES: dict[str, torch.dtype] = {
    "float32": torch.float32, "fp32": torch.float32,
    "float16": torch.float16, "fp16": torch.float16,
    "bfloat16": torch.bfloat16, "bf16": torch.bfloat16,
}
#: dtype names of the safetensors format
SAFETENSORS_DTYPES: dict[str, torch.dtype] = {
    "F64": torch.float64, "F32": torch.float32, "F16": torch.float16, "BF16": torch.bfloat16,
    "I64": torch.int64, "I32": torch.int32, "I16": torch.int16, "I8": torch.int8, "U8": torch.uint8, "BOOL": torch.bool,
    "F8_E4M3": torch.float8_e4m3fn, "F8_E5M2": torch.float8_e5m2,
}


def dtype_name(dtype: torch.dtype) -> str:
    """``torch.bfloat16`` → ``"bfloat16"`` (as module specs and manifests record it)."""
    return str(dtype).replace("torch.", "")


def spec_dtype(name: object, default: torch.dtype) -> torch.dtype:
    """The dtype a module spec records (``"float16"``), or ``default`` when it records none."""
    return USER_DTYPES.get(str(name), default) if name else default


def parse_dtype(dtype: str | torch.dtype | None) -> torch.dtype | str:
    """A user's ``--dtype``: a torch dtype, or ``"auto"``."""
    if dtype is None or dtype == "auto":
        return "auto"
    if isinstance(dtype, torch.dtype):
        return dtype
    if dtype not in USER_DTYPES:
        raise CompressError(f"unknown dtype '{dtype}'; use one of auto, {', '.join(sorted(set(USER_DTYPES)))}")
    return USER_DTYPES[dtype]


def element_bits(dtype: torch.dtype) -> int:
    """Bits of one element of ``dtype``."""
    return 8 * torch.empty((), dtype=dtype).element_size()
