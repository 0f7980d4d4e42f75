"""``compress env``: torch, CUDA and which compiled kernels are available (and why not)."""

from __future__ import annotations

import typer

from .app import out_console


def env(build: bool = typer.Option(False, "--build", help="compile the CUDA kernels now (needs CUDA and nvcc)")) -> None:
    """Report torch, CUDA and which compiled kernels are available (and why not)."""
    import platform

    import torch

    from ..kernels import build as kb
    from ..kernels.ops import default_preference

    rows = [
        ("python", platform.python_version()),
        ("torch", f"{torch.__version__} (CUDA {torch.version.cuda or 'none'})"),
        ("device", torch.cuda.get_device_name(0) if torch.cuda.is_available() else "no CUDA device (CPU only)"),
        ("nvcc", kb.find_nvcc() or "not found"),
        ("kernel preference", f"{default_preference()} (COMPRESS_KERNELS=auto|torch|cuda)"),
        ("kernel sources", str(kb.csrc_dir())),
        ("kernel cache", str(kb.cache_dir())),
    ]
    if build:
        kb.load(verbose=True)
    st = kb.status()
    state = "available" if st.available else "unavailable"
    for op in ("bcq_linear (LUT-GEMM)", "sparse24_linear (2:4)"):
        rows.append((op, f"CUDA kernel {state}: {st.reason}; PyTorch implementation always available"))
    if st.log is not None:
        rows.append(("build log", str(st.log)))
    for k, v in rows:
        out_console.print(f"[bold]{k:>22}[/bold]  {v}", highlight=False, soft_wrap=True)
