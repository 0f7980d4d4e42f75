"""Correctness of the CUDA kernels on a GPU (skipped without CUDA).

Fresh random inputs for every check, outputs poisoned before each run (NaN-filled memory handed back
to the allocator so the kernel's output lands on it) and checked fully written, relative error
against a float64 reference within fp16/bf16 accumulation bounds, shapes off the tile sizes, every
bit width and group size, both activation dtypes; one run of each kernel under compute-sanitizer.
Run on the device machine with: python -m pytest -q -m gpu tests/test_kernels_gpu.py
"""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch

pytestmark = [pytest.mark.gpu, pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")]

DTYPES = [torch.float16, torch.bfloat16]
# relative error bounds vs float64: bf16 rounds inputs to 8 bits of mantissa, fp16 to 11
TOL = {torch.float16: 2e-3, torch.bfloat16: 1.5e-2}


@pytest.fixture(scope="module")
def ext():
    from compress.kernels.build import load, status

    mod = load()
    assert mod is not None, status().reason
    yield mod


def _poison(shape: tuple[int, ...], dtype: torch.dtype) -> None:
    t = torch.full(shape, float("nan"), dtype=dtype, device="cuda")
    del t  # the caching allocator hands this block to the next allocation of the same size


def _rel(y: torch.Tensor, ref: torch.Tensor) -> float:
    assert torch.isfinite(y).all(), "output has NaN/Inf: not every element was written"
    return float((y.double() - ref).norm() / ref.norm())


@pytest.mark.parametrize("q", [1, 2, 3, 4])
@pytest.mark.parametrize("n,k,g", [(4096, 4096, 128), (1000, 1160, 40), (333, 576, 64), (256, 256, 32), (64, 768, 256)])
@pytest.mark.parametrize("dtype", DTYPES)
def test_lut_gemm_matches_float64(ext, q: int, n: int, k: int, g: int, dtype: torch.dtype) -> None:
    from compress.kernels.layout import bcq_kernel_layout, dense_from_kernel_layout
    from compress.kernels.ops import bcq_linear
    from compress.solvers.packing import pack_signs

    for batch in (1, 2, 3, 8):
        signs = torch.rand(q, n, k, device="cuda") > 0.5
        alpha = (torch.rand(q, n, k // g, device="cuda") * 0.02 + 0.001).half()
        offset = torch.randn(n, k // g, device="cuda") * 0.01
        kp, at, ot = bcq_kernel_layout(pack_signs(signs), alpha, offset)
        W = dense_from_kernel_layout(kp, at, ot, k).double()
        x = torch.randn(batch, k, device="cuda").to(dtype)
        ref = x.double() @ W.T
        _poison((batch, n), dtype)
        y = bcq_linear(x, kp, at, ot, k, None, "cuda")
        torch.cuda.synchronize()
        assert y.dtype == dtype and y.shape == (batch, n)
        assert _rel(y, ref) < TOL[dtype], (batch, q, n, k, g)


@pytest.mark.parametrize("n,k", [(4096, 4096), (11008, 4096), (1000, 1056), (37, 96)])
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("bias", [False, True])
def test_sparse24_matches_float64(ext, n: int, k: int, dtype: torch.dtype, bias: bool) -> None:
    from compress.kernels.ops import sparse24_linear
    from compress.solvers.sparse import nm_mask
    from compress.solvers.sparse24 import pack_24

    for batch in (1, 2, 5, 8, 16):
        W = torch.randn(n, k, device="cuda") * 0.02
        W = (W * nm_mask(W.abs(), 2, 4)).to(dtype)
        values, meta = pack_24(W)
        b = torch.randn(n, device="cuda").to(dtype) if bias else None
        x = torch.randn(batch, k, device="cuda").to(dtype)
        ref = x.double() @ W.double().T + (b.double() if b is not None else 0)
        _poison((batch, n), dtype)
        y = sparse24_linear(x, values, meta, b, "cuda")
        torch.cuda.synchronize()
        assert _rel(y, ref) < TOL[dtype], (batch, n, k)


def test_modules_use_the_kernels_and_fall_back_outside_them(ext) -> None:
    """BCQLinear and QuantLinear (per-OC, via the exact BCQ conversion) on CUDA: decode batches
    through the LUT kernel, prefill batches through the reference path, same function either way."""
    from compress.modules import QuantLinear
    from compress.modules.bcq import BCQLinear
    from compress.solvers.bcq import bcq_quantize
    from compress.solvers.quant import QuantSpec, quantize_rtn

    W = torch.randn(512, 1024)
    mods = [BCQLinear.from_bcq(bcq_quantize(W, 3, 128), None, like=W.half()),
            QuantLinear.from_quantized(quantize_rtn(W, QuantSpec(bits=4, group_size=128)), None, like=W.half())]
    for mod in mods:
        mod = mod.cuda()
        Wd = mod.dense_weight().double().cuda()
        for tokens in (1, 4, 64):
            x = torch.randn(tokens, 1024, device="cuda", dtype=torch.float16)
            y = mod(x)  # the module's preference: auto
            assert _rel(y, x.double() @ Wd.T) < 2e-3


@pytest.mark.skipif(shutil.which("compute-sanitizer") is None and not Path("/usr/local/cuda/bin/compute-sanitizer").exists(),
                    reason="compute-sanitizer not installed")
def test_compute_sanitizer_memcheck_is_clean(ext, tmp_path: Path) -> None:
    script = tmp_path / "run.py"
    script.write_text(
        "import torch\n"
        "from compress.kernels import ops\n"
        "from compress.kernels.layout import bcq_kernel_layout\n"
        "from compress.solvers.packing import pack_signs\n"
        "from compress.solvers.sparse import nm_mask\n"
        "from compress.solvers.sparse24 import pack_24\n"
        "n, k, g = 333, 1160, 40\n"
        "kp, at, ot = bcq_kernel_layout(pack_signs(torch.rand(3, n, k, device='cuda') > 0.5), torch.rand(3, n, k // g, device='cuda').half(),"
        " torch.randn(n, k // g, device='cuda'))\n"
        "ops.bcq_linear(torch.randn(3, k, device='cuda').half(), kp, at, ot, k, None, 'cuda')\n"
        "W = torch.randn(100, 1056, device='cuda')\n"
        "v, m = pack_24((W * nm_mask(W.abs(), 2, 4)).half())\n"
        "ops.sparse24_linear(torch.randn(5, 1056, device='cuda').half(), v, m, None, 'cuda')\n"
        "torch.cuda.synchronize()\n"
    )
    san = shutil.which("compute-sanitizer") or "/usr/local/cuda/bin/compute-sanitizer"
    r = subprocess.run([san, "--tool", "memcheck", "--error-exitcode", "3", sys.executable, str(script)], capture_output=True, text=True,
                       env=dict(os.environ), timeout=600)
    assert r.returncode == 0, (r.stdout + r.stderr)[-4000:]
    assert "ERROR SUMMARY: 0 errors" in r.stdout + r.stderr
