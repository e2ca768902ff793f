"""Build of the C++/CUDA extension (csrc/) with torch.utils.cpp_extension + ninja.

The extension is compiled just in time on first use and cached per torch version, so installing
mmfast never needs a compiler. `mmfast build` (or `MMFAST_BUILD_EXT=1 pip install
--no-build-isolation .`) compiles it ahead of time. A failed build warns once and leaves the
`cpu`/`cuda` backends unavailable with the compiler's reason; ops then fall back to `torch`.

This module imports only torch and the standard library: setup.py loads it on its own.
"""

from __future__ import annotations

import glob
import importlib
import os
import shutil
import subprocess
import sys
import sysconfig
import time
import warnings
from pathlib import Path

import torch

EXTENSION_NAME = "mmfast_C"

_module = None
_error: str | None = None
_attempted = False


def csrc_dir() -> Path:
    """csrc/ beside the package in a checkout, or mmfast/csrc inside an installed wheel."""
    here = Path(__file__).resolve().parent
    for candidate in (here.parent / "csrc", here / "csrc"):
        if (candidate / "ops.cpp").is_file():
            return candidate
    raise FileNotFoundError(f"mmfast: C++ sources not found next to {here}")


def _set_cuda_home() -> None:
    """Point CUDA_HOME at nvcc's own root when it is unset, before torch reads it.

    Without it torch guesses the root from `which nvcc`, which is wrong when nvcc on PATH is a
    wrapper script (/usr/local/bin/nvcc execs /usr/local/cuda-13.0/bin/nvcc on our machines):
    every object compiles, then the link fails on -lcudart. nvcc's dry run prints its real root.
    torch reads the variable once, when torch.utils.cpp_extension is first imported.
    """
    if torch.version.cuda is None or os.environ.get("CUDA_HOME") or os.environ.get("CUDA_PATH"):
        return
    if "torch.utils.cpp_extension" in sys.modules:  # too late: torch has already settled on a root
        return
    nvcc = shutil.which("nvcc")
    if nvcc is None:
        return
    try:
        dry_run = subprocess.run(
            [nvcc, "--dryrun", "-c", "-x", "cu", os.devnull, "-o", os.devnull],
            capture_output=True, text=True, timeout=60,
        )
    except (OSError, subprocess.SubprocessError):
        return
    for line in (dry_run.stdout + dry_run.stderr).splitlines():
        if line.startswith("#$ TOP="):
            os.environ["CUDA_HOME"] = os.path.realpath(line.split("=", 1)[1].strip())
            return


def with_cuda() -> bool:
    """Whether this torch can build the CUDA part: a CUDA build of torch and nvcc."""
    _set_cuda_home()
    from torch.utils.cpp_extension import CUDA_HOME

    return torch.version.cuda is not None and CUDA_HOME is not None


def cache_dir() -> Path:
    """One build folder per torch version and CUDA flavour, so switching torch never reuses objects."""
    root = os.environ.get("MMFAST_CACHE") or os.path.join(
        os.environ.get("XDG_CACHE_HOME", os.path.expanduser("~/.cache")), "mmfast"
    )
    flavour = f"cu{torch.version.cuda}" if with_cuda() else "cpu"
    tag = f"py{sys.version_info.major}{sys.version_info.minor}-torch{torch.__version__.split('+')[0]}-{flavour}"
    return Path(root) / tag


def sources() -> list[str]:
    root = csrc_dir()
    # Top-level .cpp files are device-generic (ops.cpp, the ATen chunk loops); cpu/ and cuda/ hold the kernels.
    files = [*sorted(root.glob("*.cpp")), *sorted((root / "cpu").glob("*.cpp"))]
    if with_cuda():
        files += sorted((root / "cuda").glob("*.cu"))
    return [str(f) for f in files]


def _cpu_flags() -> list[str]:
    """Vector ISA for at::vec, matching what torch's own kernels use on this CPU."""
    capability = torch.backends.cpu.get_cpu_capability()
    isa = {
        "AVX512": ["-mavx512f", "-mavx512bw", "-mavx512vl", "-mavx512dq", "-mfma", "-mf16c"],
        "AVX2": ["-mavx2", "-mfma", "-mf16c"],
    }.get(capability)
    if isa is None:
        return []
    return [f"-DCPU_CAPABILITY={capability}", f"-DCPU_CAPABILITY_{capability}", *isa]


def _cuda_include_dirs() -> list[str]:
    # The CUDA wheels of torch ship the CUDA headers they were built with under site-packages/nvidia.
    site = sysconfig.get_paths()["purelib"]
    return sorted(glob.glob(os.path.join(site, "nvidia", "*", "include")))


