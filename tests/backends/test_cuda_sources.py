"""The CUDA kernels compile, on machines without a GPU too: every csrc/*.cu builds with nvcc
for sm_80 and sm_90, so a syntax or template error fails CI, and kd_cuda.h is a C interface
that C and C++ callers can include. (The torch binding needs a CUDA build of torch and is
built, and the kernels run, only on a GPU machine: the core suite covers them there.)"""

import shutil
import subprocess
from pathlib import Path

import pytest
from torch.utils.cpp_extension import COMMON_NVCC_FLAGS

from kdfast.backends.build import CUDA_COMMON_FLAGS

CSRC = Path(__file__).resolve().parents[2] / "csrc"
NVCC = shutil.which("nvcc")
pytestmark = pytest.mark.skipif(NVCC is None, reason="nvcc is not on PATH: install the CUDA toolkit to compile "
                                                     "the CUDA sources")


def nvcc(*args: str) -> None:
    result = subprocess.run([NVCC, *args], capture_output=True, text=True, timeout=600)
    assert result.returncode == 0, f"nvcc {' '.join(args)} failed:\n{result.stderr}{result.stdout}"


@pytest.mark.parametrize("source", sorted(CSRC.glob("*.cu")), ids=lambda p: p.name)
def test_cuda_source_compiles(source, tmp_path):
    # The flags of a real build (torch's extension builder adds COMMON_NVCC_FLAGS), both
    # architectures in one call, compiled side by side.
    nvcc(*COMMON_NVCC_FLAGS, *CUDA_COMMON_FLAGS, "--threads", "2", "-gencode=arch=compute_80,code=sm_80",
         "-gencode=arch=compute_90,code=sm_90", "-c", str(source), "-o", str(tmp_path / "kernels.o"))


@pytest.mark.parametrize("language,flags", [("c", "-std=c11,-Wall,-Wextra,-pedantic,-Werror"),
                                            ("c++", "-Wall,-Wextra,-Werror")])
def test_launch_interface_header(language, flags, tmp_path):
    caller = tmp_path / "caller.c"
    caller.write_text('#include "kd_cuda.h"\n'
                      "int (*const forward)(const KdCudaArgs*, cudaStream_t) = kdfast_kd_forward_cuda;\n"
                      "int (*const scale)(const KdCudaScaleArgs*, cudaStream_t) = kdfast_scale_grad_cuda;\n")
    nvcc("-x", language, "-Xcompiler", flags, f"-I{CSRC}", "-c", str(caller), "-o", str(tmp_path / "caller.o"))
