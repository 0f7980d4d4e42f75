"""Kernel layouts and data paths on the CPU: exact conversions, the PyTorch emulations of the CUDA
kernels against the reference ops, the ops' contracts, and the CUDA sources compiling (slow)."""

from __future__ import annotations

import shutil
import subprocess
import sysconfig
from pathlib import Path

import pytest
import torch

from compress.errors import ConfigError
from compress.kernels import ops
from compress.kernels.build import SOURCES, csrc_dir, status
from compress.kernels.emulate import lut_gemm_emulate, sparse24_emulate
from compress.kernels.layout import bcq_kernel_layout, bcq_storage_layout, dense_from_kernel_layout
from compress.modules import QuantLinear
from compress.modules.bcq import BCQLinear
from compress.solvers.bcq import bcq_quantize
from compress.solvers.packing import pack_signs
from compress.solvers.quant import QuantSpec, quantize_rtn
from compress.solvers.sparse import nm_mask
from compress.solvers.sparse24 import pack_24, unpack_24


def _random_bcq(n: int, k: int, q: int, g: int, gen: torch.Generator) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    signs = torch.rand(q, n, k, generator=gen) > 0.5
    alpha = (torch.rand(q, n, k // g, generator=gen) + 0.1).half()
    offset = torch.randn(n, k // g, generator=gen)
    return pack_signs(signs), alpha, offset


SHAPES = [(40, 576, 64), (33, 1024, 128), (17, 136, 8), (24, 512, 256), (9, 200, 40)]


@pytest.mark.parametrize("n,k,g", SHAPES)
@pytest.mark.parametrize("q", [1, 2, 3, 4])
def test_lut_layout_is_exact_and_the_emulated_data_path_matches(n: int, k: int, g: int, q: int) -> None:
    gen = torch.Generator().manual_seed(n * k + q)
    planes, alpha, offset = _random_bcq(n, k, q, g, gen)
    kp, at, ot = bcq_kernel_layout(planes, alpha, offset)
    assert kp.shape == (q, -(-k // 128), n, 16) and kp.dtype == torch.uint8
    back = bcq_storage_layout(kp, at, ot, k)
    assert all(torch.equal(a, b) for a, b in zip(back, (planes, alpha, offset)))
    mod = BCQLinear(k, n, q, g)
    with torch.no_grad():
        mod.planes.copy_(planes)
        mod.alpha.copy_(alpha)
        mod.offset.copy_(offset)
    W = mod.dense_weight()
    assert torch.equal(dense_from_kernel_layout(kp, at, ot, k), W)
    for batch in (1, 3, 8):
        x = torch.randn(batch, k, generator=gen)
        ref = x.double() @ W.double().T
        emu = lut_gemm_emulate(x, kp, at, ot, k)
        assert float((emu.double() - ref).norm() / ref.norm()) < 1e-5
        assert torch.allclose(mod(x), x @ W.T, rtol=1e-5, atol=1e-4)


def test_uniform_codes_run_through_the_lut_layout_exactly() -> None:
    W = torch.randn(48, 256)
    for bits in (2, 3, 4):
        qz = quantize_rtn(W, QuantSpec(bits=bits, group_size=64))
        mod = QuantLinear.from_quantized(qz, None, like=W)
        assert mod.lut_compatible()
        kp, at, ot = mod._bcq_kernel_layout()
        assert torch.equal(dense_from_kernel_layout(kp, at, ot, 256), mod.dense_weight())
    assert not QuantLinear.from_quantized(quantize_rtn(W, QuantSpec(bits=3, group_size=16, dim="ic")), None, like=W).lut_compatible()


def test_bcq_module_follows_in_place_changes_of_its_buffers() -> None:
    W = torch.randn(16, 64)
    mod = BCQLinear.from_bcq(bcq_quantize(W, 3, 32), None, like=W)
    x = torch.randn(2, 64)
    y0 = mod(x)
    with torch.no_grad():
        mod.offset.add_(1.0)
    assert not torch.allclose(mod(x), y0)
    assert torch.allclose(mod(x), x @ mod.dense_weight().T, rtol=1e-5, atol=1e-4)


@pytest.mark.parametrize("n,k", [(24, 32), (40, 1056), (7, 4160)])
def test_sparse24_emulated_data_path_matches_the_reference(n: int, k: int) -> None:
    gen = torch.Generator().manual_seed(k)
    W = torch.randn(n, k, generator=gen)
    W = W * nm_mask(W.abs(), 2, 4)
    values, meta = pack_24(W)
    for batch in (1, 5, 16):
        x = torch.randn(batch, k, generator=gen)
        ref = x.double() @ W.double().T
        assert float((sparse24_emulate(x, values, meta).double() - ref).norm() / ref.norm()) < 1e-5
        assert torch.allclose(ops.sparse24_linear(x, values, meta, None, "auto"), x @ W.T, rtol=1e-5, atol=1e-4)
    with pytest.raises(ValueError, match="K % 32"):
        sparse24_emulate(torch.randn(1, 40), *pack_24(torch.zeros(3, 40)))


def test_ops_pass_opcheck_and_trace_with_fake_tensors() -> None:
    gen = torch.Generator().manual_seed(0)
    planes, alpha, offset = _random_bcq(12, 128, 3, 32, gen)
    kp, at, ot = bcq_kernel_layout(planes, alpha, offset)
    x = torch.randn(2, 128)
    torch.library.opcheck(ops.bcq_linear, (x, kp, at, ot, 128, None, "auto"))
    torch.library.opcheck(ops.bcq_linear, (x, kp, at, ot, 128, torch.randn(12), "torch"))
    W = torch.randn(12, 64)
    values, meta = pack_24(W * nm_mask(W.abs(), 2, 4))
    torch.library.opcheck(ops.sparse24_linear, (torch.randn(3, 64), values, meta, None, "auto"))
    from torch._subclasses.fake_tensor import FakeTensorMode

    with FakeTensorMode() as mode:
        y = ops.bcq_linear(mode.from_tensor(torch.randn(5, 7, 128)), mode.from_tensor(kp), mode.from_tensor(at), mode.from_tensor(ot), 128, None, "auto")
    assert tuple(y.shape) == (5, 7, 12)


def test_kernel_preference_and_status_without_cuda(monkeypatch: pytest.MonkeyPatch) -> None:
    """The preference is each module's own (set on a model with use_kernels), else the environment's;
    no module global holds it."""
    from compress.modules.base import use_kernels
    from compress.modules.quant import QuantLinear

    with pytest.raises(ConfigError, match="auto, torch, cuda"):
        ops.check_preference("fast")
    model = torch.nn.Sequential(QuantLinear(16, 8, 4, 8), QuantLinear(16, 8, 4, 8))
    assert [m.kernels() for m in model] == ["auto", "auto"]
    use_kernels(model, "torch")
    assert [m.kernels() for m in model] == ["torch", "torch"]
    with pytest.raises(ConfigError, match="auto, torch, cuda"):
        use_kernels(model, "fast")
    use_kernels(model, None)
    monkeypatch.setenv("COMPRESS_KERNELS", "cuda")
    assert [m.kernels() for m in model] == ["cuda", "cuda"]
    monkeypatch.setenv("COMPRESS_KERNELS", "fast")
    with pytest.raises(ConfigError, match="COMPRESS_KERNELS"):
        model[0].kernels()
    if not torch.cuda.is_available():
        s = status()
        assert not s.available and "no CUDA" in s.reason


def _torch_includes() -> list[str]:
    from torch.utils.cpp_extension import include_paths

    return [f"-I{p}" for p in include_paths() + [sysconfig.get_paths()["include"]]]


@pytest.mark.slow
@pytest.mark.parametrize("source", [s for s in SOURCES if s.endswith(".cu")])
@pytest.mark.parametrize("arch", ["sm_80", "sm_90"])
def test_cuda_sources_compile(source: str, arch: str, tmp_path: Path) -> None:
    """Every kernel compiles for A100 and H100 with this machine's nvcc (no GPU needed), without
    register spills in the LUT kernel."""
    from compress.kernels.build import find_nvcc

    nvcc = find_nvcc()
    if nvcc is None:
        pytest.skip("nvcc not installed")
    r = subprocess.run([nvcc, "-c", "-O3", f"-arch={arch}", "-Xptxas", "-v", str(csrc_dir() / source), "-o", str(tmp_path / "k.o")],
                       capture_output=True, text=True)
    assert r.returncode == 0, r.stderr[-3000:]
    if source == "lut_gemm.cu":
        assert "0 bytes spill stores" in r.stderr and " bytes spill stores" in r.stderr
        assert all(line.strip().startswith("0 bytes") for line in r.stderr.splitlines() if "spill stores" in line), r.stderr


@pytest.mark.slow
def test_bindings_compile(tmp_path: Path) -> None:
    """The torch binding parses against this torch's headers and the CUDA runtime header."""
    from compress.kernels.build import find_nvcc

    nvcc, gxx = find_nvcc(), shutil.which("g++")
    if nvcc is None or gxx is None:
        pytest.skip("nvcc or g++ not installed")
    cuda_inc = Path(nvcc).parents[1] / "include"
    r = subprocess.run([gxx, "-std=c++20", "-fsyntax-only", "-DTORCH_EXTENSION_NAME=compress_kernels", *_torch_includes(), f"-I{cuda_inc}",
                        str(csrc_dir() / "bindings.cpp")], capture_output=True, text=True)
    assert r.returncode == 0, r.stderr[-3000:]


def test_sparse24_pack_names_the_violation() -> None:
    W = torch.ones(2, 8)
    with pytest.raises(ValueError, match="violates the 2:4 pattern"):
        pack_24(W)
    assert torch.equal(unpack_24(*pack_24(torch.zeros(2, 8))), torch.zeros(2, 8))
