"""Build of the C++/CUDA extension (csrc/) with torch.utils.cpp_extension + ninja.

The extension is compiled just in time on first use, so installing mmfast never needs a compiler.
`mmfast build` (or `MMFAST_BUILD_EXT=1 pip install --no-build-isolation .`) compiles it ahead of
time. A failed build warns once and leaves the `cpu`/`cuda` backends unavailable with the compiler's
reason; ops then fall back to `torch`.

The cache is content-addressed: $MMFAST_CACHE (default ~/.cache/mmfast) holds one folder per hash of
everything that changes the binary (every file under csrc/, the flags, the compiler and its version,
nvcc's, torch, CUDA, Python and the CPU ISA), so two checkouts never share objects and an unchanged
tree never rebuilds. A build runs in a private temporary folder beside the cache and is renamed into
place only when complete; the lock is an flock on a file per key, which the kernel releases when its
holder dies, so a killed build leaves at most a temporary folder that nobody waits on.

This module imports only torch and the standard library: setup.py loads it on its own.
"""

from __future__ import annotations

import fcntl
import functools
import glob
import hashlib
import importlib
import importlib.util
import json
import os
import platform
import secrets
import shlex
import shutil
import subprocess
import sys
import sysconfig
import time
import warnings
from collections.abc import Iterator
from contextlib import contextmanager
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


def cache_root() -> Path:
    """$MMFAST_CACHE, else $XDG_CACHE_HOME/mmfast, else ~/.cache/mmfast."""
    root = os.environ.get("MMFAST_CACHE") or os.path.join(
        os.environ.get("XDG_CACHE_HOME", os.path.expanduser("~/.cache")), "mmfast"
    )
    return Path(root)


def cache_dir() -> Path:
    """The build folder of this tree's extension: the cache root / <name>-<content hash>."""
    return build_folder(EXTENSION_NAME, build_key(EXTENSION_NAME, csrc_dir(), sources(), build_options(), with_cuda()))


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
    return build_extension(EXTENSION_NAME, csrc_dir(), sources(), build_options(), with_cuda=with_cuda(), verbose=verbose)


def built_library() -> Path | None:
    """The cached build of this tree's extension, or None when it has not been compiled yet."""
    return _library_in(cache_dir())


def not_built_reason() -> str:
    """What `load_extension(compile=False)` returning None means: why it is not built, or how to build it."""
    compiler = shlex.split(_cxx_compiler())
    if not compiler or shutil.which(compiler[0]) is None:
        return f"no C++ compiler: {' '.join(compiler) or 'CXX'!r} not found (install one or set CXX)"
    from torch.utils.cpp_extension import is_ninja_available

    if not is_ninja_available():
        return "ninja not found (pip install ninja)"
    return "not built yet: `mmfast build` (or first use) compiles it"


def load_extension(compile: bool = True):
    """The extension module, or None when it is unavailable (the reason is in `error()`).

    A wheel built with MMFAST_BUILD_EXT=1 carries `mmfast._C`; otherwise the cached build for this tree,
    compiled just in time unless `compile` is False (then None means "not built yet": `not_built_reason()`).
    """
    global _module, _error, _attempted
    if _attempted:
        return _module
    try:
        _module = importlib.import_module("mmfast._C")
        _attempted = True
        return _module
    except ImportError:
        pass
    if not compile:
        library = built_library()
        if library is None:
            return None
        _attempted = True
        try:
            _module = _import_library(library)
        except ImportError as exc:
            _error = f"{type(exc).__name__}: {exc}"
        return _module
    _attempted = True
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


# ------------------------------------------------------------------ the content-addressed, locked JIT build
# Generic over the source folder, so that the tests can drive it with a one-file extension.

_KEY_FORMAT = 1  # bump when the layout of a build folder changes
_TEMP_MARK = ".tmp-"


def _cxx_compiler() -> str:
    """The compiler command torch's JIT build runs ($CXX, else c++)."""
    return os.environ.get("CXX", "c++")