def _cuda_arch_list() -> None:
    # Without a visible GPU torch cannot detect the arch: build for Hopper, the GPUs we target,
    # with PTX so that newer GPUs can JIT it.
    if "TORCH_CUDA_ARCH_LIST" not in os.environ and not torch.cuda.is_available():
        os.environ["TORCH_CUDA_ARCH_LIST"] = "9.0+PTX"


def build_options() -> dict:
    cflags = ["-O3", "-fopenmp", *_cpu_flags()]
    options = dict(
        extra_cflags=cflags,
        extra_ldflags=["-fopenmp"],
        extra_include_paths=[str(csrc_dir())],
    )
    if os.environ.get("MMFAST_SANITIZE") == "1":
        # ASan + UBSan for .ci/sanitize, which also preloads the runtimes into python. Any UBSan
        # finding aborts instead of printing and going on, so a finding can never pass unnoticed.
        # -O1 (after -O3, so it wins): ASan's advice, readable stacks and a shorter compile.
        sanitize = ["-fsanitize=address,undefined", "-fno-sanitize-recover=undefined"]
        cflags += [*sanitize, "-fno-omit-frame-pointer", "-g", "-O1"]
        options["extra_ldflags"] += sanitize
    if with_cuda():
        _cuda_arch_list()
        cflags.append("-DMMFAST_WITH_CUDA")
        # No --use_fast_math: it swaps tanh and log for approximations too coarse for fp32 losses.
        options["extra_cuda_cflags"] = ["-O3", "-DMMFAST_WITH_CUDA"]
        options["extra_include_paths"] += _cuda_include_dirs()
    return options


def build(verbose: bool = False):
    """Compile (or load from the cache) and import the extension. Raises on failure."""
    _set_cuda_home()
    from torch.utils.cpp_extension import load

    directory = cache_dir()
    directory.mkdir(parents=True, exist_ok=True)
    return load(
        name=EXTENSION_NAME,
        sources=sources(),
        build_directory=str(directory),
        with_cuda=with_cuda(),
        verbose=verbose,
        **build_options(),
    )


def load_extension():
    """The extension module, or None when it cannot be built (the reason is in `error()`).

    A wheel built with MMFAST_BUILD_EXT=1 carries `mmfast._C`; otherwise compile just in time.
    """
    global _module, _error, _attempted
    if _attempted:
        return _module
    _attempted = True
    try:
        _module = importlib.import_module("mmfast._C")
        return _module
    except ImportError:
        pass
    start = time.perf_counter()
    first_build = not any(cache_dir().glob(f"{EXTENSION_NAME}*.so"))
    if first_build:
        print("mmfast: compiling the C++ extension (first use; cached afterwards)...", file=sys.stderr, flush=True)
    try:
        _module = build()
    except Exception as exc:  # compiler missing, compile error, link error: all mean "no extension"
        _error = f"{type(exc).__name__}: {_summary(str(exc))}"
        warnings.warn(
            f"mmfast: the C++ extension could not be built ({_error}); the cpu and cuda backends are "
            "unavailable and ops fall back to the torch backend. `mmfast build` shows the full log.",
            RuntimeWarning,
            stacklevel=2,
        )
        return None
    if first_build:
        print(f"mmfast: extension ready in {time.perf_counter() - start:.1f} s", file=sys.stderr, flush=True)
    return _module


def error() -> str | None:
    """Why the extension is unavailable, once a load was attempted."""
    return _error


def _summary(text: str) -> str:
    """The compiler's first error line when there is one (ninja's last line only says it stopped)."""
    lines = [line.strip() for line in text.strip().splitlines() if line.strip()]
    errors = [line for line in lines if "error:" in line]
    return errors[0] if errors else (lines[-1] if lines else text)


def setuptools_extension():
    """The same build as an ahead-of-time setuptools extension (`MMFAST_BUILD_EXT=1`)."""
    from torch.utils.cpp_extension import CppExtension, CUDAExtension

    options = build_options()
    kind = CUDAExtension if with_cuda() else CppExtension
    compile_args = {"cxx": options["extra_cflags"]}
    if with_cuda():
        compile_args["nvcc"] = options["extra_cuda_cflags"]
    root = csrc_dir().parent
    return kind(
        name="mmfast._C",
        sources=[os.path.relpath(s, root) for s in sources()],
        include_dirs=options["extra_include_paths"],
        extra_compile_args=compile_args,
        extra_link_args=options["extra_ldflags"],
    )


def build_ext_command():
    from torch.utils.cpp_extension import BuildExtension

    return BuildExtension
