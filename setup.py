"""Packaging for kdfast.

The C++/CUDA sources in csrc/ ship inside the package (as kdfast/_csrc) so that an
installed kdfast can JIT-build its extensions on first use. Set KDFAST_BUILD_EXT=1 (and
install with --no-build-isolation, so that the installed torch is used) to compile the
CPU extension at install time instead, and KDFAST_BUILD_CUDA=1 for the CUDA one.
"""

import os
import shutil
from pathlib import Path

from setuptools import setup
from setuptools.command.build_py import build_py

ROOT = Path(__file__).resolve().parent


class BuildPyWithSources(build_py):
    def run(self):
        super().run()
        target = Path(self.build_lib) / "kdfast" / "_csrc"
        if target.exists():
            shutil.rmtree(target)
        shutil.copytree(ROOT / "csrc", target)


def extensions():
    if os.environ.get("KDFAST_BUILD_EXT") != "1" and os.environ.get("KDFAST_BUILD_CUDA") != "1":
        return {}, []
    import importlib.util

    from torch.utils import cpp_extension

    spec = importlib.util.spec_from_file_location("kdfast_build", ROOT / "kdfast" / "backends" / "build.py")
    build = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(build)
    modules = []
    if os.environ.get("KDFAST_BUILD_EXT") == "1":
        variant, isa_flags = build.cpu_capability_flags()
        for name, source in (("_kd_cpu", "kd_cpu.cpp"), ("_kd_sparse_cpu", "kd_sparse_cpu.cpp")):
            modules.append(cpp_extension.CppExtension(
                f"kdfast.{name}_{variant}", [f"csrc/{source}"],
                extra_compile_args=["-O3", "-fopenmp", *isa_flags], extra_link_args=["-fopenmp"]))
    if os.environ.get("KDFAST_BUILD_CUDA") == "1":
        modules.append(cpp_extension.CUDAExtension(
            "kdfast._kd_cuda", ["csrc/kd_cuda_binding.cpp", "csrc/kd_cuda.cu"],
            extra_compile_args={"cxx": ["-O3"], "nvcc": build.CUDA_NVCC_FLAGS}))
    return {"build_ext": cpp_extension.BuildExtension}, modules


commands, ext_modules = extensions()
setup(cmdclass={"build_py": BuildPyWithSources, **commands}, ext_modules=ext_modules)
