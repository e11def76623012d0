"""Builds streamkern and its C++/CUDA extension ``streamkern._C``.

* ``csrc/cpu/*.cpp`` (CPU kernels; they define the op schemas of ``csrc/include/streamkern/ops/``) are always
  built, with OpenMP.
* ``csrc/cuda/*.cu`` (torch-free kernels and launchers) and ``csrc/cuda/*_binding.cpp`` (their torch glue) are
  built when torch is a CUDA build and nvcc is found, for sm_89 and sm_90 unless ``TORCH_CUDA_ARCH_LIST`` says
  otherwise. ``STREAMKERN_NO_CUDA=1`` forces a CPU-only extension.
* ``kernels/`` (Triton) is installed as ``streamkern.kernels``; ``bench/`` as ``streamkern.bench``.
* ``STREAMKERN_NO_EXT=1`` installs the Python package without compiling ``streamkern._C`` (the Makefile does
  this, then builds the extension once, in place and incrementally, with ``setup.py build_ext --inplace``).
"""
import glob
import os

from setuptools import setup

import torch
from torch.utils.cpp_extension import CUDA_HOME, BuildExtension, CppExtension, CUDAExtension

ROOT = os.path.dirname(os.path.abspath(__file__))


def _sources(pattern):
    return sorted(os.path.relpath(p, ROOT) for p in glob.glob(os.path.join(ROOT, pattern)))


def extension():
    with_cuda = (torch.version.cuda is not None and CUDA_HOME is not None
                 and os.environ.get("STREAMKERN_NO_CUDA", "0") != "1")
    cxx = ["-O3", "-std=c++20", "-fopenmp", "-march=x86-64-v2"]
    sources = ["csrc/module.cpp"] + _sources("csrc/cpu/*.cpp")
    include_dirs = [os.path.join(ROOT, "csrc", "include")]
    if not with_cuda:
        return CppExtension("streamkern._C", sources, include_dirs=include_dirs,
                            extra_compile_args={"cxx": cxx}, extra_link_args=["-fopenmp"])
    os.environ.setdefault("TORCH_CUDA_ARCH_LIST", "8.9;9.0")
    sources += _sources("csrc/cuda/*.cu") + _sources("csrc/cuda/*_binding.cpp")
    nvcc = ["-O3", "-std=c++17", "--use_fast_math", "-lineinfo", "--expt-relaxed-constexpr"]
    return CUDAExtension("streamkern._C", sources, include_dirs=include_dirs,
                         define_macros=[("STREAMKERN_WITH_CUDA", "1")],
                         extra_compile_args={"cxx": cxx, "nvcc": nvcc}, extra_link_args=["-fopenmp"])


setup(
    packages=["streamkern", "streamkern.ops", "streamkern.ops.reference", "streamkern.pipelines", "streamkern.integrations",
              "streamkern.kernels", "streamkern.bench"],
    package_dir={"streamkern": "streamkern", "streamkern.kernels": "kernels", "streamkern.bench": "bench"},
    ext_modules=[] if os.environ.get("STREAMKERN_NO_EXT", "0") == "1" else [extension()],
    cmdclass={"build_ext": BuildExtension.with_options(use_ninja=True)},
)
