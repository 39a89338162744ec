"""Build the Cython kernels.

Environment switches (read at build time):
  FASTEMBED_OPENMP=0       build without OpenMP (every kernel runs on one thread)
  FASTEMBED_BOUNDSCHECK=1  turn Cython's bounds and wraparound checks back on, for debugging
  FASTEMBED_SANITIZE=1     compile and link with AddressSanitizer and UndefinedBehaviorSanitizer
"""
import os
import sys

import numpy as np
from Cython.Build import cythonize
from setuptools import Extension, setup


def _flag(name, default):
    return os.environ.get(name, default).strip().lower() not in ("0", "", "false", "no", "off")


debug_checks = _flag("FASTEMBED_BOUNDSCHECK", "0")
use_openmp = _flag("FASTEMBED_OPENMP", "0" if sys.platform == "darwin" else "1")
sanitize = _flag("FASTEMBED_SANITIZE", "0")

compile_args, link_args = [], []
if sys.platform == "win32":
    compile_args += ["/O2"] + (["/openmp"] if use_openmp else [])
else:
    # No FMA contraction: a fused multiply-add would make the Adam kernel differ from numpy on aarch64;
    # no errno from sqrtf, so that the Adam loop vectorises.
    compile_args += ["-O3", "-ffp-contract=off", "-fno-math-errno"]
    if use_openmp:
        compile_args.append("-fopenmp")
        link_args.append("-fopenmp")
    if sanitize:
        san = ["-fsanitize=address,undefined", "-fno-omit-frame-pointer", "-fno-sanitize-recover=undefined"]
        compile_args += san + ["-O1", "-g"]
        link_args += san

extension = Extension(
    "fastembed._kernels",
    ["fastembed/_kernels.pyx"],
    include_dirs=[np.get_include()],
    define_macros=[("NPY_NO_DEPRECATED_API", "NPY_1_7_API_VERSION")],
    extra_compile_args=compile_args,
    extra_link_args=link_args,
)

setup(
    ext_modules=cythonize(
        [extension],
        language_level=3,
        compiler_directives={
            "boundscheck": debug_checks,
            "wraparound": debug_checks,
            "initializedcheck": debug_checks,
            "cdivision": True,
            "embedsignature": True,
        },
    )
)
