"""Registry of op × backend: which implementation runs, whether it can, and why not.

Backends, each a module with functions named `<op>_forward` / `<op>_backward`:
  triton  mmfast.kernels.<file> CUDA tensors (CPU tensors only under TRITON_INTERPRET=1, for tests)
  cuda    mmfast_C.cuda         CUDA tensors, when torch is a CUDA build and nvcc is found
  cpu     mmfast_C.cpu          CPU tensors
  torch   mmfast.reference      anywhere

Choice: the op's `backend=` argument, else `with use_backend(name):`, else $MMFAST_BACKEND, else by
device (CUDA: triton, cuda, torch; CPU: cpu, torch). A named backend that cannot run raises
BackendUnavailable saying why; the automatic choice skips it.
"""

from __future__ import annotations

import contextlib
import importlib
import os
from collections.abc import Callable, Iterator

import torch

from . import _build

BACKENDS = ("triton", "cuda", "cpu", "torch")
OPS = ("cross_entropy", "linear_cross_entropy", "lora_linear", "cross_modal_attention")
_AUTO_ORDER = {"cuda": ("triton", "cuda", "torch"), "cpu": ("cpu", "torch")}
# The Triton kernels live one family per file in kernels/ (shipped as mmfast.kernels, a namespace package:
# the folder has no __init__.py, so with the repository root on sys.path it never shadows another
# project's top-level `kernels`, such as Hugging Face's).
_TRITON_FILES = {
    "cross_entropy": "cross_entropy",
    "linear_cross_entropy": "linear_cross_entropy",
    "lora_linear": "lora",
    "cross_modal_attention": "attention",
}

_overrides: list[str] = []  # a plain global, not a thread-local, so torch.compile can guard on it


class BackendUnavailable(RuntimeError):
    """A backend was asked for by name but cannot run here."""


def check_name(name: str) -> str:
    if name not in BACKENDS:
        raise ValueError(f"backend: expected one of {', '.join(BACKENDS)}, got {name!r}")
    return name


@contextlib.contextmanager
def use_backend(name: str) -> Iterator[None]:
    """Run every mmfast op inside the block on backend `name` (an op's own `backend=` still wins)."""
    _overrides.append(check_name(name))
    try:
        yield
    finally:
        _overrides.pop()


def requested_backend(backend: str | None) -> str:
    """What the caller asked for at trace time ("" for automatic); $MMFAST_BACKEND is read at run time."""
    if backend is not None:
        return check_name(backend)
    return _overrides[-1] if _overrides else ""


def triton_interpreting() -> bool:
    return os.environ.get("TRITON_INTERPRET") == "1"


def _load(backend: str, op: str, compile: bool = True):
    """The module holding `op`'s kernels on `backend`, or raise BackendUnavailable with the reason.

    With `compile` False the C++ extension is only loaded when a build of it is cached (for `mmfast info`).
    """
    if backend == "torch":
        return importlib.import_module("mmfast.reference")
    if backend == "triton":
        try:
            return importlib.import_module(f"mmfast.kernels.{_TRITON_FILES[op]}")
        except ImportError as exc:
            raise BackendUnavailable(f"triton cannot be imported ({exc})") from None
    if backend == "cuda":
        if torch.version.cuda is None:
            raise BackendUnavailable("this torch is a CPU-only build")
        if not _build.with_cuda():
            raise BackendUnavailable("nvcc was not found (set CUDA_HOME)")
    extension = _build.load_extension(compile=compile)
    if extension is None:
        if _build.error() is None:
            raise BackendUnavailable(_build.not_built_reason())
        raise BackendUnavailable(f"the C++ extension failed to build: {_build.error()}")
    if not hasattr(extension, backend):
        raise BackendUnavailable(f"the C++ extension at {extension.__file__} was built without its {backend} part")
    return getattr(extension, backend)


def _device_reason(backend: str, device: torch.device) -> str | None:
    if backend == "triton":
        if device.type == "cuda" or (device.type == "cpu" and triton_interpreting()):
            return None
        return f"triton runs on CUDA tensors (CPU tensors only under TRITON_INTERPRET=1), got {device.type}"
    if backend in ("cuda", "cpu") and device.type != backend:
        return f"the {backend} backend runs on {backend.upper()} tensors, got {device.type}"
    return None


def unavailable_reason(op: str, backend: str, device: torch.device, compile: bool = True) -> str | None:
    """None when `backend` can run `op` on tensors of `device`, else why not (building the extension if
    `compile`, else saying that it is not built yet)."""
    reason = _device_reason(backend, device)
    if reason is not None:
        return reason
    try:
        module = _load(backend, op, compile)
    except BackendUnavailable as exc:
        return str(exc)
    if not hasattr(module, f"{op}_forward"):
        return f"{op} is not implemented by the {backend} backend"
    if device.type == "cuda" and not torch.cuda.is_available():
        return "no CUDA device is visible"
    return None


def select(op: str, device: torch.device, requested: str = "") -> str:
    """The backend that runs `op` on `device`: the requested one (checked), else the automatic choice."""
    name = requested or os.environ.get("MMFAST_BACKEND", "")
    if name:
        check_name(name)
        reason = unavailable_reason(op, name, device)
        if reason is not None:
            raise BackendUnavailable(f"mmfast backend {name!r} cannot run {op} on {device.type} tensors: {reason}")
        return name
    for candidate in _AUTO_ORDER.get(device.type, ("torch",)):
        if unavailable_reason(op, candidate, device) is None:
            return candidate
    return "torch"


def kernel(op: str, backend: str, stage: str) -> Callable:
    """The function implementing `stage` ("forward" or "backward") of `op` on `backend`."""
    return getattr(_load(backend, op), f"{op}_{stage}")


def table() -> list[dict]:
    """One row per op × backend: availability on CPU and CUDA tensors, with reasons (for `mmfast info`).

    Never compiles: the C++ backends read "yes" only where the extension is built (or was loaded).
    """
    rows = []
    for op in OPS:
        for backend in BACKENDS:
            row = {"op": op, "backend": backend}
            for device in ("cpu", "cuda"):
                row[device] = unavailable_reason(op, backend, torch.device(device), compile=False) or "yes"
            rows.append(row)
    return rows
