"""The forward context of calibration and the memory clean-up between layers."""

from __future__ import annotations

import contextlib
import ctypes
import functools
import gc
import logging
from typing import Any, Iterator

import torch
from torch import nn

logger = logging.getLogger(__name__)


@contextlib.contextmanager
def calibration_forward_context(model: nn.Module) -> Iterator[None]:
    """no_grad, eval mode and no KV cache for the duration of calibration."""
    was_training = model.training
    config = getattr(model, "config", None)
    use_cache = getattr(config, "use_cache", None)
    model.eval()
    if config is not None and use_cache is not None:
        config.use_cache = False
    try:
        with torch.no_grad():
            yield
    finally:
        model.train(was_training)
        if config is not None and use_cache is not None:
            config.use_cache = use_cache


@functools.lru_cache(maxsize=1)
def _libc() -> Any:
    try:
        return ctypes.CDLL("libc.so.6")
    except OSError:  # not glibc (macOS, musl): nothing to trim
        return None


def _malloc_trim() -> None:
    libc = _libc()
    if libc is not None and hasattr(libc, "malloc_trim"):
        libc.malloc_trim(0)


def cleanup_memory() -> None:
    """Collect garbage, hand freed heap pages back to the OS (glibc keeps them otherwise, and a
    streamed run's resident memory would grow with the largest layers seen); on CUDA release
    cached blocks and log the reserved memory before/after."""
    gc.collect()
    _malloc_trim()
    if torch.cuda.is_available():
        before = torch.cuda.memory_reserved()
        torch.cuda.empty_cache()
        logger.debug("cuda reserved memory %d -> %d bytes", before, torch.cuda.memory_reserved())
