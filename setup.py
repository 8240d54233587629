"""Build of pio-kernels and its extension ``pio_kernels._C``.

The C++ CPU kernels are always built. CUDA kernels are added when torch was built
with CUDA and nvcc is found, or when ``PIO_FORCE_CUDA=1``. ``PIO_NO_EXTENSION=1``
skips the extension entirely. A failed compile is reported but does not fail the
install: the package then runs on its Triton and PyTorch paths.
"""
import glob
import os
import sys

from setuptools import setup

ROOT = os.path.dirname(os.path.abspath(__file__))
PACKAGES = ["pio_kernels", "pio_kernels.triton", "pio_kernels.integrations", "pio_kernels.integrations.engine",
            "pio_kernels.integrations.models", "pio_kernels.eval", "pio_kernels.eval.tasks"]
PACKAGE_DIR = {"pio_kernels": "pio_kernels", "pio_kernels.integrations": "integrations"}


def _flag(name: str) -> bool:
    return os.environ.get(name, "0").lower() in ("1", "true", "yes", "on")


def _extensions():
    if _flag("PIO_NO_EXTENSION"):
        return [], {}
    try:
        import torch
        from torch.utils.cpp_extension import CUDA_HOME, BuildExtension, CppExtension, CUDAExtension
    except ImportError:  # torch missing at build time: pure-Python install
        print("pio-kernels: torch not importable at build time, skipping pio_kernels._C", file=sys.stderr)
        return [], {}

    sources = ["csrc/pio.cpp"] + sorted(glob.glob("csrc/cpu/*.cpp"))
    cxx = ["-O3", "-fopenmp"]
    with_cuda = _flag("PIO_FORCE_CUDA") or (torch.version.cuda is not None and CUDA_HOME is not None)
    cuda_sources = sorted(glob.glob("csrc/cuda/*.cu"))
    if with_cuda and cuda_sources:
        ext = CUDAExtension(
            "pio_kernels._C",
            sources + cuda_sources,
            extra_compile_args={"cxx": cxx, "nvcc": ["-O3", "--expt-relaxed-constexpr"]},
            extra_link_args=["-fopenmp"],
        )
    else:
        ext = CppExtension("pio_kernels._C", sources, extra_compile_args=cxx, extra_link_args=["-fopenmp"])

    class OptionalBuildExtension(BuildExtension):
        """Builds with ninja; a compile failure leaves the package on its fallback paths."""

        def run(self):
            try:
                super().run()
            except Exception as exc:  # noqa: BLE001 - any compiler failure is non-fatal
                if _flag("PIO_REQUIRE_EXTENSION"):
                    raise
                print(f"pio-kernels: building pio_kernels._C failed ({exc}); "
                      "continuing without it (Triton/PyTorch paths only)", file=sys.stderr)
                self.extensions = []

    return [ext], {"build_ext": OptionalBuildExtension.with_options(use_ninja=True)}


ext_modules, cmdclass = _extensions()
setup(
    packages=PACKAGES,
    package_dir=PACKAGE_DIR,
    ext_modules=ext_modules,
    cmdclass=cmdclass,
)
