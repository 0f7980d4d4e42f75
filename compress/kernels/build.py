"""Lazy build of the CUDA kernels in ``csrc/``.

The extension compiles on first use with ``torch.utils.cpp_extension.load`` into a cache directory
keyed by the torch version, the CUDA version and a hash of the sources
(``$COMPRESS_KERNEL_CACHE``, default ``~/.cache/compress/kernels``). ``COMPRESS_BUILD_KERNELS=1``
at ``pip install`` time builds it ahead of time (``setup.py``). Nothing here ever raises for a
missing toolkit: without CUDA, without nvcc or when the build fails, :func:`load` returns None, one
log line says why (with the path of the saved build log), and every op keeps its PyTorch
implementation.
"""

from __future__ import annotations

import contextlib
import hashlib
import io
import logging
import os
import shutil
import sys
import threading
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

logger = logging.getLogger(__name__)

SOURCES = ("lut_gemm.cu", "sparse24.cu", "bindings.cpp")
ARCHS = ("8.0", "9.0")  # A100 and H100/H200; add more with TORCH_CUDA_ARCH_LIST


def csrc_dir() -> Path:
    """The CUDA sources: compress.csrc when installed, the repository's csrc/ in a checkout."""
    try:
        import compress.csrc as pkg  # type: ignore[import-not-found]

        return Path(pkg.__path__[0])
    except ImportError:
        return Path(__file__).resolve().parents[2] / "csrc"


def source_hash() -> str:
    h = hashlib.sha256()
    for name in SOURCES:
        h.update(name.encode())
        h.update((csrc_dir() / name).read_bytes())
    return h.hexdigest()[:16]


def cache_dir() -> Path:
    root = Path(os.environ.get("COMPRESS_KERNEL_CACHE", Path.home() / ".cache" / "compress" / "kernels"))
    cuda = (torch.version.cuda or "nocuda").replace(".", "")
    return root / f"torch{torch.__version__.split('+')[0]}-cu{cuda}-{source_hash()}"


def find_nvcc() -> str | None:
    home = os.environ.get("CUDA_HOME") or os.environ.get("CUDA_PATH")
    # the toolkit's own nvcc before one on PATH (which may be a wrapper script outside the toolkit)
    for cand in ([str(Path(home) / "bin" / "nvcc")] if home else []) + ["/usr/local/cuda/bin/nvcc", shutil.which("nvcc") or ""]:
        if cand and Path(cand).is_file():
            return cand
    return None


@dataclass
class BuildStatus:
    available: bool
    reason: str
    log: Path | None = None


_lock = threading.Lock()
_module: Any = None
_status: BuildStatus | None = None


def load(verbose: bool = False) -> Any:
    """The compiled extension, or None (see :func:`status` for why)."""
    global _status
    with _lock:
        if _status is not None:
            return _module
        _status = _try_build(verbose)
        if not _status.available:
            logger.warning("compress CUDA kernels unavailable (%s); using the PyTorch implementations", _status.reason)
        return _module


def status() -> BuildStatus:
    """Why the kernels are (not) available, without building anything."""
    if _status is not None:
        return _status
    if not torch.cuda.is_available():
        return BuildStatus(False, "no CUDA device visible to torch")
    if find_nvcc() is None:
        return BuildStatus(False, "nvcc not found (set CUDA_HOME, or pip install nvidia-cuda-nvcc)")
    if (cache_dir() / "build.ok").is_file():
        return BuildStatus(True, f"built, cached in {cache_dir()}")
    return BuildStatus(True, "not built yet: compiles on first use (about a minute)")


def _try_build(verbose: bool) -> BuildStatus:
    global _module
    if not torch.cuda.is_available():
        return BuildStatus(False, "no CUDA device visible to torch")
    try:  # built ahead of time by COMPRESS_BUILD_KERNELS=1 pip install
        import compress._kernels as aot  # type: ignore[import-not-found]

        _module = aot
        return BuildStatus(True, "built ahead of time (compress._kernels)")
    except ImportError:
        pass
    nvcc = find_nvcc()
    if nvcc is None:
        return BuildStatus(False, "nvcc not found (set CUDA_HOME, or pip install nvidia-cuda-nvcc)")
    os.environ.setdefault("CUDA_HOME", str(Path(nvcc).parents[1]))
    os.environ.setdefault("TORCH_CUDA_ARCH_LIST", ";".join(ARCHS))
    out = cache_dir()
    out.mkdir(parents=True, exist_ok=True)
    log = out / "build.log"
    try:
        from torch.utils.cpp_extension import load as load_ext

        buf = io.StringIO()
        with contextlib.redirect_stdout(buf), contextlib.redirect_stderr(buf):
            _module = load_ext(
                name="compress_kernels", sources=[str(csrc_dir() / s) for s in SOURCES], build_directory=str(out),
                extra_cflags=["-O3"], extra_cuda_cflags=["-O3", "-lineinfo"], verbose=True,
            )
        log.write_text(buf.getvalue())
        if verbose:
            sys.stderr.write(buf.getvalue())
        (out / "build.ok").write_text(torch.__version__ + "\n")
        return BuildStatus(True, f"built in {out}", log)
    except Exception as e:  # any build failure: keep the reference path, keep the log
        with open(log, "a") as f:
            f.write(f"\n{type(e).__name__}: {e}\n")
        if verbose:
            sys.stderr.write(log.read_text())
        _module = None
        return BuildStatus(False, f"build failed: {type(e).__name__}; log saved to {log}", log)