def _tool_identity(command: list[str]) -> dict:
    """A compiler's resolved path and `--version` output: a different compiler must be a different key."""
    path = shutil.which(command[0]) if command else None
    if path is None:
        return {"command": command, "path": None}
    return {"command": command, "path": os.path.realpath(path),
            "version": _version(tuple(command[1:]), path, os.stat(path).st_mtime_ns)}


@functools.lru_cache(maxsize=None)
def _version(arguments: tuple[str, ...], path: str, mtime_ns: int) -> str:
    """`path --version`, asked once per process for each file (a replaced compiler has a new mtime)."""
    try:
        return subprocess.run([path, *arguments, "--version"], capture_output=True, text=True, timeout=60).stdout.strip()
    except (OSError, subprocess.SubprocessError) as exc:
        return f"unavailable: {exc}"


def build_manifest(name: str, source_dir: Path, sources: list[str], options: dict, with_cuda: bool) -> dict:
    """Everything that changes the compiled binary; its hash names the build folder."""
    source_dir = Path(source_dir).resolve()
    files = {
        path.relative_to(source_dir).as_posix(): hashlib.sha256(path.read_bytes()).hexdigest()
        for path in sorted(source_dir.rglob("*"))
        if path.is_file() and "__pycache__" not in path.parts
    }
    # The checkout's own path appears in the include flags; identical trees in two places are one build.
    options_text = json.dumps(options, sort_keys=True).replace(str(source_dir), "<sources>")
    manifest = {
        "format": _KEY_FORMAT,
        "name": name,
        "files": files,
        "sources": [os.path.relpath(s, source_dir) for s in sources],
        "options": json.loads(options_text),
        "with_cuda": with_cuda,
        "compiler": _tool_identity(shlex.split(_cxx_compiler())),
        "torch": [torch.__version__, torch.version.cuda, torch.version.git_version],
        "python": [sys.version, sysconfig.get_config_var("EXT_SUFFIX"), platform.machine()],
        "cpu_isa": torch.backends.cpu.get_cpu_capability(),
    }
    if with_cuda:
        from torch.utils.cpp_extension import CUDA_HOME

        manifest["nvcc"] = _tool_identity([os.path.join(CUDA_HOME, "bin", "nvcc")])
        manifest["cuda_arch_list"] = os.environ.get("TORCH_CUDA_ARCH_LIST")
    return manifest


def build_key(name: str, source_dir: Path, sources: list[str], options: dict, with_cuda: bool) -> str:
    return _hash(build_manifest(name, source_dir, sources, options, with_cuda))


def _hash(manifest: dict) -> str:
    return hashlib.sha256(json.dumps(manifest, sort_keys=True).encode()).hexdigest()[:20]


def build_folder(name: str, key: str) -> Path:
    return cache_root() / f"{name}-{key}"


def _library_in(folder: Path) -> Path | None:
    """The extension in a finished build folder (a folder exists only once its build is complete)."""
    suffix = ".pyd" if sys.platform == "win32" else ".so"
    libraries = sorted(folder.glob(f"*{suffix}")) if folder.is_dir() else []
    return libraries[0] if libraries else None


def _import_library(path: Path):
    """Import a built extension from its file; the module name is the file name up to the first dot."""
    module_name = path.name.split(".")[0]
    loaded = sys.modules.get(module_name)
    if loaded is not None and getattr(loaded, "__file__", None) == str(path):
        return loaded
    spec = importlib.util.spec_from_file_location(module_name, path)
    if spec is None or spec.loader is None:
        raise ImportError(f"cannot import the extension at {path}")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    sys.modules[module_name] = module
    return module


