"""Optional ahead-of-time build of the CUDA kernels.

    COMPRESS_BUILD_KERNELS=1 pip install --no-build-isolation .

compiles csrc/ into ``compress._kernels`` (torch must already be installed, hence no build
isolation). Without the variable nothing is compiled here and the kernels build lazily on first use
(compress.kernels.build); all metadata lives in pyproject.toml.
"""

import os

from setuptools import setup

ext_modules = []
cmdclass = {}
if os.environ.get("COMPRESS_BUILD_KERNELS") == "1":
    from torch.utils.cpp_extension import BuildExtension, CUDAExtension

    ext_modules = [
        CUDAExtension(
            "compress._kernels",
            sources=["csrc/lut_gemm.cu", "csrc/sparse24.cu", "csrc/bindings.cpp"],
            extra_compile_args={"cxx": ["-O3"], "nvcc": ["-O3", "-lineinfo"]},
        )
    ]
    cmdclass = {"build_ext": BuildExtension}

setup(ext_modules=ext_modules, cmdclass=cmdclass)
