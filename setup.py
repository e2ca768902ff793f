"""Packaging. `kernels/` ships as `mmfast.kernels`, `csrc/` as `mmfast.csrc` (sources for the JIT build).

The C++/CUDA extension is normally compiled just in time on first use (mmfast/_build.py), so a
plain `pip install .` never needs a compiler or a second torch in an isolated build environment.
`MMFAST_BUILD_EXT=1 pip install --no-build-isolation .` compiles it ahead of time as `mmfast._C`.
"""

import os

from setuptools import find_packages, setup

ext_modules, cmdclass = [], {}
if os.environ.get("MMFAST_BUILD_EXT") == "1":
    import sys

    sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), "mmfast"))
    import _build  # mmfast/_build.py, imported alone: the package itself is not installed yet

    ext_modules, cmdclass = [_build.setuptools_extension()], {"build_ext": _build.build_ext_command()}

setup(
    # Every package under mmfast/, plus the two top-level source folders mapped into it. kernels/ and csrc/
    # have no __init__.py: with the repository root on sys.path (pytest, `python -c`, a notebook) they are at
    # most namespace portions, which never shadow an installed top-level package (Hugging Face's `kernels`).
    packages=[*find_packages(include=["mmfast", "mmfast.*"]), "mmfast.kernels", "mmfast.csrc"],
    package_dir={"mmfast.kernels": "kernels", "mmfast.csrc": "csrc"},
    package_data={"mmfast.csrc": ["*.cpp", "*.h", "cpu/*.cpp", "cpu/*.h", "cuda/*.cu", "cuda/*.cuh", "cuda/*.h"]},
    ext_modules=ext_modules,
    cmdclass=cmdclass,
)