def build_extension(name: str, source_dir: Path, sources: list[str], options: dict, *, with_cuda: bool,
                    verbose: bool = False):
    """Import the cached build of these sources, compiling it first if no process has yet. Raises on failure.

    `options` are torch.utils.cpp_extension.load's keyword arguments (extra_cflags, extra_ldflags, ...).
    """
    manifest = build_manifest(name, source_dir, sources, options, with_cuda)
    folder = build_folder(name, _hash(manifest))
    library = _library_in(folder)
    if library is not None:
        return _import_library(library)
    folder.parent.mkdir(parents=True, exist_ok=True)
    with _build_lock(folder.with_name(folder.name + ".lock")):
        library = _library_in(folder)  # another process may have built it while this one waited
        if library is not None:
            return _import_library(library)
        _remove_dead_temp_folders(folder)
        return _compile(name, sources, options, with_cuda, folder, manifest, verbose)


def _compile(name: str, sources: list[str], options: dict, with_cuda: bool, folder: Path, manifest: dict,
             verbose: bool):
    """Compile in a private folder (so torch's own lock file inside it is never shared) and rename it into place."""
    from torch.utils.cpp_extension import load

    temp = folder.with_name(f"{folder.name}{_TEMP_MARK}{os.getpid()}-{secrets.token_hex(4)}")
    temp.mkdir()
    start = time.perf_counter()
    print(f"mmfast: compiling the C++ extension into {folder} (first use; cached afterwards)...",
          file=sys.stderr, flush=True)
    try:
        module = load(name=name, sources=sources, build_directory=str(temp), with_cuda=with_cuda, verbose=verbose,
                      **options)
        (temp / "manifest.json").write_text(json.dumps(manifest, indent=1, sort_keys=True))  # what the key hashes
        _publish(temp, folder)
    except BaseException:
        shutil.rmtree(temp, ignore_errors=True)
        raise
    # The module was imported from the temporary folder; its file now lives in the final one.
    module.__file__ = str(folder / Path(module.__file__).name)
    sys.modules[module.__name__] = module
    print(f"mmfast: extension ready in {time.perf_counter() - start:.1f} s", file=sys.stderr, flush=True)
    return module


def _publish(temp: Path, folder: Path) -> None:
    """Move a complete build into place in one step: a folder named by its key is always a finished build."""
    (temp / "lock").unlink(missing_ok=True)  # torch's own, private to this build
    os.rename(temp, folder)


@contextmanager
def _build_lock(path: Path) -> Iterator[None]:
    """An exclusive flock on `path`, which the kernel drops when the holder exits or is killed.

    The holder writes its pid and start time into the file, so that a waiter can say whom it waits for.
    The file descriptor is not inherited by the compiler processes (Python's default), so an orphaned
    compiler never keeps the lock alive after its parent was killed.
    """
    fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o666)
    try:
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            print(f"mmfast: waiting for another process to finish building the C++ extension: {_holder(path)} "
                  f"(lock {path})", file=sys.stderr, flush=True)
            fcntl.flock(fd, fcntl.LOCK_EX)
        os.ftruncate(fd, 0)
        os.pwrite(fd, f"pid {os.getpid()}, building since {time.strftime('%Y-%m-%d %H:%M:%S')}\n".encode(), 0)
        yield
    finally:
        os.close(fd)  # releases the lock


def _holder(path: Path) -> str:
    """Who holds a build lock, from what it wrote into the lock file (it may not have written yet)."""
    for _ in range(20):
        text = path.read_text().strip()
        if text:
            return text
        time.sleep(0.05)
    return "a process that has not yet written its pid"


def _remove_dead_temp_folders(folder: Path) -> None:
    """Delete the temporary folders that killed builds left behind in the cache root.

    Called with `folder`'s lock held: its own temporary folders belong to dead builds. Another key's belong
    to a dead build when that key's lock is free.
    """
    for temp in folder.parent.glob(f"*{_TEMP_MARK}*"):
        owner = temp.name.split(_TEMP_MARK)[0]
        if owner == folder.name:
            shutil.rmtree(temp, ignore_errors=True)
            continue
        fd = os.open(folder.with_name(owner + ".lock"), os.O_RDWR | os.O_CREAT, 0o666)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            continue  # that key is being built right now
        else:
            shutil.rmtree(temp, ignore_errors=True)
        finally:
            os.close(fd)
